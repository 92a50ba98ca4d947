"""Minimal build arguments of the Replacement Learning (RepL) names."""

BUILD_CFGS = {
    ('MODELS', 'RepLBackbone'):
    lambda: dict(
        backbone=dict(type='mmdet.ResNet', depth=18, init_cfg=None),
        interval=2),
    ('MODELS', 'RepLScalarMix'):
    lambda: dict(),
    ('MODELS', 'RepLChannelMix'):
    lambda: dict(num_channels=4),
    ('MODELS', 'RepLLowRankMix'):
    lambda: dict(num_channels=4, rank=2),
}
