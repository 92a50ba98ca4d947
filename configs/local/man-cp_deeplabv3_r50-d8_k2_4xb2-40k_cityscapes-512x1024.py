# The MAN K=2 config with activation checkpointing where it pays most
# (docs/local_learning.md, "Checkpointing backbone blocks"): the aux nets
# (with_cp: LB / EMA copy, head, decoder recomputed in the local backward) and
# blocks 0 (layer1.0), 13, 14 (layer4.0, layer4.1, in the last module with the
# ASPP head). Same gradients and BN statistics; one more forward of those
# blocks (~11 % more step FLOPs). CPU, 2x3x512x1024: module peaks 2.41 / 2.57
# GiB vs 2.98 / 3.19 without (e2e 5.19 GiB on the CPU, 4.78 on the H200).
_base_ = './man_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(aux=dict(with_cp=True), checkpoint_blocks=[0, 13, 14])
