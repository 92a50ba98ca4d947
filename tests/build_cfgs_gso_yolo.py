"""Minimal build arguments of the GSO-YOLO family's registered names."""

TINY = dict(deepen_factor=0.33, widen_factor=0.125)

BUILD_CFGS = {
    ('MODELS', 'YOLOv8CSPDarknet'):
    lambda: dict(
        **TINY,
        gom=dict(type='mmlocal.GAMAttention'),
        scm=dict(type='mmlocal.EMAttention', groups=4)),
    ('MODELS', 'YOLOv8PAFPN'):
    lambda: dict(**TINY),
    ('MODELS', 'YOLOv8Head'):
    lambda: dict(
        num_classes=2,
        widen_factor=0.125,
        loss_bbox=dict(type='mmlocal.AIoULoss', loss_weight=7.5),
        train_cfg=dict(
            assigner=dict(type='mmdet.TaskAlignedAssigner', topk=10),
            alpha=0.5,
            beta=6.0)),
    ('MODELS', 'GAMAttention'):
    lambda: dict(channels=16),
    ('MODELS', 'EMAttention'):
    lambda: dict(channels=16, groups=4),
    ('MODELS', 'AIoULoss'):
    lambda: dict(alpha=dict(start=1.0, end=0.5, iters=10)),
}
