# Ablation (additive): YOLOv8-s with GSO-YOLO's AIoU box loss instead of
# CIoU (no GOM, no SCM). The loss settings are GSO-YOLO's
# (../_base_/models/gso_yolo_s.py; tests/test_gso_yolo.py checks they match).
_base_ = './yolov8_s_8xb16-300e_soda.py'

model = dict(
    bbox_head=dict(
        loss_bbox=dict(
            _delete_=True,
            type='mmlocal.AIoULoss',
            alpha=0.5,
            reduction='mean',
            loss_weight=7.5)))
