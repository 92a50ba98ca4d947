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
    #: ``batched(params, pn, scale=None)`` (a classmethod, optional): the
    #: same map for ``n`` instances at once; ``pn`` is ``(2n, C_out,
    #: cols)``, the ``n`` ``prev`` then the ``n`` ``next`` tensors, and
    #: ``params[(x, y)]`` for each pair of :attr:`pairs` the ``n``
    #: instances' parameter ``x`` then their ``y``, stacked on a new dim 0
    #: (the prev side's parameter, then the next side's): both sides are
    #: mapped in the same ops; ``scale`` ``(n, C_out)``, if given,
    #: multiplies each output row (a norm folded into its conv)
    batched = None
    #: ``'channel'`` or ``'low_rank'`` when :attr:`batched` is the
    #: per-channel or the low-rank mix (the batched synthesis can then map
    #: matrices of every shape in one tiled call); None otherwise
    tiled = None
    #: parameter pairs ``(prev side, next side)`` of :attr:`batched`
    pairs = ()

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

    pairs = (('a', 'b'), )

    @classmethod
    def batched(cls, params, pn, scale=None):
        n2 = pn.shape[0]
        both = params[('a', 'b')].view(n2, 1, 1) * pn
        out = both.view((2, n2 // 2) + pn.shape[1:]).sum(0)
        return out if scale is None else out * scale.unsqueeze(-1)


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

    pairs = (('a', 'b'), )
    tiled = 'channel'

    @classmethod
    def batched(cls, params, pn, scale=None):
        both = params[('a', 'b')][..., None] * pn
        out = both.view((2, pn.shape[0] // 2) + pn.shape[1:]).sum(0)
        return out if scale is None else out * scale.unsqueeze(-1)


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

    pairs = (('a', 'b'), ('u_a', 'u_b'), ('v_a', 'v_b'))
    tiled = 'low_rank'

    @classmethod
    def batched(cls, params, pn, scale=None):
        # [A W- ; B W+] = diag-part + U (V^T W) for both sides in one
        # bmm each, then the two sides summed: 4 ops for n instances
        # forward, 7 backward (_LowRankBatched)
        return _LowRankBatched.apply(params[('a', 'b')],
                                     params[('u_a', 'u_b')],
                                     params[('v_a', 'v_b')], pn, scale)


class _LowRankBatched(torch.autograd.Function):
    """:meth:`RepLLowRankMix.batched` with a hand-written backward.

    ``ab`` ``(2n, C)``, ``u`` and ``v`` ``(2n, C, r)``, ``pn`` ``(2n, C,
    cols)`` (the ``n`` prev-side items, then the ``n`` next-side ones),
    ``scale`` ``(n, C)`` or None. Returns ``scale * (A_i W_i^- + B_i
    W_i^+)``, ``(n, C, cols)``. Autograd through the same ops launches 11
    kernels in backward, 14 with the scale (a norm folded into the conv);
    this backward computes the same gradients in 7 (8): the output gradient
    is expanded to both sides once (scaled in the same op), every product
    is one batched matrix product, and the gradient of the diagonal
    coefficients is a batch of dot products.
    """

    @staticmethod
    def forward(ctx, ab, u, v, pn, scale):
        n = pn.shape[0] // 2
        low_t = torch.bmm(pn.transpose(1, 2), v)  # (2n, cols, r)
        both = torch.baddbmm(ab.unsqueeze(-1) * pn, u, low_t.transpose(1, 2))
        out = torch.add(both[:n], both[n:])
        if scale is None:
            ctx.save_for_backward(ab, u, v, pn, low_t)
            return out
        ctx.save_for_backward(ab, u, v, pn, low_t, scale, out)
        return out * scale.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad):
        ab, u, v, pn, low_t, *rest = ctx.saved_tensors
        n2, c, cols = pn.shape
        both = grad.unsqueeze(0).expand((2, ) + grad.shape)
        grad_scale = None
        if rest:
            scale, out = rest
            g2 = both * scale.unsqueeze(-1)  # (2, n, C, cols)
            if ctx.needs_input_grad[4]:  # sum_j g * out, per (item, C)
                grad_scale = torch.bmm(
                    grad.reshape(-1, 1, cols),
                    out.reshape(-1, cols, 1)).view(scale.shape)
        else:
            g2 = both.contiguous()
        g2 = g2.view(n2, c, cols)
        grad_ab = grad_u = grad_v = grad_pn = None
        if ctx.needs_input_grad[1]:
            grad_u = torch.bmm(g2, low_t)
        grad_low = torch.bmm(u.transpose(1, 2), g2)  # (2n, r, cols)
        if ctx.needs_input_grad[2]:
            grad_v = torch.bmm(pn, grad_low.transpose(1, 2))
        if ctx.needs_input_grad[3]:
            grad_pn = torch.baddbmm(ab.unsqueeze(-1) * g2, v, grad_low)
        if ctx.needs_input_grad[0]:  # sum_j g * W, per (side, item, C)
            grad_ab = torch.bmm(g2.view(-1, 1, cols),
                                pn.reshape(-1, cols, 1)).view(ab.shape)
        return grad_ab, grad_u, grad_v, grad_pn, grad_scale


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


class RepLProjection(nn.Module):
    """Learnable channel projection of a neighbour's tensor to the shape of
    the replaced block's (``fusion='project'``).

    Where a neighbour's tensor has other channel counts than the replaced
    block's -- the first block of the next stage (``2x`` channels) seen from
    the last block of a stage, or block 0's ``conv1`` (the previous stage's
    input width) seen from block 1 -- each differing channel dim ``d``
    (0: output, 1: input channels) with sizes in an integer ratio ``m`` is
    mapped by a learnable grouping:

    .. math::  \\text{reduce } (n' = m n):\\quad
               P(W)[c] = \\sum_{j<m} \\alpha_d[c, j] \\, W[c m + j], \\qquad
               \\text{expand } (n = m n'):\\quad
               P(W)[c m + j] = \\alpha_d[c, j] \\, W[c]

    (other dims unchanged). ``alpha_d`` has ``max(n, n')`` entries and
    starts at ``1/m`` (reduce: the mean of each group of ``m`` source
    channels, so every source channel gets gradient and a vector of ones,
    a norm weight, stays ones) or ``1`` (expand: each source channel
    repeated). One projection serves every tensor of a layer (weight and
    bias) and one side (``k-1`` or ``k+1``); vectors use ``alpha_0`` only.
    The stride of the source block is not part of its weights: the
    replaced block applies the projected kernel at its own stride.

    Args:
        dims (dict[int, tuple[int, int]]): ``{dim: (source size, target
            size)}`` for each channel dim (0 or 1) that differs.
    """

    def __init__(self, dims):
        super().__init__()
        if not dims or any(d not in (0, 1) for d in dims):
            raise ValueError(f'RepLProjection: dims={dims!r} must map dim 0 '
                             'and/or 1 to (source, target) sizes')
        self.dims = {}
        for d, (src, dst) in sorted(dims.items()):
            src, dst = int(src), int(dst)
            small, big = min(src, dst), max(src, dst)
            if src == dst or small < 1 or big % small:
                raise ValueError(
                    f'RepLProjection: dim {d}: {src} -> {dst} channels is '
                    'not an integer ratio')
            m = big // small
            self.dims[d] = (src, dst)
            init = 1. / m if src > dst else 1.
            self.register_parameter(f'alpha{d}',
                                    nn.Parameter(torch.full((small, m),
                                                            init)))

    def forward(self, tensor):
        out = tensor
        for d, (src, dst) in self.dims.items():
            if out.dim() <= d:
                continue
            if out.shape[d] != src:
                raise ValueError(
                    f'RepLProjection: dim {d} of a {tuple(tensor.shape)} '
                    f'tensor is not {src}')
            alpha = getattr(self, f'alpha{d}')
            small, m = alpha.shape
            shape = out.shape
            trail = (1, ) * (out.dim() - d - 1)
            a = alpha.reshape((1, ) * d + (small, m) + trail)
            if src > dst:  # reduce: group the m source channels of each
                grouped = out.reshape(shape[:d] + (small, m) + shape[d + 1:])
                out = (grouped * a).sum(d + 1)
            else:  # expand: repeat each source channel m times
                out = (out.unsqueeze(d + 1) * a).reshape(
                    shape[:d] + (dst, ) + shape[d + 1:])
        return out

    def extra_repr(self):
        return ', '.join(f'dim {d}: {s} -> {t}'
                         for d, (s, t) in self.dims.items())
