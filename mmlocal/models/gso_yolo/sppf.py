import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.utils import ConfigType, OptMultiConfig
from mmengine.model import BaseModule
from torch import Tensor


class SPPF(BaseModule):
    r"""Spatial Pyramid Pooling - Fast (YOLOv5/YOLOv8).

    A 1x1 conv halves the channels, three max-pools of kernel ``k`` (stride
    1) are chained, the input of the first and the three outputs are
    concatenated and fused by a 1x1 conv:

    .. math::
        y_0 = \mathrm{conv}_{1\times1}(x),\quad
        y_{i+1} = \mathrm{MaxPool}_k(y_i),\quad
        out = \mathrm{conv}_{1\times1}([y_0, y_1, y_2, y_3])

    Chained k=5 pools see the same 5/9/13 windows as the parallel pools of
    SPP (mmdet's ``SPPBottleneck``) at a lower cost.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Max-pool kernel. Defaults to 5.
        norm_cfg (dict): Norm layer config. Defaults to BN(momentum=0.03,
            eps=0.001).
        act_cfg (dict): Activation config. Defaults to SiLU.
        init_cfg (dict or list[dict], optional): Initialization config.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 5,
                 norm_cfg: ConfigType = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: ConfigType = dict(type='SiLU', inplace=True),
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        mid_channels = in_channels // 2
        self.conv1 = ConvModule(
            in_channels, mid_channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.pool = nn.MaxPool2d(
            kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
        self.conv2 = ConvModule(
            mid_channels * 4,
            out_channels,
            1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.conv1(x)]
        for _ in range(3):
            outs.append(self.pool(outs[-1]))
        return self.conv2(torch.cat(outs, dim=1))
