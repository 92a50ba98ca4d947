import math

import torch
import torch.nn as nn

from mmlocal.registry import MODELS


class BaseRepLTransform(nn.Module):
    """A learnable map from two neighbour tensors to a synthesised tensor.

    Replacement Learning (RepL) synthesises the parameters of a removed
    block ``k`` from those of its neighbours:

    .. math::  W_k = \\mathcal{T}_\\phi(W_{k-1}, W_{k+1})

    Every tensor handed to :meth:`forward` has its **output channels on
    dim 0** (conv ``[C_out, C_in, kh, kw]``, linear ``[C_out, C_in]``,
    attention ``in_proj_weight [3D, D]``, norm and bias vectors ``[C]``), so
    one transform can serve every tensor of a layer (its weight and its
    bias). ``prev`` and ``next`` always have the same shape; when only one
    neighbour provides a tensor of the right shape, the caller passes it
    twice (the *mirror* fusion rule of :class:`RepLBackbone`).

    Attributes:
        per_block (bool): True when one instance serves a whole replaced
            block (it does not depend on channel counts); False when one
            instance is built per layer with ``num_channels`` = that layer's
            output channels.
        column_separable (bool): True when ``T`` maps every column of the
            ``C_out x (rest)`` matrices alike (the same function of
            ``(prev[:, j], next[:, j])`` for every ``j``): the vectors
            sharing a transform and ``C_out`` (a norm's weight and bias; with
            a per-block transform, all vectors of that width) are then
            stacked as columns and mapped in one call. Default False (a
            custom transform gets each tensor on its own).
    """

    per_block = False
    column_separable = False

    def forward(self, prev, next):  # noqa: A002 - the paper's k+1
        raise NotImplementedError

    @staticmethod
    def _per_channel(vector, like):
        """``[C]`` -> ``[C, 1, ..., 1]`` broadcastable against ``like``."""
        return vector.reshape((-1, ) + (1, ) * (like.dim() - 1))


@MODELS.register_module()
class RepLScalarMix(BaseRepLTransform):
    """RepL v1 parameter integration: two learnable scalars per replaced
    block (Zhang et al., "Replacement Learning: Training Vision Tasks with
    Fewer Learnable Parameters", arXiv 2410.01239).

    .. math::  W_k = a \\, W_{k-1} + b \\, W_{k+1}

    ``a`` weighs the preceding block ("history"), ``b`` the succeeding one
    ("new input"). One instance (two parameters) serves every tensor of the
    replaced block, which is the literal reading of "two learnable
    parameters per replaced layer" (the formula itself is not published:
    METHODS.md §4.2).

    Args:
        num_channels (int, optional): Ignored (per-block transform); accepted
            so that all transforms are built the same way.
        init (tuple[float, float]): Initial ``(a, b)``. Default
            ``(0.5, 0.5)``: the synthesised operator starts as the mean of
            its neighbours.
    """

    per_block = True
    column_separable = True

    def __init__(self, num_channels=None, init=(0.5, 0.5)):
        super().__init__()
        a, b = _pair_of_floats(init, 'init', type(self).__name__)
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, prev, next):  # noqa: A002
        return self.a * prev + self.b * next


@MODELS.register_module()
class RepLChannelMix(BaseRepLTransform):
    """Per-output-channel mix of the neighbours' operators.

    .. math::  W_k[c] = a_c \\, W_{k-1}[c] + b_c \\, W_{k+1}[c],
               \\qquad c = 1 .. C_{out}

    Each output filter (or norm channel, or bias entry) of the synthesised
    operator balances history and new input on its own. One instance per
    layer of the replaced block: ``2 * C_out`` parameters.

    Args:
        num_channels (int): ``C_out`` of the layer.
        init (tuple[float, float]): Initial value of every ``a_c`` and
            ``b_c``. Default ``(0.5, 0.5)``.
    """

    column_separable = True

    def __init__(self, num_channels, init=(0.5, 0.5)):
        super().__init__()
        num_channels = _positive_int(num_channels, 'num_channels',
                                     type(self).__name__)
        a, b = _pair_of_floats(init, 'init', type(self).__name__)
        self.a = nn.Parameter(torch.full((num_channels, ), a))
        self.b = nn.Parameter(torch.full((num_channels, ), b))

    def forward(self, prev, next):  # noqa: A002
        return torch.addcmul(
            self._per_channel(self.b, next) * next,
            self._per_channel(self.a, prev), prev)


@MODELS.register_module()
class RepLLowRankMix(BaseRepLTransform):
    """RepL v2-style learnable transformation: low-rank channel mixing.

    The synthesised operator's output channels are learnable combinations of
    **all** output channels (filters) of both neighbours, not only of the
    filter with the same index:

    .. math::  W_k = A \\, W_{k-1} + B \\, W_{k+1}, \\quad
               A = \\mathrm{diag}(a) + U_a V_a^\\top, \\quad
               B = \\mathrm{diag}(b) + U_b V_b^\\top

    with ``W`` seen as a ``C_out x (rest)`` matrix, ``a, b`` in
    ``R^{C_out}`` and ``U, V`` in ``R^{C_out x r}``. ``U`` starts at zero
    and ``V`` random (LoRA-style), so the initial operator is the
    per-channel mix ``diag(a) W_{k-1} + diag(b) W_{k+1}`` and both factors
    receive gradient after the first step. Parameters per layer:
    ``2 * C_out * (1 + 2 r)``. Cost per synthesis: ``O(r * numel(W))``.

    Args:
        num_channels (int): ``C_out`` of the layer.
        rank (int): ``r``, clipped to ``C_out``. Default 4.
        init (tuple[float, float]): Initial ``a_c`` and ``b_c``. Default
            ``(0.5, 0.5)``.
    """

    column_separable = True

    def __init__(self, num_channels, rank=4, init=(0.5, 0.5)):
        super().__init__()
        name = type(self).__name__
        num_channels = _positive_int(num_channels, 'num_channels', name)
        rank = min(_positive_int(rank, 'rank', name), num_channels)
        a, b = _pair_of_floats(init, 'init', name)
        self.rank = rank
        self.a = nn.Parameter(torch.full((num_channels, ), a))
        self.b = nn.Parameter(torch.full((num_channels, ), b))
        self.u_a = nn.Parameter(torch.zeros(num_channels, rank))
        self.u_b = nn.Parameter(torch.zeros(num_channels, rank))
        std = 1. / math.sqrt(num_channels)
        self.v_a = nn.Parameter(torch.randn(num_channels, rank) * std)
        self.v_b = nn.Parameter(torch.randn(num_channels, rank) * std)

    def forward(self, prev, next):  # noqa: A002
        # 6 kernels: diag(b) W+ , + diag(a) W-, + U_a (V_a^T W-),
        # + U_b (V_b^T W+) (a step launches this for every synthesised
        # tensor, so the kernel count is what a GPU pays)
        p = prev.reshape(prev.shape[0], -1)
        n = next.reshape(next.shape[0], -1)
        out = torch.addcmul(self.b[:, None] * n, self.a[:, None], p)
        out = torch.addmm(out, self.u_a, self.v_a.t() @ p)
        out = torch.addmm(out, self.u_b, self.v_b.t() @ n)
        return out.reshape(prev.shape)


def _pair_of_floats(value, option, owner):
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f'{owner}: {option}={value!r} must be two numbers '
                         '(a, b)') from None
    return a, b


def _positive_int(value, option, owner):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{owner}: {option}={value!r} must be a positive '
                         'int')
    return value
