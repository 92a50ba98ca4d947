# MAN (Su et al., ECCV 2024): InfoPro's local loss on y = LB(h) + EMA(h),
# LB / EMA: a learnable and a momentum copy of the next module's first block.
_base_ = './infopro_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    # memory-balanced for MAN's aux (a copy of the next block) by plan_split.py
    split_points=[11],
    aux=dict(_delete_=True, type='mmlocal.MomentumAux', momentum=0.995))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=50),
    dict(type='mmlocal.MomentumAuxHook')
]
