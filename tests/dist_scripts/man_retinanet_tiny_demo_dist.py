# The tiny demo detector with MAN local learning, gradient clipping,
# mmengine's EMAHook and MomentumAuxHook, for 2-process CPU runs through
# tools/dist_train.sh (tests/test_local_ddp.py). Needs tests/dist_scripts on
# PYTHONPATH (RankStateDumpHook).
_base_ = '../configs/retinanet_tiny_demo.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    num_modules=2,
    aux=dict(type='mmlocal.MomentumAux', momentum=0.9,
             det_head=dict(feat_channels=16), recon=dict(channels=16)))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9),
    clip_grad=dict(max_norm=0.5, norm_type=2))
train_cfg = dict(val_interval=2)  # train, validate (distributed), save
custom_imports = dict(imports=['rank_state_hook'], allow_failed_imports=False)
custom_hooks = [
    dict(type='mmlocal.MomentumAuxHook'),
    dict(type='EMAHook', momentum=0.5),
    dict(type='RankStateDumpHook'),
]
