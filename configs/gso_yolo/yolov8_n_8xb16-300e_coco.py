# YOLOv8-n on COCO 2017: the -s config at n size.
_base_ = './yolov8_s_8xb16-300e_coco.py'

deepen_factor = 0.33
widen_factor = 0.25

model = dict(
    backbone=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    neck=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    bbox_head=dict(widen_factor=widen_factor))
