# CIS, construction-site instance segmentation (Xuzhong Yan et al.), as COCO
# json. Its release layout and class list are UNVERIFIED: the classes are
# the file's categories (mmlocal.CISDataset); adjust the paths below to the
# release, and the model's num_classes to its number of categories.
_base_ = './yolov8_coco_detection.py'

dataset_type = 'mmlocal.CISDataset'
data_root = 'data/CIS/'

train_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        require_masks=False))
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        require_masks=False))
test_dataloader = val_dataloader

val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
