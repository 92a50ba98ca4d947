# MLAAN (Zhang et al., AAAI 2025): multilaminar modules (independent + cascade
# over 2 modules) whose cascade aux is a leap augmented module: copies of 2
# later blocks, the first one learnable + EMA (MomentumAuxHook updates all).
_base_ = './infopro_faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    # memory-balanced for MLAAN's leap aux nets (plan_split.py at
    # 1x3x800x1333: estimated step peak 1.32 GiB at [6, 9, 12], 1.11 GiB here)
    split_points=[5, 6, 11],
    aux=dict(
        _delete_=True,
        type='mmlocal.MLAANAux',
        cascade_span=2,
        aux_depth=2,
        momentum=0.995))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=50),
    dict(type='mmlocal.MomentumAuxHook')
]
