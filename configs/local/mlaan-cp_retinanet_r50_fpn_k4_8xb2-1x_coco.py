# The MLAAN K=4 RetinaNet config with activation checkpointing
# (docs/local_learning.md, "Checkpointing backbone blocks"): the aux nets
# (with_cp: the copied blocks of each leap stack, the heads) and every block
# that is not the last of its module (layer1 is frozen and saves nothing);
# split where plan_split.py balances the modules with the aux checkpointed and
# the focal loss as on a GPU (--cuda-like-focal-loss). Same gradients and BN
# statistics; one more forward of those blocks. CPU with the GPU's focal loss,
# 2x3x800x1333: module peaks 0.87 / 1.18 / 1.29 / 1.40 GiB, step 1.40 GiB =
# 0.50x e2e (2.79 GiB; the H200 measured 2.80); MLAAN [4, 8, 15] on the H200:
# 2.01 GiB (0.72x).
_base_ = './mlaan_retinanet_r50_fpn_k4_8xb2-1x_coco.py'

model = dict(
    split_points=[5, 6, 11],
    aux=dict(with_cp=True),
    checkpoint_blocks=[3, 6, 7, 8, 9, 11, 12, 13, 14])
