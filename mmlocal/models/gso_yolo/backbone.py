import copy
from typing import Sequence

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.utils import ConfigType, OptConfigType, OptMultiConfig
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mmlocal.registry import MODELS
from .c2f import C2f
from .sppf import SPPF
from .utils import (check_factor, reset_conv_parameters, scale_channels,
                    scale_depth)


@MODELS.register_module()
class YOLOv8CSPDarknet(BaseModule):
    """The CSP-Darknet backbone of YOLOv8, with GSO-YOLO's attention slots.

    A stride-2 3x3 stem conv, then four stages of a stride-2 3x3 conv and a
    C2f block (:class:`C2f`, shortcuts on); the last stage ends with SPPF
    (:class:`SPPF`). Channels are multiplied by ``widen_factor`` and block
    counts by ``deepen_factor`` (YOLOv8 n/s/m/l/x: 0.33/0.25, 0.33/0.5,
    0.67/0.75, 1/1, 1/1.25 with ``last_stage_out_channels`` 1024, 1024, 768,
    512, 512).

    GSO-YOLO (Zhang et al., arXiv 2407.00906) adds a Global Optimization
    Module before SPPF and a Steady Capture Module after it::

        ... -> conv(s2) -> C2f -> [gom] -> SPPF -> [scm] -> P5

    ``gom`` and ``scm`` are configs of any channel-preserving block, built
    with ``channels`` filled in (``mmlocal.GAMAttention`` and
    ``mmlocal.EMAttention`` in the GSO-YOLO configs); ``None`` leaves the
    slot empty, which is plain YOLOv8 and the ablations.

    Args:
        arch (str): Architecture, only ``'P5'``. Defaults to ``'P5'``.
        last_stage_out_channels (int): Output channels of the last stage
            before widening. Defaults to 1024.
        deepen_factor (float): Depth multiplier. Defaults to 1.0.
        widen_factor (float): Width multiplier. Defaults to 1.0.
        out_indices (Sequence[int]): Outputs, 0 = stem, 1-4 = stages.
            Defaults to (2, 3, 4) (strides 8, 16, 32).
        frozen_stages (int): Stages (and the stem) to freeze; -1 freezes
            none. Defaults to -1.
        gom (dict, optional): Block before SPPF. Defaults to None.
        scm (dict, optional): Block after SPPF. Defaults to None.
        spp_kernel_size (int): SPPF max-pool kernel. Defaults to 5.
        norm_cfg (dict): Norm layer config. Defaults to BN(momentum=0.03,
            eps=0.001).
        act_cfg (dict): Activation config. Defaults to SiLU.
        norm_eval (bool): Keep BN layers in eval mode while training.
            Defaults to False.
        init_cfg (dict or list[dict], optional): Initialization config.
            Defaults to None: the convs get PyTorch's default
            initialisation, as in YOLOv8.
    """
    # in_channels, out_channels, num_blocks of each stage before scaling
    arch_settings = {
        'P5': [[64, 128, 3], [128, 256, 6], [256, 512, 6], [512, None, 3]],
    }
    stem_channels = 64

    def __init__(self,
                 arch: str = 'P5',
                 last_stage_out_channels: int = 1024,
                 deepen_factor: float = 1.0,
                 widen_factor: float = 1.0,
                 out_indices: Sequence[int] = (2, 3, 4),
                 frozen_stages: int = -1,
                 gom: OptConfigType = None,
                 scm: OptConfigType = None,
                 spp_kernel_size: int = 5,
                 norm_cfg: ConfigType = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: ConfigType = dict(type='SiLU', inplace=True),
                 norm_eval: bool = False,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if arch not in self.arch_settings:
            raise ValueError(f'arch={arch!r} is not one of '
                             f'{sorted(self.arch_settings)}')
        deepen_factor = check_factor('deepen_factor', deepen_factor)
        widen_factor = check_factor('widen_factor', widen_factor)
        num_stages = len(self.arch_settings[arch])
        if not set(out_indices) <= set(range(num_stages + 1)):
            raise ValueError(f'out_indices={tuple(out_indices)} must be in '
                             f'range(0, {num_stages + 1})')
        if frozen_stages not in range(-1, num_stages + 1):
            raise ValueError(f'frozen_stages={frozen_stages} must be in '
                             f'range(-1, {num_stages + 1})')
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.stem = ConvModule(
            3,
            scale_channels(self.stem_channels, widen_factor),
            3,
            stride=2,
            padding=1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)
        self.layers = ['stem']
        self.out_channels = [scale_channels(self.stem_channels, widen_factor)]
        for i, (in_ch, out_ch,
                num_blocks) in enumerate(self.arch_settings[arch]):
            is_last = i == num_stages - 1
            if is_last:
                out_ch = last_stage_out_channels
            in_ch = scale_channels(in_ch, widen_factor)
            out_ch = scale_channels(out_ch, widen_factor)
            stage = [
                ConvModule(
                    in_ch,
                    out_ch,
                    3,
                    stride=2,
                    padding=1,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg),
                C2f(out_ch,
                    out_ch,
                    num_blocks=scale_depth(num_blocks, deepen_factor),
                    add_identity=True,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg)
            ]
            if is_last:
                if gom is not None:
                    stage.append(self._build_block(gom, out_ch, 'gom'))
                stage.append(
                    SPPF(
                        out_ch,
                        out_ch,
                        kernel_size=spp_kernel_size,
                        norm_cfg=norm_cfg,
                        act_cfg=act_cfg))
                if scm is not None:
                    stage.append(self._build_block(scm, out_ch, 'scm'))
            self.add_module(f'stage{i + 1}', nn.Sequential(*stage))
            self.layers.append(f'stage{i + 1}')
            self.out_channels.append(out_ch)

    @staticmethod
    def _build_block(cfg: dict, channels: int, option: str) -> nn.Module:
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise ValueError(
                f'{option}={cfg!r} must be None or a config dict with '
                "'type', e.g. dict(type='mmlocal.GAMAttention')")
        cfg = copy.deepcopy(cfg)
        cfg.setdefault('channels', channels)
        return MODELS.build(cfg)

    def init_weights(self) -> None:
        """PyTorch's default initialisation of the convs (YOLOv8's) unless
        ``init_cfg`` asks for another."""
        first_call = not self._is_init
        super().init_weights()
        if self.init_cfg is None and first_call:
            reset_conv_parameters(self)

    def _freeze_stages(self) -> None:
        for name in self.layers[:self.frozen_stages + 1]:
            module = getattr(self, name)
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'YOLOv8CSPDarknet':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple:
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
