import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.utils import ConfigType, OptMultiConfig
from mmengine.model import BaseModule
from torch import Tensor


class C2fBottleneck(BaseModule):
    """The bottleneck inside a C2f block: two 3x3 convs and a shortcut.

    ``y = x + conv2(conv1(x))`` (without ``x`` when ``add_identity`` is
    False), hidden width ``int(out_channels * expansion)``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        expansion (float): Hidden width ratio. Defaults to 1.0.
        add_identity (bool): Add the shortcut (only when ``in_channels ==
            out_channels``). Defaults to True.
        norm_cfg (dict): Norm layer config. Defaults to BN(momentum=0.03,
            eps=0.001).
        act_cfg (dict): Activation config. Defaults to SiLU.
        init_cfg (dict or list[dict], optional): Initialization config.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 expansion: float = 1.0,
                 add_identity: bool = True,
                 norm_cfg: ConfigType = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: ConfigType = dict(type='SiLU', inplace=True),
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        hidden_channels = int(out_channels * expansion)
        self.conv1 = ConvModule(
            in_channels,
            hidden_channels,
            3,
            padding=1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)
        self.conv2 = ConvModule(
            hidden_channels,
            out_channels,
            3,
            padding=1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class C2f(BaseModule):
    r"""C2f: the CSP block of YOLOv8 with two convolutions and all bottleneck
    outputs concatenated.

    ``main_conv`` (1x1) maps the input to ``2c`` channels
    (``c = int(out_channels * expansion)``) and splits them into two chunks;
    ``n`` bottlenecks run one after the other on the last chunk and every
    output is appended, then the ``(2 + n) c`` channels are fused by
    ``final_conv`` (1x1):

    .. math::
        [y_0, y_1] = \mathrm{split}(\mathrm{conv}_{1\times1}(x)), \quad
        y_{i+1} = \mathrm{Bottleneck}_i(y_i), \quad
        out = \mathrm{conv}_{1\times1}([y_0, y_1, \dots, y_{n+1}])

    Written from the YOLOv8 architecture description (Jocher et al.,
    Ultralytics 2023).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        num_blocks (int): Number of bottlenecks ``n``. Defaults to 1.
        expansion (float): Ratio of ``c`` to ``out_channels``.
            Defaults to 0.5.
        add_identity (bool): Shortcuts in the bottlenecks (True in the
            backbone, False in the neck). Defaults to True.
        norm_cfg (dict): Norm layer config. Defaults to BN(momentum=0.03,
            eps=0.001).
        act_cfg (dict): Activation config. Defaults to SiLU.
        init_cfg (dict or list[dict], optional): Initialization config.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 num_blocks: int = 1,
                 expansion: float = 0.5,
                 add_identity: bool = True,
                 norm_cfg: ConfigType = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: ConfigType = dict(type='SiLU', inplace=True),
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.mid_channels = int(out_channels * expansion)
        self.main_conv = ConvModule(
            in_channels,
            2 * self.mid_channels,
            1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)
        self.blocks = nn.ModuleList(
            C2fBottleneck(
                self.mid_channels,
                self.mid_channels,
                expansion=1.0,
                add_identity=add_identity,
                norm_cfg=norm_cfg,
                act_cfg=act_cfg) for _ in range(num_blocks))
        self.final_conv = ConvModule(
            (2 + num_blocks) * self.mid_channels,
            out_channels,
            1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)

    def forward(self, x: Tensor) -> Tensor:
        outs = list(self.main_conv(x).chunk(2, dim=1))
        for block in self.blocks:
            outs.append(block(outs[-1]))
        return self.final_conv(torch.cat(outs, dim=1))
