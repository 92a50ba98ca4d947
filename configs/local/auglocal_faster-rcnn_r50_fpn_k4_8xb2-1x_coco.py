# AugLocal (Ma et al., ICLR 2024): each module's aux net is a stack of freshly
# initialised copies of blocks sampled uniformly from the later layers
# (depth 2, pyramidal decay 0.5), then the task head.
_base_ = './infopro_faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    # memory-balanced for AugLocal's aux nets (plan_split.py at 1x3x800x1333:
    # estimated step peak 985 MiB at [6, 9, 12], 846 MiB here)
    split_points=[5, 8, 15],
    aux=dict(
        _delete_=True,
        type='mmlocal.AugLocalAux',
        aux_depth=2,
        pyramid_coeff=0.5))
