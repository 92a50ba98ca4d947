# HPFF (Su et al., ECCV 2024): independent local modules (light head, weight
# 0.001) + cascade modules joining modules k-1 and k (InfoPro loss, weight
# 0.999); the cascade aux's reconstruction decoder runs on 2x2 patches of
# its input (PFF, as the reference), one patch at a time: at 2x3x800x1333
# the 4 patches as one stacked batch (patch_batch=True) raise the step peak
# from 1.61 to 1.73 GiB (module 1; no PFF: 1.64) for 15 % fewer kernels
# (2113 -> 1804; docs/methods/hpff.md) -- set it where time matters more.
_base_ = './infopro_retinanet_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    # memory-balanced for HPFF's 2-module windows with PFF (plan_split.py at
    # 1x3x800x1333: largest module 893 MiB vs 980 MiB at InfoPro's [4, 8, 15])
    split_points=[6, 7, 15],
    aux=dict(
        _delete_=True,
        type='mmlocal.HPFFAux',
        cascade_span=2,
        patch_grid=2,
        # stride-32 maps of padded COCO images are often odd-sized (25x42)
        patch_remainder='uneven',
        patch_parts='recon',
        patch_batch=False,
        independent_weight=0.001,
        cascade_weight=0.999))
