import torch
import torch.nn as nn
from mmdet.utils import OptMultiConfig
from mmengine.model import BaseModule
from torch import Tensor

from mmlocal.registry import MODELS


@MODELS.register_module()
class EMAttention(BaseModule):
    r"""Efficient Multi-scale Attention (EMA), our block for GSO-YOLO's
    Steady Capture Module (SCM).

    GSO-YOLO (Zhang et al., arXiv 2407.00906) places SCM after the SPPF of
    its YOLOv8 backbone. The only text of the paper we could reach names the
    module "Exponential Moving Average (EMA"; we read it as Efficient
    Multi-scale Attention (Ouyang et al., `Efficient Multi-Scale Attention
    Module with Cross-Spatial Learning <https://arxiv.org/abs/2305.13563>`_,
    ICASSP 2023), the attention block usually called EMA in YOLO papers (a
    moving average of weights is not a layer after SPPF); the backbone's
    ``scm`` option takes any block. Nothing reachable gives GSO-YOLO's group
    count.

    The channels are split into ``G`` groups, each processed as a
    (C/G)-channel map ``x_g`` (batch B*G) by two parallel branches:

    - 1x1 branch: average pooling along W and along H, a shared 1x1 conv
      over the concatenated pooled vectors, split back:
      :math:`x_1 = \mathrm{GN}(x_g \cdot \sigma(a_h) \cdot \sigma(a_w))`;
    - 3x3 branch: :math:`x_2 = \mathrm{Conv}_{3\times3}(x_g)`.

    Cross-spatial learning: the global average of each branch, softmaxed
    over channels, weights the other branch's pixels,

    .. math::
        W = \mathrm{softmax}(\mathrm{GAP}(x_1))^{\top} x_2
          + \mathrm{softmax}(\mathrm{GAP}(x_2))^{\top} x_1, \quad
        out_g = x_g \cdot \sigma(W)

    and the groups are put back together; the output has the input's shape.

    Args:
        channels (int): Channels of the input (and output).
        groups (int): Channel groups ``G`` (``factor`` in the EMA authors'
            code, whose default is 32; GSO-YOLO gives no value). Must divide
            ``channels``. Defaults to 32: the reference default, and it
            divides the SCM input at every YOLOv8 width (n 256, s 512,
            m 576, l 512, x 640 channels: 8 to 20 channels a group).
        init_cfg (dict or list[dict], optional): Initialization config.
    """

    def __init__(self,
                 channels: int,
                 groups: int = 32,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(
                f'groups={groups!r} must be a positive int dividing '
                f'channels={channels}')
        self.groups = groups
        group_channels = channels // groups
        self.conv1x1 = nn.Conv2d(group_channels, group_channels, 1)
        self.conv3x3 = nn.Conv2d(group_channels, group_channels, 3, padding=1)
        # one group per channel: GroupNorm normalises each map on its own
        self.norm = nn.GroupNorm(group_channels, group_channels)

    @staticmethod
    def _channel_descriptor(x: Tensor) -> Tensor:
        """Softmax over channels of the global average: (N, 1, C)."""
        return x.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_g = x.reshape(b * self.groups, c // self.groups, h, w)
        # 1x1 branch: directional pooling and a shared 1x1 conv
        pooled_h = x_g.mean(dim=3, keepdim=True)
        pooled_w = x_g.mean(dim=2, keepdim=True).transpose(2, 3)
        att_h, att_w = self.conv1x1(torch.cat([pooled_h, pooled_w],
                                              dim=2)).split([h, w], dim=2)
        x1 = self.norm(x_g * att_h.sigmoid() * att_w.transpose(2, 3).sigmoid())
        # 3x3 branch: local multi-scale context
        x2 = self.conv3x3(x_g)
        # cross-spatial learning
        weights = (
            self._channel_descriptor(x1) @ x2.flatten(2) +
            self._channel_descriptor(x2) @ x1.flatten(2))
        weights = weights.reshape(b * self.groups, 1, h, w).sigmoid()
        return (x_g * weights).reshape(b, c, h, w)
