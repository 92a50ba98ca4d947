# AugLocal (Ma et al., ICLR 2024): each module's aux net is a stack of freshly
# initialised copies of blocks sampled uniformly from the later layers
# (depth 2, pyramidal decay 0.5), then the task head.
_base_ = './infopro_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    # memory-balanced for this family's aux (copies of later blocks) by
    # tools/analysis/plan_split.py (asked for 2x3x256x512, padded to the
    # 512x1024 crop by the data preprocessor); InfoPro's [12] made module 0
    # the peak
    split_points=[11],
    aux=dict(
        _delete_=True,
        type='mmlocal.AugLocalAux',
        aux_depth=2,
        pyramid_coeff=0.5))
