from typing import List, Sequence

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.utils import ConfigType, OptMultiConfig
from mmengine.model import BaseModule
from torch import Tensor

from mmlocal.registry import MODELS
from .c2f import C2f
from .utils import (check_factor, reset_conv_parameters, scale_channels,
                    scale_depth)


@MODELS.register_module()
class YOLOv8PAFPN(BaseModule):
    """The path aggregation FPN of YOLOv8, with C2f blocks.

    Top-down: the coarser map is upsampled (nearest, x2), concatenated with
    the finer backbone map and fused by a C2f block (no shortcuts).
    Bottom-up: the finer output is downsampled by a stride-2 3x3 conv,
    concatenated with the top-down map of the coarser level and fused by a
    C2f block. Unlike YOLOv5/YOLOX there are no 1x1 reduce layers; the
    coarsest level's top-down map is the backbone's P5 itself::

        T5 = P5
        T4 = C2f([up(T5), P4]);   T3 = C2f([up(T4), P3])     (top-down)
        N3 = T3
        N4 = C2f([down(N3), T4]); N5 = C2f([down(N4), T5])   (bottom-up)

    ``in_channels`` and ``out_channels`` are given before widening, so the
    same lists serve every model size.

    Args:
        in_channels (Sequence[int]): Channels of P3, P4, P5 before
            widening. Defaults to (256, 512, 1024).
        out_channels (Sequence[int]): Channels of N3, N4, N5 before
            widening. Defaults to ``in_channels``.
        deepen_factor (float): Depth multiplier. Defaults to 1.0.
        widen_factor (float): Width multiplier. Defaults to 1.0.
        num_csp_blocks (int): Bottlenecks per C2f before deepening.
            Defaults to 3.
        norm_cfg (dict): Norm layer config. Defaults to BN(momentum=0.03,
            eps=0.001).
        act_cfg (dict): Activation config. Defaults to SiLU.
        init_cfg (dict or list[dict], optional): Initialization config.
            Defaults to None: the convs get PyTorch's default
            initialisation, as in YOLOv8.
    """

    def __init__(self,
                 in_channels: Sequence[int] = (256, 512, 1024),
                 out_channels: Sequence[int] = None,
                 deepen_factor: float = 1.0,
                 widen_factor: float = 1.0,
                 num_csp_blocks: int = 3,
                 norm_cfg: ConfigType = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: ConfigType = dict(type='SiLU', inplace=True),
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        out_channels = in_channels if out_channels is None else out_channels
        if len(in_channels) < 2 or len(out_channels) != len(in_channels):
            raise ValueError(
                f'in_channels={list(in_channels)} and out_channels='
                f'{list(out_channels)} must list the same number (>= 2) '
                'of levels')
        deepen_factor = check_factor('deepen_factor', deepen_factor)
        widen_factor = check_factor('widen_factor', widen_factor)
        self.in_channels = [
            scale_channels(c, widen_factor) for c in in_channels
        ]
        self.out_channels = [
            scale_channels(c, widen_factor) for c in out_channels
        ]
        num_blocks = scale_depth(num_csp_blocks, deepen_factor)
        num_levels = len(self.in_channels)

        def c2f(in_ch, out_ch):
            return C2f(
                in_ch,
                out_ch,
                num_blocks=num_blocks,
                add_identity=False,
                norm_cfg=norm_cfg,
                act_cfg=act_cfg)

        self.upsample = nn.Upsample(scale_factor=2, mode='nearest')
        # top-down, from coarse to fine: the output of level i-1
        self.top_down_channels = list(self.in_channels)
        self.top_down_layers = nn.ModuleList()
        for i in range(num_levels - 1, 0, -1):
            block = c2f(self.top_down_channels[i] + self.in_channels[i - 1],
                        self.out_channels[i - 1])
            self.top_down_layers.insert(0, block)
            self.top_down_channels[i - 1] = self.out_channels[i - 1]
        # bottom-up, from fine to coarse: downsample level i, fuse at i+1
        self.downsample_layers = nn.ModuleList()
        self.bottom_up_layers = nn.ModuleList()
        for i in range(num_levels - 1):
            self.downsample_layers.append(
                ConvModule(
                    self.out_channels[i],
                    self.out_channels[i],
                    3,
                    stride=2,
                    padding=1,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg))
            self.bottom_up_layers.append(
                c2f(self.out_channels[i] + self.top_down_channels[i + 1],
                    self.out_channels[i + 1]))

    def init_weights(self) -> None:
        """PyTorch's default initialisation of the convs (YOLOv8's) unless
        ``init_cfg`` asks for another."""
        first_call = not self._is_init
        super().init_weights()
        if self.init_cfg is None and first_call:
            reset_conv_parameters(self)

    def forward(self, inputs: Sequence[Tensor]) -> tuple:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'{type(self).__name__} expects '
                             f'{len(self.in_channels)} levels, got '
                             f'{len(inputs)}')
        # top-down
        top_down: List[Tensor] = list(inputs)
        for i in range(len(inputs) - 1, 0, -1):
            top_down[i - 1] = self.top_down_layers[i - 1](
                torch.cat([self.upsample(top_down[i]), inputs[i - 1]], 1))
        # bottom-up
        outs = [top_down[0]]
        for i in range(len(inputs) - 1):
            outs.append(self.bottom_up_layers[i](torch.cat(
                [self.downsample_layers[i](outs[-1]), top_down[i + 1]], 1)))
        return tuple(outs)
