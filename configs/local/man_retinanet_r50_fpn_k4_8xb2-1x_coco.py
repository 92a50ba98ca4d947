# MAN (Su et al., ECCV 2024): InfoPro's local loss on y = LB(h) + EMA(h), where
# LB / EMA are a learnable and a momentum copy of the next module's first block.
# Stage-aligned K=4 split {stem+layer1}, {layer2}, {layer3}, {layer4} as in
# MAN++'s COCO RetinaNet; the EMA copies follow layer2[0], layer3[0], layer4[0].
_base_ = './infopro_retinanet_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    stage_aligned=True,
    aux=dict(_delete_=True, type='mmlocal.MomentumAux', momentum=0.995))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=50),
    dict(type='mmlocal.MomentumAuxHook')
]
