import copy
import logging
import operator
from collections import OrderedDict

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from mmlocal.models.local.split import (BLOCK_SEQUENCE_ADAPTERS,
                                        build_block_sequence)
from mmlocal.registry import MODELS
from mmlocal.utils.compile import check_compile_option
from .batched import BatchedSynthesis
from .conv_block import conv_supported_types, conv_units
from .light import LAYER_MODES, light_spec, statistics_reset
from .synthesis import (FUSION_RULES, OWN, RULE_SOURCES, UNUSED,
                        BlockReplacement, choose_rules, match_sources,
                        transform_class)
from .vit_block import vit_types, vit_units


@MODELS.register_module()
class RepLBackbone(BaseModule):
    """Replacement Learning (RepL) around any supported backbone.

    Zhang et al., "Replacement Learning: Training Vision Tasks with Fewer
    Learnable Parameters" (arXiv 2410.01239, v1) and "Replacement Learning:
    Training Neural Networks with Fewer Parameters" (arXiv 2605.19533, v2).
    Selected blocks are removed from training; each removed block ``k`` is
    replaced by a light layer that synthesises its operator from the
    parameters of the preceding and succeeding blocks of its stage through a
    learnable transformation and applies it to block ``k-1``'s output:

    .. math::  h_k = f_k\\big(h_{k-1};\\ \\theta_k\\big), \\qquad
               \\theta_k^{(l)} = \\mathcal{T}^{(l)}_\\phi\\big(
               \\theta_{k-1}^{(l)}, \\theta_{k+1}^{(l)}\\big)

    for every layer ``l`` of the block (conv, norm, attention and MLP
    projections), ``f_k`` being the block's stock forward. v1 is
    ``T(W_p, W_n) = a W_p + b W_n`` with two scalars per replaced block
    (:class:`RepLScalarMix`); :class:`RepLChannelMix` gives each output
    channel its own ``(a_c, b_c)``; :class:`RepLLowRankMix` (v2-style) mixes
    all output channels of both neighbours through ``diag + low rank``
    matrices. The replaced block owns no trainable parameter; the gradient
    reaches ``phi`` and both neighbours through the synthesised operator.

    The papers' exact operator, block choice and fusion blocks are not
    public (METHODS.md §4.2); every choice made here is documented in
    ``docs/methods/repl.md``. In short:

    - **Which operator** (``layer``). ``'full'``: ``f_k`` is the block's
      stock forward with every parameter synthesised (same activations and
      FLOPs as the block: saves parameters, gradients and optimizer state
      only). ``'light'`` (default): a light operator built from synthesised
      tensors only (:mod:`mmlocal.models.repl.light`): a ResNet Bottleneck
      skips its 3x3 conv and folds its norms (running statistics, tracked
      from the batch) into the convs,
      ``h_k = ReLU(h_{k-1} + W^_3 * ReLU(W^_1 * h_{k-1} + b^_1) + b^_3)``;
      a BasicBlock skips ``conv1``; a ViT layer keeps only its MLP branch,
      ``h_k = h_{k-1} + FFN_k(LN2_k(h_{k-1}))``. Skipped layers have no
      parameters and fold to identity layers of the stock block.

    - **Which blocks.** ``interval=n`` replaces, inside every stage (ResNet
      stage, CSP layer, the transformer layers), the blocks at positions
      ``n-1, 2n-1, ...``; ``blocks=[...]`` lists unit indices explicitly
      (:attr:`units` gives them). Frozen stages are skipped (interval) or
      refused (blocks). The first block of a stage is always refused (it
      downsamples / follows the stem); adjacent replaced blocks are refused.
    - **Fusion rule** (``fusion='mirror'``): a tensor whose shape only one
      neighbour of the same stage provides (the last block of a stage; the
      ``conv1`` of block 1, whose predecessor reads the previous stage's
      channels) is synthesised from that neighbour alone, ``T(W, W)``; a
      tensor no neighbour provides stays the block's own trainable
      parameter. ``fusion='project'``: the last block of a stage takes the
      next stage's first block as its successor and the ``conv1`` of block
      1 uses block 0's; their tensors, of other channel counts, are mapped
      to the block's shapes by a learnable channel projection
      (:class:`~mmlocal.models.repl.transforms.RepLProjection`) before the
      transformation; only the backbone's last block is mirrored.
      ``fusion=None`` accepts only blocks whose every tensor has both
      same-shaped neighbours (interval plans skip the others).
    - **State.** Replaced parameters are removed from the model (not
      trained, not saved); the block's BN running statistics stay its own
      buffers and are tracked in training even under the backbone's
      ``norm_eval=True`` (``replaced_norm_eval=False``), because the
      synthesised operator has no pretrained statistics. ``init_weights``
      resets them, so nothing pretrained of a replaced block survives.
    - **Checkpoints.** The state dict holds the stock backbone under
      ``backbone.`` minus the replaced parameters, plus the transforms under
      ``replacements.``. A stock-keyed state dict (a stock detector
      checkpoint, a folded RepL checkpoint) also loads: its keys are mapped
      to ``backbone.`` and the replaced blocks' weights are dropped.
      :meth:`fold_state_dict` (and ``tools/model_converters/repl_fold.py``)
      writes the plain backbone with the synthesised weights materialised.

    Args:
        backbone (dict | nn.Module): The stock backbone (mmdet/mmseg
            ``ResNet`` family, mmdet ``CSPDarknet``/``CSPNeXt``, mmseg
            ``VisionTransformer``).
        interval (int, optional): Replace every ``interval``-th block inside
            each stage (>= 2).
        blocks (Sequence[int], optional): Unit indices to replace (instead
            of ``interval``).
        transform (dict): Transform config. Default
            ``dict(type='mmlocal.RepLScalarMix')`` (v1). An unscoped type is
            looked up in mmlocal.
        fusion (str | None): ``'mirror'`` (default), ``'project'`` or
            None, see above.
        layer (str): ``'light'`` (default) or ``'full'``, see above.
            ``'light'`` supports mmdet/mmseg ``BasicBlock``/``Bottleneck``
            (plain convs, BatchNorm, no plugins/DCN) and mmseg
            ``TransformerEncoderLayer``; other blocks raise ``ValueError``
            (use ``'full'``).
        replaced_norm_eval (bool): Keep the replaced blocks' BN layers in
            eval mode when the backbone's ``norm_eval`` puts them there.
            Default False (they track their own statistics).
        synthesis (str): ``'batched'`` (default): with ``layer='light'``
            all replaced blocks are synthesised (and their norms folded)
            together in a few large ops per forward pass
            (:mod:`mmlocal.models.repl.batched`; far fewer kernel launches,
            same results); ``'per_block'``: each block on its own, before
            its forward. ``layer='full'`` always synthesises per block.
        compile_synthesis (bool | dict | None): Run the batched synthesis's
            tensor computation under ``torch.compile``
            (:mod:`mmlocal.utils.compile`: True for inductor's defaults; a
            dict of ``torch.compile`` arguments, e.g.
            ``dict(mode='reduce-overhead')`` for CUDA graphs on CUDA or
            ``dict(backend='aot_eager')``). Default False.
        pretrained (str, optional): Passed on to the inner backbone config
            (mmseg's ``EncoderDecoder`` sets ``backbone.pretrained``).
        init_cfg (dict, optional): Of this wrapper (the inner backbone keeps
            its own).
    """

    def __init__(self,
                 backbone,
                 interval=None,
                 blocks=None,
                 transform=dict(type='mmlocal.RepLScalarMix'),
                 fusion='mirror',
                 layer='light',
                 replaced_norm_eval=False,
                 synthesis='batched',
                 compile_synthesis=False,
                 pretrained=None,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.backbone = _build_backbone(backbone, pretrained)
        name = type(self.backbone).__name__
        if fusion not in FUSION_RULES:
            raise ValueError(f'fusion={fusion!r} must be one of '
                             f'{FUSION_RULES} for RepLBackbone({name})')
        if layer not in LAYER_MODES:
            raise ValueError(f'layer={layer!r} must be one of {LAYER_MODES} '
                             f'for RepLBackbone({name})')
        self.layer = layer
        transform_class(transform)  # fail early on a bad type
        self.transform_cfg = copy.deepcopy(dict(transform))
        self.fusion = fusion
        self.replaced_norm_eval = replaced_norm_eval
        self.units = _units(self.backbone)
        chosen = _select(self.units, interval, blocks, fusion, name, layer)
        self.interval = interval
        self.replacements = nn.ModuleDict()
        for unit, prev_unit, next_unit, rules, light in chosen:
            self.replacements[unit.name.replace('.', '_')] = \
                BlockReplacement(
                    unit.module,
                    prev_unit.module if prev_unit else None,
                    next_unit.module if next_unit else None,
                    rules, self.transform_cfg, unit.name, light=light)
        self.plan = [
            dict(
                index=unit.index,
                name=unit.name,
                prev=prev_unit.name if prev_unit else None,
                next=next_unit.name if next_unit else None,
                rules={
                    (f'{p}.{n}' if p else n): r
                    for (p, n), r in rep.rules.items()
                }) for (unit, prev_unit, next_unit, _, _), rep in zip(
                    chosen, self.replacements.values())
        ]
        if synthesis not in SYNTHESIS_MODES:
            raise ValueError(f'synthesis={synthesis!r} must be one of '
                             f'{SYNTHESIS_MODES} for RepLBackbone({name})')
        compile_synthesis = check_compile_option(compile_synthesis,
                                                 'compile_synthesis')
        if compile_synthesis is not None and synthesis != 'batched':
            raise ValueError(
                'compile_synthesis needs synthesis=\'batched\' (got '
                f'synthesis={synthesis!r}) for RepLBackbone({name})')
        self.synthesis = synthesis
        self.engine = None
        if synthesis == 'batched':
            engine = BatchedSynthesis(
                list(self.replacements.values()), compile=compile_synthesis)
            if engine.reason is None:
                self.engine = engine
                for rep in self.replacements.values():
                    rep._engine[0] = engine
            elif compile_synthesis is not None:
                raise ValueError(
                    'compile_synthesis: the batched synthesis does not '
                    f'apply to this RepLBackbone({name}): {engine.reason}')
        # what LocalLearner / necks read from a backbone
        if hasattr(self.backbone, 'out_indices'):
            self.out_indices = self.backbone.out_indices
        self.register_load_state_dict_pre_hook(self._accept_stock_keys)
        self.register_state_dict_pre_hook(_flush_statistics)

    # ------------------------------------------------------------------
    @property
    def replaced_blocks(self):
        """Names of the replaced blocks (attribute paths in the backbone)."""
        return [p['name'] for p in self.plan]

    @property
    def kept_tensors(self):
        """``'<block>.<layer>.<param>'`` of tensors that no neighbour
        provides and that stay trainable parameters of a replaced block."""
        return [
            f'{p["name"]}.{t}' for p in self.plan
            for t, r in p['rules'].items() if r == OWN
        ]

    @property
    def skipped_tensors(self):
        """``'<block>.<layer>.<param>'`` of the tensors that the light layer
        does not use (removed; they fold to identity layers)."""
        return [
            f'{p["name"]}.{t}' for p in self.plan
            for t, r in p['rules'].items() if r == UNUSED
        ]

    def forward(self, x):
        if self.engine is None:
            return self.backbone(x)
        # the neighbours' two gradients (own use, synthesis) are added in
        # a few ops: BatchedSynthesis.shared_sources
        with self.engine.shared_sources():
            return self.backbone(x)

    def train(self, mode=True):
        super().train(mode)
        if mode and not self.replaced_norm_eval:
            for rep in self.replacements.values():
                for m in rep.block.modules():
                    if isinstance(m, _BatchNorm):
                        m.train()
        return self

    def init_weights(self):
        if self.engine is not None:
            self.engine.reset()
        super().init_weights()
        for rep in self.replacements.values():
            for m in rep.block.modules():
                if isinstance(m, _BatchNorm) and m.track_running_stats:
                    m.reset_running_stats()
                    statistics_reset(m)
        print_log(
            f'RepLBackbone({type(self.backbone).__name__}): '
            f'{len(self.plan)} blocks replaced {self.replaced_blocks}; '
            'their weights are synthesised from their neighbours (pretrained '
            'weights of these blocks are not used, their BN statistics were '
            'reset)',
            logger='current')
        zero = self.zero_synthesized_norms()
        if zero:
            print_log(
                f'RepLBackbone: the synthesised norm weights {zero} are zero '
                '(their sources are zero, e.g. mmdet ResNet\'s '
                'zero_init_residual=True without pretrained weights): the '
                'residual branch of these blocks is constant and every '
                'transform of the block gets a zero gradient until the '
                "neighbours' norm weights have moved (from the second "
                'step); zero_init_residual=False in the inner backbone '
                'avoids it',
                logger='current',
                level=logging.WARNING)

    def zero_synthesized_norms(self):
        """``'<block>.<norm>.weight'`` of every synthesised norm weight whose
        sources are all zero (then the synthesised weight is zero for every
        transform: each is linear in its sources). With mmdet's
        ``zero_init_residual=True`` and random init this is the last norm
        of every replaced ResNet block, and the gradient of the block's
        transforms (and of its other synthesised tensors) is exactly zero
        until the neighbours' norm weights change."""
        found = []
        for rep in self.replacements.values():
            for path, name in rep.synthesized:
                if name != 'weight' or not isinstance(
                        rep.block.get_submodule(path), _BatchNorm):
                    continue
                with torch.no_grad():
                    sources = [
                        rep._source(side, how, path, name) for side, how in
                        enumerate(RULE_SOURCES[rep.rules[(path, name)]])
                    ]
                sources = [t for t in sources if t is not None]
                if sources and all(not t.any() for t in sources):
                    found.append(f'{rep.block_name}.{path}.{name}')
        return found

    # ------------------------------------------------------------------
    def _synthesized_keys(self):
        """Stock keys (relative to the inner backbone) of the replaced
        blocks' removed parameters (synthesised, or skipped by the light
        layer)."""
        return [
            f'{rep.block_name}.{p}.{n}' if p else f'{rep.block_name}.{n}'
            for rep in self.replacements.values() for p, n in rep.removed
        ]

    def _accept_stock_keys(self, module, state_dict, prefix, local_metadata,
                           strict, missing_keys, unexpected_keys, error_msgs):
        """Load a stock-keyed backbone state dict: ``<prefix>layer1...`` ->
        ``<prefix>backbone.layer1...``; replaced blocks' weights dropped."""
        if self.engine is not None:
            self.engine.reset()
        own = prefix + 'backbone.'
        mine = prefix + 'replacements.'
        inner_keys = set(self.backbone.state_dict(keep_vars=True))
        replaced = set(self._synthesized_keys())
        dropped = []
        for key in list(state_dict):
            if not key.startswith(prefix) or key.startswith(mine):
                continue
            rest = key[len(own):] if key.startswith(own) else \
                key[len(prefix):]
            if rest in replaced:
                state_dict.pop(key)
                dropped.append(rest)
            elif not key.startswith(own) and rest in inner_keys:
                state_dict[own + rest] = state_dict.pop(key)
        if dropped:
            print_log(
                f'RepLBackbone: ignored {len(dropped)} tensors of replaced '
                f'blocks in the loaded state dict (e.g. {dropped[0]}); they '
                'are synthesised from their neighbours',
                logger='current')

    def fold_state_dict(self):
        """The stock backbone's state dict, synthesised weights materialised.

        Keys are those of the inner backbone (``layer1.0.conv1.weight``), in
        the order the stock backbone's ``state_dict()`` uses, so the result
        loads strictly into the stock backbone and gives the same outputs as
        this module (both in eval mode).
        """
        folded = {}
        param_order = {}
        for rep in self.replacements.values():
            for rel, tensor in rep.folded_tensors().items():
                folded[f'{rep.block_name}.{rel}'] = tensor
            for path, names in rep.param_order.items():
                full = f'{rep.block_name}.{path}' if path else rep.block_name
                param_order[full] = names
        state = self.backbone.state_dict()
        out = OrderedDict()
        for mname, module in self.backbone.named_modules():
            prefix = f'{mname}.' if mname else ''
            names = param_order.get(
                mname,
                [n for n, p in module._parameters.items() if p is not None])
            for n in names:
                key = prefix + n
                out[key] = folded[key] if key in folded else state[key]
            for n, b in module._buffers.items():
                key = prefix + n
                if b is not None and key in state:
                    out[key] = folded[key] if key in folded else state[key]
        missing = set(state) - set(out)
        out.update((k, state[k]) for k in state if k in missing)
        return out

    def extra_repr(self):
        return (f'interval={self.interval}, fusion={self.fusion!r}, '
                f'layer={self.layer!r}, synthesis={self.synthesis!r}, '
                f'replaced={self.replaced_blocks}')


# ---------------------------------------------------------------- helpers
SYNTHESIS_MODES = ('batched', 'per_block')


def _flush_statistics(module, prefix, keep_vars):
    """State dicts carry the statistics of the last forward pass."""
    if module.engine is not None:
        module.engine.flush()


def _build_backbone(backbone, pretrained):
    if isinstance(backbone, nn.Module):
        if pretrained is not None:
            raise ValueError('RepLBackbone: pretrained is only supported '
                             'with a backbone config, not a built module')
        return backbone
    if not isinstance(backbone, dict) or 'type' not in backbone:
        raise ValueError(f'RepLBackbone: backbone={backbone!r} must be a '
                         'config dict with a type or an nn.Module')
    cfg = copy.deepcopy(backbone)
    btype = cfg.get('type')
    if isinstance(btype, str) and str(btype).endswith('RepLBackbone'):
        raise ValueError('RepLBackbone: backbone is itself a RepLBackbone')
    if '_scope_' not in cfg and isinstance(btype, str) and '.' in btype:
        # 'mmseg.ResNetV1c': build (and nested builds) in mmseg's scope
        cfg['_scope_'] = btype.split('.')[0]
    if pretrained is not None:
        if cfg.get('pretrained') is not None:
            raise ValueError('RepLBackbone: pretrained given twice (here and '
                             'in backbone)')
        cfg['pretrained'] = pretrained
    return MODELS.build(cfg)


def _units(backbone):
    units = conv_units(backbone)
    if units is None:
        units = vit_units(backbone)
    if units is None:
        names = ', '.join(f'{t.__module__.split(".")[0]}.{t.__name__}'
                          for t in conv_supported_types() + vit_types())
        raise ValueError(
            f'backbone={type(backbone).__name__} is not supported by '
            f'RepLBackbone; supported (and subclasses): {names}')
    return units


def _neighbours(units, unit, fusion=None):
    """Blocks ``k-1`` and ``k+1`` of ``unit`` inside its stage; with
    ``fusion='project'`` the successor of a stage's last block is the next
    stage's first block (its tensors are projected to the block's shapes),
    and only the backbone's last block has none."""
    prev_unit = units[unit.index - 1] if unit.position > 0 else None
    if unit.position + 1 < unit.stage_size:
        next_unit = units[unit.index + 1]
    elif fusion == 'project' and unit.index + 1 < len(units):
        next_unit = units[unit.index + 1]
    else:
        next_unit = None
    return prev_unit, next_unit


def _as_index(value, option, name):
    if isinstance(value, bool):
        raise ValueError(f'{option}={value!r} must be an int for {name}')
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(
            f'{option}={value!r} must be an int for {name}') from None


def _matches(unit, prev_unit, next_unit, layer, fusion=None):
    """``(matches, light spec)`` of a unit: with ``layer='light'`` only the
    layers its light operator uses need neighbours."""
    light = light_spec(unit.module, unit.name) if layer == 'light' else None
    matches = match_sources(unit.module, prev_unit and prev_unit.module,
                            next_unit and next_unit.module,
                            project=fusion == 'project')
    if light is not None:
        matches = [m for m in matches if light.uses(m[0])]
    return matches, light


def _select(units, interval, blocks, fusion, name, layer='full'):
    """``[(unit, prev unit, next unit, rules, light spec)]`` of the blocks
    to replace."""
    if (interval is None) == (blocks is None):
        raise ValueError(
            'give exactly one of interval and blocks to RepLBackbone('
            f'{name}) (got interval={interval!r}, blocks={blocks!r})')
    chosen = []
    if interval is not None:
        interval = _as_index(interval, 'interval', name)
        if interval < 2:
            raise ValueError(
                f'interval={interval} must be >= 2 for {name}: interval=n '
                'replaces every n-th block of a stage and each replaced '
                'block needs its kept neighbours')
        for unit in units:
            if (unit.position + 1) % interval or unit.refusal or unit.frozen:
                continue
            prev_unit, next_unit = _neighbours(units, unit, fusion)
            matches, light = _matches(unit, prev_unit, next_unit, layer,
                                      fusion)
            try:
                rules = choose_rules(unit.name, matches, fusion, 'interval')
            except ValueError:
                continue  # interval plans skip what the rule can't fuse
            chosen.append((unit, prev_unit, next_unit, rules, light))
        if not chosen:
            raise ValueError(
                f'interval={interval} selects no replaceable block of {name} '
                f'(fusion={fusion!r}; frozen blocks and the first block of '
                'each stage are never replaced)')
        return chosen

    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, '__iter__'):
        raise ValueError(f'blocks={blocks!r} must be a list of block '
                         f'indices for {name}')
    indices = [_as_index(b, 'blocks', name) for b in blocks]
    if not indices:
        raise ValueError(f'blocks=[] selects no block of {name}')
    if len(set(indices)) != len(indices):
        raise ValueError(f'blocks={indices} has duplicates for {name}')
    bad = [i for i in indices if not 0 <= i < len(units)]
    if bad:
        raise ValueError(
            f'blocks={indices} out of range for {name}: {bad} not in '
            f'[0, {len(units) - 1}] ({len(units)} replaceable units)')
    selected = set(indices)
    for i in sorted(indices):
        unit = units[i]
        if unit.refusal:
            raise ValueError(f'blocks={indices}: block {i} ({unit.name}) of '
                             f'{name} cannot be replaced: {unit.refusal}')
        if unit.frozen:
            raise ValueError(
                f'blocks={indices}: block {i} ({unit.name}) of {name} is '
                'frozen (frozen_stages); RepL replaces trainable blocks')
        prev_unit, next_unit = _neighbours(units, unit, fusion)
        for other in (prev_unit, next_unit):
            if other is not None and other.index in selected:
                raise ValueError(
                    f'blocks={indices}: blocks {min(i, other.index)} and '
                    f'{max(i, other.index)} of {name} are neighbours; a '
                    'replaced block is synthesised from its neighbours, '
                    'which must be kept')
        matches, light = _matches(unit, prev_unit, next_unit, layer, fusion)
        rules = choose_rules(unit.name, matches, fusion, 'blocks')
        chosen.append((unit, prev_unit, next_unit, rules, light))
    return chosen


def stock_model_cfg(cfg):
    """A copy of a model config with every ``RepLBackbone`` replaced by its
    inner backbone config (and ``LocalLearner`` by its model): the stock
    mmdet/mmseg model that a folded checkpoint loads into."""

    def walk(node):
        if isinstance(node, dict):
            node_type = node.get('type')
            if isinstance(node_type, str):
                if node_type.endswith('LocalLearner'):
                    return walk(node['model'])
                if node_type.endswith('RepLBackbone'):
                    inner = copy.deepcopy(node['backbone'])
                    if node.get('pretrained') is not None:
                        inner['pretrained'] = node['pretrained']
                    return walk(inner)
            out = type(node)()
            for k, v in node.items():
                out[k] = walk(v)
            return out
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return copy.deepcopy(node)

    return walk(cfg)


def fold_repl_state_dict(model):
    """State dict of ``model`` with every :class:`RepLBackbone` folded into
    its stock backbone (keys as in the stock model)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, RepLBackbone)]
    state = model.state_dict()
    if not found:
        return state
    out, done = OrderedDict(), set()
    for key, value in state.items():
        owner = next(
            (n for n, _ in found if n == '' or key.startswith(n + '.')), None)
        if owner is None:
            out[key] = value
            continue
        if owner in done:
            continue
        done.add(owner)
        for k, v in dict(found)[owner].fold_state_dict().items():
            out[f'{owner}.{k}' if owner else k] = v
    return out


class RepLBlockSequence:
    """:class:`BlockSequence` adapter so that ``LocalLearner`` can split a
    :class:`RepLBackbone`: it is viewed as its inner backbone. The replaced
    blocks synthesise their weights in a forward pre-hook, so running them
    block by block needs nothing else."""

    @classmethod
    def backbone_types(cls):
        return (RepLBackbone, )

    @classmethod
    def check_backbone(cls, backbone):
        pass

    def __new__(cls, backbone):
        return build_block_sequence(backbone.backbone)


if RepLBlockSequence not in BLOCK_SEQUENCE_ADAPTERS:
    BLOCK_SEQUENCE_ADAPTERS.append(RepLBlockSequence)
