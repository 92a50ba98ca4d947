"""The light replacement layer of RepL (``layer='light'``).

With ``layer='full'`` a replaced block runs its stock forward with
synthesised weights: it stores the same activations and costs the same
FLOPs as the block it replaces, so RepL only saves parameters, their
gradients and optimizer state. With ``layer='light'`` the replaced block
runs a *light operator* instead, built only from synthesised tensors
(``T`` = the learnable transformation, ``k +- 1`` the neighbours):

**ResNet Bottleneck** (``p`` planes, ``C = 4p``): the 3x3 ``conv2`` is
skipped and both remaining norms are folded into their convs,

.. math::  h_k = \\mathrm{ReLU}\\big(h_{k-1} + \\hat W_3 *
           \\mathrm{ReLU}(\\hat W_1 * h_{k-1} + \\hat b_1) + \\hat b_3\\big),
           \\quad \\hat W_i = \\mathrm{diag}(s_i) W_i,\\
           \\hat b_i = \\beta_i - s_i \\mu_i,\\
           s_i = \\gamma_i / \\sqrt{\\sigma^2_i + \\epsilon}

with ``(W_i, gamma_i, beta_i) = T(theta_{k-1}, theta_{k+1})`` for ``conv1,
norm1, conv3, norm3`` and ``(mu_i, sigma_i^2)`` the block's own BN running
statistics. **BasicBlock**: ``conv1`` is skipped (its input, the preceding
block's ReLU output, is non-negative, so ``ReLU(h) = h``) and
``h_k = ReLU(h_{k-1} + W^_2 * h_{k-1} + b^_2)``.

The norms normalise with running statistics rather than batch statistics,
which is what makes the layer light: a conv with a folded norm stores only
its input for backward, so the replaced Bottleneck keeps one ``p``-channel
tensor besides its output instead of four ``p``- and one ``4p``-channel
tensors, and runs 8 of the 17 ``p^2`` MACs per pixel with no norm kernel.
The statistics are still tracked in training (exponential moving average
with the norm's ``momentum``, from the current batch, under ``no_grad``;
they enter the next iteration), and the first training batch after
``init_weights`` (``num_batches_tracked == 0``) calibrates them exactly
first, so the layer never starts from the reset ``(0, 1)`` statistics.

**ViT** ``TransformerEncoderLayer``: the attention branch is skipped and the
layer is its synthesised MLP, ``h_k = h_{k-1} + FFN_k(LN2_k(h_{k-1}))``
(stock ``FFN`` code: activation, dropout, drop path). This removes the
attention matrices (``heads x N x N`` per image, the largest activation of a
ViT layer) and about half of the layer's FLOPs.

**Folding** stays exact and stock: a folded light Bottleneck is a stock
Bottleneck whose ``conv2`` is a Dirac (identity) kernel and ``norm2`` the
identity (weight 1, bias 0, mean 0, variance ``1 - eps``): ``ReLU`` of a
non-negative tensor is itself, so the stock forward computes exactly the
light operator in eval mode. A folded light ViT layer has zero attention
projections (``x + attn(.) = x``). Loads into stock mmdet/mmseg.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

LAYER_MODES = ('full', 'light')


def _resnet_block_types():
    types = {}
    try:
        from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
        types[Bottleneck] = 'bottleneck'
        types[BasicBlock] = 'basic'
    except ImportError:  # pragma: no cover - mmdet is a requirement
        pass
    try:
        from mmseg.models.backbones.resnet import BasicBlock, Bottleneck
        types[Bottleneck] = 'bottleneck'
        types[BasicBlock] = 'basic'
    except ImportError:  # pragma: no cover - mmseg is a requirement
        pass
    return types


def _vit_layer_type():
    try:
        from mmseg.models.backbones.vit import TransformerEncoderLayer
    except ImportError:  # pragma: no cover
        return None
    return TransformerEncoderLayer


class LightSpec:
    """What the light layer of one block uses and how it folds.

    Attributes:
        kind (str): ``'bottleneck'``, ``'basic'`` or ``'vit'``.
        used (tuple[str]): Layer paths (relative to the block) whose
            parameters the light operator uses; a path is used if it equals
            one of them or lies below it.
    """

    def __init__(self, kind, used):
        self.kind = kind
        self.used = tuple(used)

    def uses(self, path):
        return any(path == u or path.startswith(u + '.') for u in self.used)


def light_spec(block, block_name):
    """The :class:`LightSpec` of ``block``.

    Raises:
        ValueError: (naming ``layer``) if ``block`` has no light layer.
    """
    kind = None
    for cls, k in _resnet_block_types().items():
        # the class itself or a subclass that keeps its forward (ResNeXt)
        if isinstance(block, cls) and type(block).forward is cls.forward:
            kind = k
    vit = _vit_layer_type()
    if vit is not None and isinstance(block, vit) and \
            type(block).forward is vit.forward:
        kind = 'vit'
    if kind is None:
        raise ValueError(
            f"layer='light': block {block_name} ({type(block).__name__}) has "
            'no light replacement (ResNet BasicBlock/Bottleneck and mmseg '
            "TransformerEncoderLayer have one); use layer='full'")

    def refuse(why):
        raise ValueError(f"layer='light': block {block_name} cannot use the "
                         f"light layer: {why}; use layer='full'")

    if kind == 'vit':
        ffn = block.ffn
        if not getattr(ffn, 'add_identity', True):
            refuse('its FFN has no identity connection')
        return LightSpec(kind, (block.norm2_name, 'ffn'))

    if getattr(block, 'with_plugins', False) or getattr(
            block, 'with_dcn', False):
        refuse('it has plugins or DCN')
    if block.downsample is not None:
        refuse('it has a downsample projection')
    if kind == 'bottleneck':
        pairs = [(block.conv1, block.norm1), (block.conv3, block.norm3)]
        skipped = [(block.conv2, block.norm2)]
        used = ('conv1', block.norm1_name, 'conv3', block.norm3_name)
    else:
        pairs = [(block.conv2, block.norm2)]
        skipped = [(block.conv1, block.norm1)]
        used = ('conv2', block.norm2_name)
    for conv, norm in pairs + skipped:
        if type(conv) is not nn.Conv2d or conv.padding_mode != 'zeros':
            refuse(f'{type(conv).__name__} is not a plain Conv2d')
        if not (isinstance(norm, _BatchNorm) and norm.affine
                and norm.track_running_stats):
            refuse(f'{type(norm).__name__} is not an affine BatchNorm with '
                   'running statistics (needed to fold it into the conv)')
    for conv, _ in skipped:
        if conv.stride not in ((1, 1), 1) or \
                conv.in_channels != conv.out_channels or \
                conv.kernel_size[0] % 2 == 0 or \
                conv.padding[0] != conv.dilation[0] * (
                    conv.kernel_size[0] // 2):
            refuse('its skipped conv is not shape-preserving, so no '
                   'identity kernel folds it')
    return LightSpec(kind, used)


# ------------------------------------------------------------- forwards
def light_forward(spec, block, tensors, x, folds=None):
    """The light operator of ``block`` on ``x``.

    Args:
        spec (LightSpec): Of the block.
        block (nn.Module): The replaced block (its hyper-parameters and BN
            running statistics are read, its parameters are not).
        tensors (dict): ``(layer path, name) -> tensor`` for every parameter
            the light layer uses (synthesised or kept own).
        x (Tensor): ``h_{k-1}``.
        folds (dict, optional): From
            :class:`~mmlocal.models.repl.batched.BatchedSynthesis`: per conv
            path the folded weight and shift, computed for all replaced
            blocks at once (then ``tensors`` is not read).
    """
    if spec.kind == 'vit':
        return _vit_forward(block, tensors, x)
    if folds is not None:
        return _batched_forward(spec, block, folds, x)

    def get(path, name):
        return tensors.get((path, name))

    if spec.kind == 'bottleneck':
        out = fused_conv_bn(x, block.conv1, block.norm1,
                            get('conv1', 'weight'), get('conv1', 'bias'),
                            get(block.norm1_name, 'weight'),
                            get(block.norm1_name, 'bias'),
                            block.training).relu_()
        out = fused_conv_bn(out, block.conv3, block.norm3,
                            get('conv3', 'weight'), get('conv3', 'bias'),
                            get(block.norm3_name, 'weight'),
                            get(block.norm3_name, 'bias'), block.training)
    else:
        out = fused_conv_bn(x, block.conv2, block.norm2,
                            get('conv2', 'weight'), get('conv2', 'bias'),
                            get(block.norm2_name, 'weight'),
                            get(block.norm2_name, 'bias'), block.training)
    return out.add_(x).relu_()


def _batched_forward(spec, block, folds, x):
    """The light ResNet operator with weights folded by the batched
    synthesis; each conv updates its norm's statistics in its output space
    (one kernel) and the engine maps them back after the pass."""

    def conv_bn(h, path, norm):
        weight, shift, aux_mean, aux_var, index, cache = folds[path]
        y = _conv(h, getattr(block, path), weight, shift)
        if norm.training and norm.track_running_stats:
            with torch.no_grad():
                torch.batch_norm_update_stats(y.detach(), aux_mean, aux_var,
                                              norm.momentum)
            cache.engine.mark_ran(cache, index)
        return y

    if spec.kind == 'bottleneck':
        out = conv_bn(x, 'conv1', block.norm1).relu_()
        out = conv_bn(out, 'conv3', block.norm3)
    else:
        out = conv_bn(x, 'conv2', block.norm2)
    return out.add_(x).relu_()


def _conv(x, conv, weight, bias):
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def fused_conv_bn(x,
                  conv,
                  norm,
                  weight,
                  conv_bias,
                  gamma,
                  beta,
                  calibrate=True):
    """``norm(conv(x))`` with the norm folded into the conv weights.

    .. math::  y = (\\mathrm{diag}(s) W) * x + \\beta - s\\,\\mu
               \\ (+\\, s\\, b_{conv}),\\quad
               s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}

    ``(mu, sigma^2)`` are ``norm``'s running statistics, so autograd stores
    only ``x`` (the conv's input) and the folded weight. When ``norm`` is in
    training mode the statistics are updated from this batch under
    ``no_grad`` (recovered from ``y``: ``E[z] = (E[y] - t) / s`` with ``t``
    the folded bias, ``Var[z] = Var[y] / s^2``). The first forward with
    ``calibrate`` (the block in training mode) while
    ``num_batches_tracked == 0`` sets them exactly, from ``conv(x)``, before
    they are used -- also when ``norm`` itself is frozen in eval mode
    (``replaced_norm_eval=True``: calibrated once, then fixed).
    """
    update = norm.training and norm.track_running_stats
    calibrated = False
    # reading num_batches_tracked waits for the device: done only until the
    # statistics are known to be set (see watch_statistics)
    if (update or calibrate) and norm.track_running_stats and \
            not getattr(norm, STATS_READY, False):
        if int(norm.num_batches_tracked) == 0:
            with torch.no_grad():
                z = _conv(x, conv, weight, conv_bias)
                mean, var = channel_stats(z)
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                del z
            calibrated = True
        setattr(norm, STATS_READY, True)  # num_batches_tracked > 0 below
    mean = norm.running_mean.clone()  # updated in place below
    scale = gamma * torch.rsqrt(norm.running_var + norm.eps)
    shift = torch.addcmul(beta, mean, scale, value=-1)
    if conv_bias is not None:
        shift = torch.addcmul(shift, conv_bias, scale)
    w = weight * scale.reshape((-1, ) + (1, ) * (weight.dim() - 1))
    y = _conv(x, conv, w, shift)
    if calibrated and not update:
        norm.num_batches_tracked.add_(1)
    if update:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            if not calibrated:
                mean_y, var_y = channel_stats(y)
                s, t = scale.detach(), shift.detach()
                ok = s.abs() > 1e-12
                safe = torch.where(ok, s, torch.ones_like(s))
                # y = s z + beta - s mu, t = beta - s mu (+ s b_conv)
                mean_z = (mean_y - t) / safe
                if conv_bias is not None:
                    mean_z = mean_z + conv_bias.detach()
                batch_mean = torch.where(ok, mean_z, norm.running_mean)
                batch_var = torch.where(ok, var_y / (safe * safe),
                                        norm.running_var)
                momentum = norm.momentum
                if momentum is None:  # cumulative moving average
                    momentum = 1. / float(norm.num_batches_tracked)
                norm.running_mean.lerp_(batch_mean, momentum)
                norm.running_var.lerp_(batch_var, momentum)
    return y


STATS_READY = '_repl_stats_ready'


def _statistics_loaded(norm, incompatible_keys):
    setattr(norm, STATS_READY, False)


def watch_statistics(norm):
    """Make :func:`fused_conv_bn` check ``norm``'s ``num_batches_tracked``
    again after ``load_state_dict`` (a checkpoint may bring reset
    statistics). Call :func:`statistics_reset` after resetting them in
    place (``reset_running_stats``)."""
    if not getattr(norm, '_repl_watched', False):
        norm.register_load_state_dict_post_hook(_statistics_loaded)
        norm._repl_watched = True
    statistics_reset(norm)


def statistics_reset(norm):
    """``norm``'s statistics may have been reset: calibrate if so."""
    setattr(norm, STATS_READY, False)


def channel_stats(y):
    """Per-channel mean and unbiased variance of an ``N x C x ...`` tensor
    (what BN tracks), with BN's own statistics kernel: about 3x faster on
    the CPU than ``torch.var_mean`` over ``(0, 2, 3)``."""
    n = y.numel() // y.shape[1]
    if hasattr(torch, 'batch_norm_update_stats'):
        mean, var = torch.batch_norm_update_stats(y, None, None, 0.)
    else:  # pragma: no cover
        var, mean = torch.var_mean(
            y, dim=[0] + list(range(2, y.dim())), unbiased=False)
    return mean, var * (n / max(n - 1, 1))


def _vit_forward(block, tensors, x):
    """``x + FFN(LN2(x))`` with the synthesised LN2 and FFN installed as
    attributes for the duration of the call (stock ``FFN`` code)."""

    def install():
        for (path, name), t in tensors.items():
            setattr(block.get_submodule(path), name, t)

    def inner(x):
        install()  # (again when a checkpoint recomputes)
        return block.ffn(block.norm2(x), identity=x)

    if block.with_cp and x.requires_grad:
        # non-reentrant: the recomputation reuses the same tensors
        return checkpoint(inner, x, use_reentrant=False)
    out = inner(x)
    for (path, name), t in tensors.items():
        setattr(
            block.get_submodule(path), name,
            torch.empty(t.shape, dtype=t.dtype, device='meta'))
    return out


# --------------------------------------------------------------- folding
def neutral_tensors(spec, block, shapes):
    """Stock tensors that make the skipped layers of a folded light block
    the identity: ``{'<path>.<name>': tensor}`` for the skipped layers'
    parameters and norm buffers.

    Args:
        shapes (dict): ``(path, name) -> (shape, dtype, device)`` of the
            block's removed, unused parameters.
    """
    out = {}
    if spec.kind == 'vit':
        for (path, name), (shape, dtype, device) in shapes.items():
            fill = 1. if (path == block.norm1_name
                          and name == 'weight') else 0.
            out[f'{path}.{name}'] = torch.full(
                shape, fill, dtype=dtype, device=device)
        return out
    conv_name, norm = ('conv2', block.norm2) if spec.kind == 'bottleneck' \
        else ('conv1', block.norm1)
    norm_name = block.norm2_name if spec.kind == 'bottleneck' \
        else block.norm1_name
    conv = getattr(block, conv_name)
    for (path, name), (shape, dtype, device) in shapes.items():
        key = f'{path}.{name}'
        if path == conv_name and name == 'weight':
            w = torch.zeros(shape, dtype=dtype, device=device)
            nn.init.dirac_(w, groups=conv.groups)
            out[key] = w
        elif path == norm_name and name == 'weight':
            out[key] = torch.ones(shape, dtype=dtype, device=device)
        else:  # conv / norm bias
            out[key] = torch.zeros(shape, dtype=dtype, device=device)
    rm, rv = norm.running_mean, norm.running_var
    out[f'{norm_name}.running_mean'] = torch.zeros_like(rm)
    # (x - 0) / sqrt((1 - eps) + eps) = x
    out[f'{norm_name}.running_var'] = torch.full_like(rv, 1. - norm.eps)
    return out
