# MOCS (An et al., Automation in Construction 2021): 13 classes, COCO json
# with instance masks (boxes only are used here):
#   instances_train.json  instances_train/   instances_val.json  instances_val/
# YOLOv8's augmentation from yolov8_coco_detection.py; COCO bbox mAP.
_base_ = './yolov8_coco_detection.py'

dataset_type = 'mmlocal.MOCSDataset'
data_root = 'data/MOCS/'

train_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='instances_train.json',
        data_prefix=dict(img='instances_train/'),
        require_masks=False))
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='instances_val.json',
        data_prefix=dict(img='instances_val/'),
        require_masks=False))
test_dataloader = val_dataloader

val_evaluator = dict(ann_file=data_root + 'instances_val.json')
test_evaluator = val_evaluator
