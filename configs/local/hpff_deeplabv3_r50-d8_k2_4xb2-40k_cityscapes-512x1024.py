# HPFF (Su et al., ECCV 2024): independent local modules (light head, weight
# 0.001) + cascade modules joining modules k-1 and k (InfoPro loss, weight
# 0.999); the cascade aux's reconstruction decoder runs on 2x2 patches of
# its input (PFF, as the reference), one patch at a time.
_base_ = './infopro_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    aux=dict(
        _delete_=True,
        type='mmlocal.HPFFAux',
        cascade_span=2,
        patch_grid=2,
        # stride-32 maps of padded COCO images are often odd-sized (25x42)
        patch_remainder='uneven',
        independent_weight=0.001,
        cascade_weight=0.999))
