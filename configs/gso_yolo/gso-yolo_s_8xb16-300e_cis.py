# GSO-YOLO-s on CIS, YOLOv8 recipe (300 epochs, 8 GPUs x 16).
# GSO-YOLO = YOLOv8 + GOM + SCM + AIoU: ../_base_/models/gso_yolo_s.py
_base_ = [
    '../_base_/models/gso_yolo_s.py',
    '../_base_/datasets/yolov8_cis_detection.py',
    '../_base_/schedules/yolov8_sgd_300e.py'
]

# CIS: 10 classes (mmlocal.CISDataset.METAINFO)
model = dict(bbox_head=dict(num_classes=10))

custom_hooks = _base_.custom_hooks + [
    dict(
        type='PipelineSwitchHook',
        switch_epoch=_base_.max_epochs - _base_.close_mosaic_epochs,
        switch_pipeline=_base_.train_pipeline_stage2)
]
