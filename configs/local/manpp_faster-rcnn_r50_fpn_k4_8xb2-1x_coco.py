# MAN++ (Su et al., TPAMI 2026): MAN with a learnable scale per module,
# y = s * LB(h) + (2 - s) * EMA(h).
# K=4 split of InfoPro's config (mmdet's frozen stem + layer1 join module 0;
# MAN++'s COCO code trains layer1 and cuts at stage ends instead).
_base_ = './infopro_faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    # MAN's memory-balanced points (plan_split.py; the scale s adds no memory)
    split_points=[4, 7, 14],
    aux=dict(
        _delete_=True,
        type='mmlocal.MomentumAux',
        momentum=0.995,
        learnable_scale=True,
        # MAN++'s COCO code (retinanet.py): detection loss at weight 1, no
        # reconstruction term (InfoPro's 1.5 is a segmentation setting)
        recon_weight=None,
        task_weight=1.0))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=50),
    dict(type='mmlocal.MomentumAuxHook')
]
