# The demo detector trained with MLAAN, K=4: independent + cascade losses
# (span 2); the cascade aux is a leap stack of 2 later blocks whose first is
# learnable + EMA (MomentumAuxHook updates every module's EMA copy).
_base_ = './infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py'

model = dict(
    num_modules=4,
    aux=dict(
        _delete_=True,
        type='mmlocal.MLAANAux',
        cascade_span=2,
        aux_depth=2,
        momentum=0.995,
        det_head=dict(feat_channels=128)))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=10),
    dict(type='mmlocal.MomentumAuxHook')
]
