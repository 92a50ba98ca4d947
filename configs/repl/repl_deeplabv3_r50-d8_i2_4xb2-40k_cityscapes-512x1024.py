# DeepLabV3 R50-D8 with Replacement Learning: every 2nd block of each ResNet
# stage is synthesised from its neighbours (v2-style low-rank channel
# mixing). The dilations of the replaced blocks are their own (stock code);
# the model-level `pretrained` reaches the inner backbone.
_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmlocal.RepLBackbone',
        backbone={{_base_.model.backbone}},
        interval=2,
        transform=dict(type='mmlocal.RepLLowRankMix', rank=4),
        layer='light'))
