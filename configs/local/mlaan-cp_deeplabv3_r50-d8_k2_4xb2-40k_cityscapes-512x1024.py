# The MLAAN K=2 config with activation checkpointing (docs/local_learning.md,
# "Checkpointing backbone blocks"): the aux net (with_cp: each copied block of
# the leap stack, the heads) and blocks 0-2 (layer1), 7, 8 (layer3.0, 3.1) in
# module 0 and 13, 14 (layer4.0, 4.1) in the last module. Same gradients and BN
# statistics; one more forward of those blocks (~14 % more step FLOPs). CPU,
# 2x3x512x1024: module peaks 2.11 / 2.78 GiB vs 3.35 / 3.41 without (e2e 5.19
# GiB on the CPU, 4.78 on the H200).
_base_ = './mlaan_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(aux=dict(with_cp=True), checkpoint_blocks=[0, 1, 2, 7, 8, 13, 14])
