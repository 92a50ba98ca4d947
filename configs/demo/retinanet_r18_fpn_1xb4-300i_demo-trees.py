# RetinaNet R18-FPN trained from scratch on the real demo tiles, on one CPU
# in a few minutes (no weights can be downloaded here, so no ImageNet init).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/datasets/demo_trees_detection.py',
]

model = dict(
    backbone=dict(
        depth=18,
        init_cfg=None,
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=128,
              start_level=1, add_extra_convs='on_input', num_outs=4),
    bbox_head=dict(
        num_classes=1,
        in_channels=128,
        feat_channels=128,
        stacked_convs=2,
        anchor_generator=dict(
            # trees are 10-60 px at 320 px; P3-P6 with smaller base anchors
            octave_base_scale=3,
            strides=[8, 16, 32, 64])),
    test_cfg=dict(score_thr=0.05, max_per_img=150))

max_iters = 300
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters,
    val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters,
         T_max=max_iters - 30, eta_min=1e-5),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
custom_hooks = [dict(type='mmlocal.PeakMemoryHook', interval=10)]
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=4)
