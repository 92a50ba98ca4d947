# Ablation (additive): YOLOv8-s + GSO-YOLO's Global Optimization Module
# before SPPF (SCM off, CIoU box loss). The module's settings are GSO-YOLO's
# (../_base_/models/gso_yolo_s.py; tests/test_gso_yolo.py checks they match).
_base_ = './yolov8_s_8xb16-300e_soda.py'

model = dict(
    backbone=dict(gom=dict(type='mmlocal.GAMAttention', reduction=4)))
