# YOLOv8-s in mmdet: mmlocal's YOLOv8CSPDarknet + YOLOv8PAFPN + YOLOv8Head,
# with mmdet's SingleStageDetector, DetDataPreprocessor, TaskAlignedAssigner,
# MlvlPointGenerator(offset=0.5), DistancePointBBoxCoder, CIoU, BCE and DFL.
# Sizes (deepen, widen, last stage): n 0.33/0.25/1024, s 0.33/0.5/1024,
# m 0.67/0.75/768, l 1.0/1.0/512, x 1.0/1.25/512.
deepen_factor = 0.33
widen_factor = 0.5
last_stage_out_channels = 1024
num_classes = 80
norm_cfg = dict(type='BN', momentum=0.03, eps=0.001)
act_cfg = dict(type='SiLU', inplace=True)

model = dict(
    type='SingleStageDetector',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[0., 0., 0.],
        std=[255., 255., 255.],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='mmlocal.YOLOv8CSPDarknet',
        arch='P5',
        last_stage_out_channels=last_stage_out_channels,
        deepen_factor=deepen_factor,
        widen_factor=widen_factor,
        out_indices=(2, 3, 4),
        # GSO-YOLO's slots, empty in YOLOv8: gom=None, scm=None
        norm_cfg=norm_cfg,
        act_cfg=act_cfg),
    neck=dict(
        type='mmlocal.YOLOv8PAFPN',
        in_channels=[256, 512, last_stage_out_channels],
        out_channels=[256, 512, last_stage_out_channels],
        deepen_factor=deepen_factor,
        widen_factor=widen_factor,
        num_csp_blocks=3,
        norm_cfg=norm_cfg,
        act_cfg=act_cfg),
    bbox_head=dict(
        type='mmlocal.YOLOv8Head',
        num_classes=num_classes,
        in_channels=[256, 512, last_stage_out_channels],
        widen_factor=widen_factor,
        reg_max=16,
        prior_generator=dict(
            type='MlvlPointGenerator', offset=0.5, strides=[8, 16, 32]),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(
            type='CrossEntropyLoss',
            use_sigmoid=True,
            reduction='mean',
            loss_weight=0.5),
        loss_bbox=dict(type='CIoULoss', reduction='mean', loss_weight=7.5),
        loss_dfl=dict(
            type='DistributionFocalLoss', reduction='mean', loss_weight=1.5),
        # losses x global batch size, as YOLOv8 (its SGD lr=0.01 assumes it)
        loss_batch_scale=True,
        norm_cfg=norm_cfg,
        act_cfg=act_cfg),
    train_cfg=dict(
        assigner=dict(type='TaskAlignedAssigner', topk=10),
        alpha=0.5,
        beta=6.0),
    test_cfg=dict(
        nms_pre=30000,
        min_bbox_size=0,
        score_thr=0.001,
        nms=dict(type='nms', iou_threshold=0.7),
        max_per_img=300))
