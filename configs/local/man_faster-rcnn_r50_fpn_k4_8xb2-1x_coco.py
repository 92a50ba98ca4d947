# MAN (Su et al., ECCV 2024): InfoPro's local loss on y = LB(h) + EMA(h),
# LB / EMA: a learnable and a momentum copy of the next module's first block.
# K=4 split of InfoPro's config (mmdet's frozen stem + layer1 join module 0;
# MAN++'s COCO code trains layer1 and cuts at stage ends instead).
_base_ = './infopro_faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    # memory-balanced for MAN's aux nets (plan_split.py at 1x3x800x1333:
    # estimated step peak 1.23 GiB at [6, 9, 12], 993 MiB here; planned
    # with InfoPro's reconstruction decoder, which the aux no longer has)
    split_points=[4, 7, 14],
    aux=dict(
        _delete_=True,
        type='mmlocal.MomentumAux',
        momentum=0.995,
        # MAN++'s COCO code (retinanet.py): detection loss at weight 1, no
        # reconstruction term (InfoPro's 1.5 is a segmentation setting)
        recon_weight=None,
        task_weight=1.0))
custom_hooks = [
    dict(type='mmlocal.PeakMemoryHook', interval=50),
    dict(type='mmlocal.MomentumAuxHook')
]
