# The demo detector trained with MAN: module 0's local loss (the demo's
# 128-channel detection head, no reconstruction term, as in MAN++'s COCO code)
# sees y = LB(h) + EMA(h), a learnable and a momentum copy of layer3[0], the
# first block of module 1.
_base_ = './infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py'

model = dict(
    aux=dict(
        _delete_=True,
        type='mmlocal.MomentumAux',
        momentum=0.995,
        # MAN++'s COCO code: detection loss only, no reconstruction term
        recon_weight=None,
        det_head=dict(feat_channels=128)))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=10),
    dict(type='mmlocal.MomentumAuxHook')
]
