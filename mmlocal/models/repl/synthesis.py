"""Operator synthesis for one replaced block.

The replaced block stays in the backbone's module tree and runs its own,
unchanged ``forward`` (convs, norms, residual, attention: the stock code).
What changes is where its parameters come from: each of them is removed from
the block (it is no longer an ``nn.Parameter``, so it is neither trained nor
saved) and, right before every forward of the block, set back as a plain
tensor attribute computed from the neighbours' parameters:

.. math::  W_k^{(l)} = \\mathcal{T}^{(l)}_\\phi\\big(W_{k-1}^{(l)},
           W_{k+1}^{(l)}\\big)

for every layer ``l`` (a submodule that owns parameters: conv, norm, linear,
attention projection) of block ``k``. The synthesised tensors carry the
autograd graph, so the gradient of the loss reaches ``phi`` and both
neighbours' ``W``. Buffers (BN running statistics) stay the block's own.

Between forwards the attributes hold shape-only ``meta`` tensors (no
storage): the synthesised operator exists only while the block's graph does,
and a stale copy can never be used by mistake.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmlocal.registry import MODELS

#: How a tensor of a replaced block is obtained.
BOTH = 'both'  # T(W_{k-1}, W_{k+1})
MIRROR_PREV = 'prev'  # T(W_{k-1}, W_{k-1}): no usable successor
MIRROR_NEXT = 'next'  # T(W_{k+1}, W_{k+1}): no usable predecessor
OWN = 'own'  # no compatible neighbour: stays a trainable parameter
UNUSED = 'unused'  # layer='light' skips the layer: removed, folds neutral
# fusion='project': a neighbour tensor of another channel count is first
# projected to the block's shape, P(W) (:class:`RepLProjection`)
PREV_PROJ_NEXT = 'prev+proj(next)'  # T(W_{k-1}, P(W_{k+1}))
PROJ_PREV_NEXT = 'proj(prev)+next'  # T(P(W_{k-1}), W_{k+1})
PROJ_BOTH = 'proj(prev)+proj(next)'  # T(P(W_{k-1}), P(W_{k+1}))
MIRROR_PROJ_PREV = 'proj(prev)'  # T(P(W_{k-1}), P(W_{k-1}))
MIRROR_PROJ_NEXT = 'proj(next)'  # T(P(W_{k+1}), P(W_{k+1}))

SAME, PROJ = 'same', 'proj'
#: rule -> (how k-1 is used, how k+1 is used); None: not used (mirrored)
RULE_SOURCES = {
    BOTH: (SAME, SAME),
    MIRROR_PREV: (SAME, None),
    MIRROR_NEXT: (None, SAME),
    PREV_PROJ_NEXT: (SAME, PROJ),
    PROJ_PREV_NEXT: (PROJ, SAME),
    PROJ_BOTH: (PROJ, PROJ),
    MIRROR_PROJ_PREV: (PROJ, None),
    MIRROR_PROJ_NEXT: (None, PROJ),
}
_RULE_OF = {v: k for k, v in RULE_SOURCES.items()}

FUSION_RULES = (None, 'mirror', 'project')


@dataclass
class RepLUnit:
    """One block that RepL may replace.

    Attributes:
        index (int): Position in the backbone's list of units (what
            ``blocks=[...]`` refers to).
        name (str): Attribute path inside the backbone, e.g.
            ``'layer2.1'``, ``'layers.3'``, ``'stage2.1.blocks.0'``.
        module (nn.Module): The block.
        stage (int): The group whose blocks share shapes (ResNet stage, CSP
            layer, all transformer layers).
        position (int): Index of the block inside its stage.
        stage_size (int): Number of blocks in the stage.
        frozen (bool): Whether the backbone freezes it (``frozen_stages``).
        refusal (str, optional): Why the block can never be replaced (e.g.
            it is the first block of its stage); None if it can.
    """
    index: int
    name: str
    module: nn.Module
    stage: int
    position: int
    stage_size: int
    frozen: bool = False
    refusal: Optional[str] = None


def own_parameters(block):
    """``[(layer path, layer, [param names])]`` of every submodule of
    ``block`` that directly owns (non-None) parameters, in module order."""
    layers = []
    for path, module in block.named_modules():
        names = [n for n, p in module._parameters.items() if p is not None]
        if names:
            layers.append((path, module, names))
    return layers


def _tensor_of(block, path, name):
    """Parameter ``path.name`` of ``block`` or None (missing / not a
    parameter)."""
    if block is None:
        return None
    try:
        module = block.get_submodule(path) if path else block
    except AttributeError:
        return None
    return module._parameters.get(name)


def projectable(src_shape, dst_shape):
    """Whether :class:`RepLProjection` maps a tensor of ``src_shape`` to
    ``dst_shape``: same rank, the channel dims (0 and, for matrices and
    kernels, 1) equal or in an integer ratio, every other dim (kernel
    size) equal."""
    if len(src_shape) != len(dst_shape) or tuple(src_shape) == tuple(
            dst_shape):
        return False
    for d, (s, t) in enumerate(zip(src_shape, dst_shape)):
        if s == t:
            continue
        if d > 1 or s < 1 or t < 1 or max(s, t) % min(s, t):
            return False
    return True


def match_sources(block, prev_block, next_block, project=False):
    """For each parameter of ``block``: how each neighbour can provide it.

    Returns:
        list[tuple[str, str, torch.Size, str | None, str | None]]:
        ``(layer path, param name, shape, prev, next)`` where ``prev`` /
        ``next`` is ``'same'`` (a parameter with the same path and shape),
        ``'proj'`` (same path, channel counts in an integer ratio:
        :func:`projectable`; only with ``project=True``) or None.
    """
    found = []
    for path, module, names in own_parameters(block):
        for name in names:
            shape = module._parameters[name].shape
            how = []
            for neighbour in (prev_block, next_block):
                t = _tensor_of(neighbour, path, name)
                if t is not None and t.shape == shape:
                    how.append(SAME)
                elif project and t is not None and projectable(
                        t.shape, shape):
                    how.append(PROJ)
                else:
                    how.append(None)
            found.append((path, name, shape, how[0], how[1]))
    return found


def choose_rules(block_name, matches, fusion, option):
    """Apply a fusion rule to :func:`match_sources` output.

    Args:
        block_name (str): For messages.
        matches (list): From :func:`match_sources`.
        fusion (str | None): ``None``: every tensor needs both neighbours
            with the same shape; ``'mirror'``: a tensor with one same-shaped
            neighbour uses it for both slots; ``'project'``: a neighbour
            tensor whose channel counts differ (the next stage's first
            block, block 0's ``conv1``) is projected to the block's shape
            (:class:`RepLProjection`) and used like a same-shaped one; with
            one usable neighbour only (the last block of the backbone) it is
            mirrored. Under both, a tensor with no usable neighbour stays
            the block's own trainable parameter.
        option (str): The plan option to name in errors (``'interval'`` or
            ``'blocks'``).

    Returns:
        dict[tuple[str, str], str]: ``(path, name) -> rule``.

    Raises:
        ValueError: If the block cannot be replaced under ``fusion``.
    """
    if fusion not in FUSION_RULES:
        raise ValueError(f'fusion={fusion!r} must be one of {FUSION_RULES}')
    rules = {}
    for path, name, shape, prev_how, next_how in matches:
        full = f'{path}.{name}' if path else name
        if fusion != 'project':
            prev_how = prev_how if prev_how == SAME else None
            next_how = next_how if next_how == SAME else None
        if prev_how == SAME and next_how == SAME:
            rule = BOTH
        elif fusion is None:
            missing = ' and '.join(
                n for n, how in (('k-1', prev_how), ('k+1', next_how))
                if how != SAME)
            raise ValueError(
                f'{option}: block {block_name} cannot be replaced with '
                f'fusion=None: its tensor {full} {tuple(shape)} has no '
                f'tensor of the same shape in neighbour {missing} (set '
                "fusion='mirror' or 'project', or choose another block)")
        elif prev_how or next_how:
            rule = _RULE_OF[(prev_how, next_how)]
        else:
            rule = OWN
        rules[(path, name)] = rule
    if not rules or all(r == OWN for r in rules.values()):
        raise ValueError(
            f'{option}: block {block_name} cannot be replaced: none of its '
            'parameters has a tensor of the same shape in a neighbouring '
            'block of its stage, so nothing can be synthesised')
    return rules


def _key(path):
    return path.replace('.', '_') if path else 'block'


class BlockReplacement(nn.Module):
    """The light layer that stands in for one removed block.

    It owns only the transformation parameters ``phi``; the block (and its
    neighbours) stay owned by the backbone and are referenced, not
    registered, so no state-dict key of the backbone changes.

    .. math::  h_k = f_k\\big(h_{k-1};\\ \\mathcal{T}_\\phi(\\theta_{k-1},
               \\theta_{k+1})\\big)

    where ``f_k`` is the block's stock forward and ``theta`` the parameters
    of a block.

    Args:
        block (nn.Module): Block ``k``. Its synthesised parameters are
            removed from it.
        prev_block (nn.Module | None): Block ``k-1`` of the same stage.
        next_block (nn.Module | None): Block ``k+1`` of the same stage.
        rules (dict): ``(layer path, param name) -> rule`` from
            :func:`choose_rules`.
        transform (dict): Config of a transform (a
            :class:`~.transforms.BaseRepLTransform`); ``num_channels`` is
            filled in per layer.
        block_name (str): For messages and ``repr``.
        light (LightSpec, optional): With ``layer='light'``: the block's
            light operator (:mod:`.light`) replaces its stock forward; the
            parameters of the layers it skips are removed too (rule
            ``'unused'``) and fold to identity layers.
    """

    def __init__(self,
                 block,
                 prev_block,
                 next_block,
                 rules,
                 transform,
                 block_name,
                 light=None):
        super().__init__()
        self.block_name = block_name
        self.light = light
        # plain containers: referenced, not registered (no duplicate keys)
        self._block = [block]
        self._neighbours = [prev_block, next_block]
        self.rules = dict(rules)
        # the backbone's BatchedSynthesis, if any (set by RepLBackbone)
        self._engine = [None]
        self.synthesized = []  # [(path, name)] in module order
        self.unused = {}  # (path, name) -> (shape, dtype, device)
        # stock parameter order of each layer, to write folded state dicts
        # in the order the stock model would
        self.param_order = {}
        layers = {}
        for path, module, names in own_parameters(block):
            self.param_order[path] = list(names)
            for name in names:
                if light is not None and not light.uses(path):
                    p = module._parameters[name]
                    self.unused[(path, name)] = (p.shape, p.dtype, p.device)
                    self.rules[(path, name)] = UNUSED
                    continue
                if self.rules[(path, name)] != OWN:
                    self.synthesized.append((path, name))
                    layers.setdefault(path, []).append(
                        module._parameters[name].shape)

        self._build_projections()
        self.transforms = nn.ModuleDict()
        self._transform_of = {}
        if transform_class(transform).per_block:
            self.transforms['block'] = _build_transform(transform, None)
            for item in self.synthesized:
                self._transform_of[item] = 'block'
        else:
            for path, shapes in layers.items():
                items = [item for item in self.synthesized if item[0] == path]
                if len({s[0] for s in shapes}) == 1:
                    # weight and bias share C_out: one transform per layer
                    key = _key(path)
                    self._add_transform(key, transform, shapes[0][0])
                    for item in items:
                        self._transform_of[item] = key
                else:
                    for item, shape in zip(items, shapes):
                        key = _key(f'{path}.{item[1]}')
                        self._add_transform(key, transform, shape[0])
                        self._transform_of[item] = key

        # remove the parameters; shape-only placeholders until a forward
        for path, name in self.removed:
            module = _module(block, path)
            param = module._parameters.pop(name)
            setattr(module, name,
                    torch.empty(param.shape, dtype=param.dtype, device='meta'))
        if light is None:
            self._hook_ids = (
                block.register_forward_pre_hook(self._install).id,
                block.register_forward_hook(self._release).id)
        else:
            self._hook_ids = None
            # an instance attribute shadows the class's forward; a bound
            # method of this module, so deep copies follow the copy
            block.forward = self._light_forward
            from .light import watch_statistics
            for m in block.modules():
                if isinstance(m, _BatchNorm):
                    watch_statistics(m)

    @property
    def removed(self):
        """``[(path, name)]`` of the block's parameters that are no longer
        parameters (synthesised, or unused by the light layer)."""
        return self.synthesized + list(self.unused)

    def _build_projections(self):
        """One :class:`~.transforms.RepLProjection` per (layer, side) whose
        tensors the rules project (``fusion='project'``)."""
        from .transforms import RepLProjection
        self.projections = nn.ModuleDict()
        self.shapes = {}
        dims = {}
        for path, name in self.synthesized:
            shape = _module(self.block, path)._parameters[name].shape
            self.shapes[(path, name)] = shape
            for side, how in enumerate(RULE_SOURCES[self.rules[(path,
                                                                name)]]):
                if how != PROJ:
                    continue
                src = _tensor_of(self._neighbours[side], path, name).shape
                key = _projection_key(path, side)
                for d in range(min(2, len(shape))):
                    if src[d] == shape[d]:
                        continue
                    have = dims.setdefault(key, {}).setdefault(
                        d, (src[d], shape[d]))
                    if have != (src[d], shape[d]):
                        raise ValueError(
                            f'{self.block_name}: tensors of layer {path!r} '
                            f'need two projections of dim {d}')
        for key, d in dims.items():
            self.projections[key] = RepLProjection(d)

    def _source(self, side, how, path, name):
        """The tensor neighbour ``side`` (0: k-1, 1: k+1) provides for
        ``(path, name)``: its own, projected, or None."""
        if how is None:
            return None
        t = _tensor_of(self._neighbours[side], path, name)
        if how == PROJ:
            key = _projection_key(path, side)
            if key in self.projections:
                t = self.projections[key](t)
        return t

    def _add_transform(self, key, cfg, channels):
        if key in self.transforms:
            raise ValueError(f'{self.block_name}: two layers map to the '
                             f'transform key {key!r}')
        self.transforms[key] = _build_transform(cfg, channels)

    @property
    def block(self):
        return self._block[0]

    @property
    def prev_block(self):
        return self._neighbours[0]

    @property
    def next_block(self):
        return self._neighbours[1]

    # ------------------------------------------------------------ synthesis
    def synthesize(self):
        """The synthesised tensors, ``{(layer path, name): tensor}``.

        Differentiable w.r.t. the transforms and the neighbours' parameters
        (call under ``torch.no_grad()`` to fold).
        """
        pairs, groups = {}, {}
        for path, name in self.synthesized:
            prev_how, next_how = RULE_SOURCES[self.rules[(path, name)]]
            prev = self._source(0, prev_how, path, name)
            nxt = self._source(1, next_how, path, name)
            if prev is None:
                prev = nxt
            if nxt is None:
                nxt = prev
            pairs[(path, name)] = (prev, nxt)
            key = self._transform_of[(path, name)]
            # vectors (norm weights and biases, conv biases) sharing a
            # column-separable transform and C_out are mapped in one call
            # (fewer small kernels; a matrix would be copied by the concat
            # and the copy kept for backward)
            group = (key, prev.shape[0]) if prev.dim() == 1 and getattr(
                self.transforms[key], 'column_separable', False) else \
                (key, path, name)
            groups.setdefault(group, []).append((path, name))
        out = {}
        # in the parameters' own precision under AMP too (the convs cast the
        # synthesised weights as they cast any weight)
        with _no_autocast(pairs):
            self._map_groups(groups, pairs, out)
        return {item: out[item] for item in self.synthesized}

    def _map_groups(self, groups, pairs, out):
        for group, items in groups.items():
            transform = self.transforms[group[0]]
            if len(items) == 1:
                out[items[0]] = transform(*pairs[items[0]])
                continue
            mixed = transform(*(torch.stack(
                [pairs[item][i] for item in items], dim=1) for i in (0, 1)))
            for item, part in zip(items, mixed.unbind(dim=1)):
                # own storage: PyTorch's CPU batch_norm back-propagates a
                # wrong *input* gradient when the input's spatial size is
                # 1x1 and its weight is a strided view (torch 2.14;
                # forward and weight gradients are right) -- ResNet-50's
                # layer4 on a 32 px image in test_repl's exact-gradient test
                out[item] = part.contiguous()

    def light_tensors(self):
        """Every parameter the light layer uses: synthesised ones and the
        block's own kept ones, ``{(path, name): tensor}``."""
        tensors = self.synthesize()
        for (path, name), rule in self.rules.items():
            if rule == OWN:
                tensors[(path, name)] = _module(self.block,
                                                path)._parameters[name]
        return tensors

    def _light_forward(self, x):
        from .light import light_forward
        engine = self._engine[0]
        if engine is not None and engine.usable(self):
            tensors, folds = engine.entry(self)
            try:
                return light_forward(
                    self.light, self.block, tensors, x, folds=folds)
            finally:
                engine.after_forward(self)
        return light_forward(self.light, self.block, self.light_tensors(), x)

    def _install(self, block, args):
        for (path, name), tensor in self.synthesize().items():
            setattr(_module(block, path), name, tensor)

    def _release(self, block, args, output):
        # A block with ``with_cp`` recomputes its forward during backward and
        # reads the attributes again: keep the synthesised tensors until the
        # next forward replaces them.
        if getattr(block, 'with_cp', False) and torch.is_grad_enabled() and \
                any(torch.is_tensor(a) and a.requires_grad for a in args):
            return
        for path, name in self.synthesized:
            module = _module(block, path)
            t = getattr(module, name)
            setattr(module, name,
                    torch.empty(t.shape, dtype=t.dtype, device='meta'))

    def folded_tensors(self):
        """Synthesised tensors materialised (detached), keyed by
        ``'<layer path>.<name>'`` relative to the block; with the light
        layer also the neutral tensors (parameters and norm buffers) that
        make its skipped layers identities in the stock block."""
        with torch.no_grad():
            synth = self.synthesize()
            out = {(f'{p}.{n}' if p else n): t.detach().clone()
                   for (p, n), t in synth.items()}
            if self.light is not None:
                from .light import neutral_tensors

                # the model's current dtype/device (after .double(), .cuda())
                like = next(iter(synth.values()))
                shapes = {
                    key: (shape, like.dtype, like.device)
                    for key, (shape, _, _) in self.unused.items()
                }
                out.update(neutral_tensors(self.light, self.block, shapes))
        return out

    def remove_hooks(self):
        block = self.block
        if self._hook_ids is None:
            block.__dict__.pop('forward', None)
            return
        block._forward_pre_hooks.pop(self._hook_ids[0], None)
        block._forward_hooks.pop(self._hook_ids[1], None)

    def extra_repr(self):
        counts = {}
        for rule in self.rules.values():
            counts[rule] = counts.get(rule, 0) + 1
        parts = ', '.join(f'{k}={v}' for k, v in sorted(counts.items()))
        layer = 'full' if self.light is None else f'light ({self.light.kind})'
        return f'block={self.block_name}, layer={layer}, tensors: {parts}'


def _projection_key(path, side):
    return f'{_key(path)}_{("prev", "next")[side]}'


def _module(block, path):
    return block.get_submodule(path) if path else block


def _normalized_cfg(cfg):
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f'transform={cfg!r} must be a config dict with a '
                         "type, e.g. dict(type='mmlocal.RepLScalarMix')")
    cfg = dict(cfg)
    if isinstance(cfg['type'], str) and '.' not in cfg['type']:
        cfg['type'] = 'mmlocal.' + cfg['type']
    return cfg


def transform_class(cfg):
    """The transform class a ``transform`` config names.

    Raises:
        ValueError: If it is not a registered RepL transform.
    """
    from .transforms import BaseRepLTransform
    cfg = _normalized_cfg(cfg)
    cls = cfg['type'] if isinstance(cfg['type'], type) else \
        MODELS.get(cfg['type'])
    if cls is None or not (isinstance(cls, type)
                           and issubclass(cls, BaseRepLTransform)):
        raise ValueError(
            f'transform.type={cfg["type"]!r} is not a registered RepL '
            'transform (mmlocal.RepLScalarMix, mmlocal.RepLChannelMix, '
            'mmlocal.RepLLowRankMix)')
    return cls


def _build_transform(cfg, num_channels):
    transform_class(cfg)
    cfg = _normalized_cfg(cfg)
    if num_channels is not None:
        cfg['num_channels'] = num_channels
    try:
        return MODELS.build(cfg)
    except TypeError as exc:
        raise ValueError(f'transform={cfg!r}: {exc}') from exc


def _no_autocast(pairs):
    """Autocast off on the device of the (first) source tensor: the
    synthesis, folding and statistics run in the parameters' dtype."""
    for prev, _ in pairs.values():
        return torch.autocast(prev.device.type, enabled=False)
    return contextlib.nullcontext()
