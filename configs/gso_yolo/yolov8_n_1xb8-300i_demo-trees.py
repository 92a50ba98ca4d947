# YOLOv8-n trained from scratch on the real demo tiles (data/demo, 1 class,
# ~320 px; prepare with `python tools/data/prepare_demo.py`) on one CPU (on
# a busy machine prefix OMP_NUM_THREADS=1: ~2 s/iteration, ~10 minutes):
#   python tools/train.py configs/gso_yolo/yolov8_n_1xb8-300i_demo-trees.py
# The baseline of gso-yolo_n_1xb8-300i_demo-trees.py (same data, schedule).
_base_ = [
    '../_base_/models/yolov8_s.py',
    '../_base_/datasets/demo_trees_detection.py',
    'mmdet::_base_/default_runtime.py',
]

deepen_factor = 0.33
widen_factor = 0.25

model = dict(
    backbone=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    neck=dict(deepen_factor=deepen_factor, widen_factor=widen_factor),
    bbox_head=dict(
        num_classes=1,
        widen_factor=widen_factor,
        # per-target mean losses for AdamW (YOLOv8's batch scaling is for
        # its SGD recipe)
        loss_batch_scale=False))

train_dataloader = dict(batch_size=8)

max_iters = 300
train_cfg = dict(
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0, bias_decay_mult=0.0, bypass_duplicate=True),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
        end=30),
    dict(
        type='CosineAnnealingLR',
        by_epoch=False,
        begin=30,
        end=max_iters,
        T_max=max_iters - 30,
        eta_min=2e-5),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=100,
        max_keep_ckpts=2))
custom_hooks = [
    # YOLOv8's EMA of the weights, used for validation
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0001,
        update_buffers=True,
        strict_load=False,
        priority=49),
    dict(type='mmlocal.PeakMemoryHook', interval=10)
]
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=8)
