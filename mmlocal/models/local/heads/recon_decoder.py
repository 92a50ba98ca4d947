import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule

from mmlocal.registry import MODELS


@MODELS.register_module()
class ReconDecoder(BaseModule):
    """Image-reconstruction decoder of InfoPro (Wang et al., ICLR 2021).

    ``L_recons = BCE(sigmoid(D(y)), x_img)``, where ``x_img`` is the
    un-normalised input image in [0, 1]. Following InfoPro's ImageNet and
    Cityscapes decoders: a 1x1 projection, then repeated ``x2 upsample ->
    3x3 conv -> BN -> ReLU`` with narrowing widths, and a 3x3 conv to 3
    channels with a sigmoid.

    Deviation: the target is the image at ``1 / out_stride`` of the input
    resolution (average-pooled), not full resolution, so that the decoder's
    activations do not dominate a detector's memory at 800x1333 inputs;
    ``out_stride=1`` gives InfoPro's full-resolution target.

    Args:
        in_channels (int): Channels of ``y``.
        stride (int): Stride of ``y``.
        out_stride (int): Stride of the reconstructed image. Default 4.
        channels (int): Width after the projection. Default 128.
    """

    def __init__(self, in_channels, stride, out_stride=4, channels=128,
                 norm_cfg=dict(type='BN'), init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if out_stride > stride or stride % out_stride:
            raise ValueError(f'out_stride={out_stride} must divide the '
                             f'feature stride {stride}')
        self.out_stride = out_stride
        self.proj = ConvModule(in_channels, channels, 1, norm_cfg=norm_cfg)
        ups = []
        width = channels
        for _ in range(int(math.log2(stride // out_stride))):
            nxt = max(width // 2, 16)
            ups += [
                nn.Upsample(scale_factor=2, mode='bilinear',
                            align_corners=False),
                ConvModule(width, nxt, 3, padding=1, norm_cfg=norm_cfg)
            ]
            width = nxt
        self.ups = nn.Sequential(*ups)
        self.to_rgb = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, y):
        return self.to_rgb(self.ups(self.proj(y)))

    def loss(self, y, image01):
        """BCE between the decoded image and ``image01`` (N, 3, H, W)."""
        logits = self(y)
        target = image01
        if self.out_stride > 1:
            target = F.avg_pool2d(target, self.out_stride, ceil_mode=True)
        if target.shape[-2:] != logits.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:],
                                   mode='bilinear', align_corners=False)
        # logits version of BCE(sigmoid(.)) is the numerically safe one
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return F.binary_cross_entropy_with_logits(
                logits.float(), target.float().clamp(0, 1))
