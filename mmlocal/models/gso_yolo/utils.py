import math

import torch.nn as nn


def scale_channels(channels: int,
                   widen_factor: float,
                   divisor: int = 8) -> int:
    """Channels of a YOLOv8 layer at width ``widen_factor``.

    ``ceil(channels * widen_factor / divisor) * divisor``: every layer keeps
    a multiple of ``divisor`` channels, as in YOLOv8's ``make_divisible``.
    """
    return max(divisor,
               int(math.ceil(channels * widen_factor / divisor) * divisor))


def scale_depth(num_blocks: int, deepen_factor: float) -> int:
    """Blocks of a YOLOv8 C2f layer at depth ``deepen_factor``:
    ``max(round(num_blocks * deepen_factor), 1)``."""
    return max(round(num_blocks * deepen_factor), 1)


def check_factor(name: str, value: float) -> float:
    """A positive depth/width multiplier, or a ValueError naming it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or value <= 0:
        raise ValueError(f'{name}={value!r} must be a positive number')
    return float(value)


def reset_conv_parameters(module: nn.Module) -> None:
    """Give every ``nn.Conv2d`` in ``module`` PyTorch's default initialisation
    (Kaiming-uniform weights with a = sqrt(5)), which YOLOv8 trains from,
    in place of the Kaiming-normal one of mmcv's ``ConvModule``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
