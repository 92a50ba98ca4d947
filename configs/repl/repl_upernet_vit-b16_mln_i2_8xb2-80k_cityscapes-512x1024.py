# UPerNet ViT-B/16 with Replacement Learning: transformer layers 1, 3, ..., 11
# are synthesised from their neighbours (qkv, proj, both MLP layers and both
# LayerNorms; layer 11 from layer 10 alone), v2-style low-rank channel mixing.
_base_ = './upernet_vit-b16_mln_8xb2-80k_cityscapes-512x1024.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmlocal.RepLBackbone',
        backbone={{_base_.model.backbone}},
        interval=2,
        transform=dict(type='mmlocal.RepLLowRankMix', rank=4),
        layer='light'))
