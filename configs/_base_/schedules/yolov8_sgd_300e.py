# YOLOv8's training recipe on mmengine: SGD (lr 0.01, momentum 0.937,
# Nesterov) on losses scaled by the global batch (YOLOv8Head
# loss_batch_scale=True), no weight decay on norms and biases, 3 warm-up
# epochs, then a linear decay to 0.01 x lr; gradient clipping at 10; EMA of
# the weights (mmdet's ExpMomentumEMA) used for validation; Mosaic off for
# the last `close_mosaic_epochs` (PipelineSwitchHook, in the model configs
# next to the pipeline it switches to).
_base_ = 'mmdet::_base_/default_runtime.py'

max_epochs = 300
close_mosaic_epochs = 10
base_lr = 0.01
# YOLOv8 scales the weight decay with the batch: 5e-4 * 128 / 64 for 8x16
weight_decay = 0.0005 * 128 / 64

train_cfg = dict(
    type='EpochBasedTrainLoop',
    max_epochs=max_epochs,
    val_interval=10,
    dynamic_intervals=[(max_epochs - close_mosaic_epochs, 1)])
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='SGD',
        lr=base_lr,
        momentum=0.937,
        weight_decay=weight_decay,
        nesterov=True),
    paramwise_cfg=dict(
        norm_decay_mult=0.0, bias_decay_mult=0.0, bypass_duplicate=True),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.001,
        by_epoch=True,
        begin=0,
        end=3,
        convert_to_iter_based=True),
    dict(
        type='LinearLR',
        start_factor=1.0,
        end_factor=0.01,
        by_epoch=True,
        begin=0,
        end=max_epochs,
        convert_to_iter_based=True),
]

default_hooks = dict(
    checkpoint=dict(
        type='CheckpointHook', interval=10, max_keep_ckpts=3,
        save_best='auto'))
custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0001,
        update_buffers=True,
        strict_load=False,
        priority=49)
]
auto_scale_lr = dict(enable=False, base_batch_size=128)
