# SODA (Duan et al., Automation in Construction 2022, arXiv 2202.09554):
# 15 classes, Pascal VOC layout under data_root:
#   Annotations/<id>.xml  JPEGImages/<id>.jpg  ImageSets/Main/{train,val}.txt
# YOLOv8's augmentation from yolov8_coco_detection.py. Evaluated with mmdet's
# VOCMetric (area AP) at IoU 0.50:0.05:0.95: `AP50` and the mean `mAP`
# (mAP50-95), the two numbers GSO-YOLO reports.
_base_ = './yolov8_coco_detection.py'

dataset_type = 'mmlocal.SODADataset'
data_root = 'data/SODA/'

train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='ImageSets/Main/train.txt',
        data_prefix=dict(sub_data_root=''),
        filter_cfg=dict(filter_empty_gt=False, min_size=2),
        pipeline=_base_.train_pipeline,
        backend_args=_base_.backend_args))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='ImageSets/Main/val.txt',
        data_prefix=dict(sub_data_root=''),
        test_mode=True,
        pipeline=_base_.test_pipeline,
        backend_args=_base_.backend_args))
test_dataloader = val_dataloader

val_evaluator = dict(
    _delete_=True,
    type='VOCMetric',
    metric='mAP',
    eval_mode='area',
    iou_thrs=[round(0.5 + 0.05 * i, 2) for i in range(10)])
test_evaluator = val_evaluator
