# The demo detector shrunk for tests: 128 px, batch 2, 2 iterations.
_base_ = '../../configs/demo/retinanet_r18_fpn_1xb4-300i_demo-trees.py'

img_scale = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 2
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2, max_keep_ckpts=-1))
custom_hooks = [dict(type='mmlocal.PeakMemoryHook', interval=1)]
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0, deterministic=False)
# an untrained head scores ~0.01 (focal-loss prior): keep every box so that
# CocoMetric has something to evaluate after 2 iterations
model = dict(test_cfg=dict(score_thr=0.0, nms_pre=100, max_per_img=50))
