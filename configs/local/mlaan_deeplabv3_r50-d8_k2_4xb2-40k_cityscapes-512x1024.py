# MLAAN (Zhang et al., AAAI 2025): multilaminar modules (independent + cascade
# over 2 modules) whose cascade aux is a leap augmented module: copies of 2
# later blocks, the first one learnable + EMA (MomentumAuxHook updates all).
_base_ = './infopro_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    # memory-balanced for this family's aux (copies of later blocks) by
    # tools/analysis/plan_split.py (asked for 2x3x256x512, padded to the
    # 512x1024 crop by the data preprocessor); InfoPro's [12] made module 0
    # the peak
    split_points=[10],
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
