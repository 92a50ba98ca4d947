# GSO-YOLO-s (Zhang et al., arXiv 2407.00906) = YOLOv8-s + GOM before SPPF
# + SCM after SPPF + AIoU box loss. See docs/methods/gso_yolo.md.
_base_ = './yolov8_s.py'

model = dict(
    backbone=dict(
        gom=dict(type='mmlocal.GAMAttention', reduction=4),
        scm=dict(type='mmlocal.EMAttention', groups=32)),
    bbox_head=dict(
        loss_bbox=dict(
            _delete_=True,
            type='mmlocal.AIoULoss',
            alpha=0.5,
            reduction='mean',
            loss_weight=7.5)))
