# Ablation (additive): YOLOv8-s + GSO-YOLO's Steady Capture Module after
# SPPF (GOM off, CIoU box loss). The module's settings are GSO-YOLO's
# (../_base_/models/gso_yolo_s.py; tests/test_gso_yolo.py checks they match).
_base_ = './yolov8_s_8xb16-300e_soda.py'

model = dict(backbone=dict(scm=dict(type='mmlocal.EMAttention', groups=32)))
