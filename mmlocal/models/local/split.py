"""A backbone as an ordered sequence of blocks, and how to cut it.

Supervised local learning splits a backbone into ``K`` gradient-isolated
modules at block granularity (ResNet-50: 16 bottlenecks). This file knows the
backbones, nothing about losses:

- :class:`BlockSequence` views a backbone as ``stem`` + ``blocks[0..N)`` and
  runs any contiguous range of blocks, recording the stage outputs the
  backbone's ``out_indices`` asks for, so that ``forward_stem`` + all ranges
  + ``collect`` is exactly ``backbone(x)``;
- :func:`build_block_sequence` picks the adapter for a backbone;
- :func:`plan_split` turns ``num_modules`` / ``split_points`` into block
  ranges;
- :func:`module_output_info` says what each module hands on (channels,
  stride, stage, the next module's first block).

Nothing here changes the backbone: block channels and strides come from the
blocks' configuration attributes, not from a probe forward.
"""
import contextlib
import itertools
import operator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def checkpoint_block(block, x):
    """``block(x)`` keeping only ``x`` for backward: the block's forward
    runs again during backward (non-reentrant ``torch.utils.checkpoint``,
    so parameters get gradients when ``x`` needs none, and
    ``backward(inputs=...)`` / ``retain_graph`` work). Unlike the stock
    blocks' ``with_cp``, the recomputation leaves BN running statistics
    alone (``momentum`` 0 and ``num_batches_tracked`` restored while it
    runs), so statistics, outputs and gradients equal a plain forward's.
    """
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(),
                                          _NormStatisticsFrozen(block)))


class _NormStatisticsFrozen:
    """BN running statistics untouched while the block runs again (a class:
    a retained graph recomputes once per backward pass through it)."""

    def __init__(self, module):
        self.module = module
        self.saved = []

    def __enter__(self):
        norms = [
            m for m in self.module.modules() if isinstance(m, _BatchNorm)
            and m.training and m.track_running_stats
        ]
        self.saved = [(m, m.momentum, m.num_batches_tracked.clone())
                      for m in norms]
        for m in norms:
            m.momentum = 0.0  # running = 1 * running + 0 * batch
        return self

    def __exit__(self, *exc):
        for m, momentum, tracked in self.saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        self.saved = []
        return False


class BlockSequence:
    """A backbone as a stem followed by an ordered list of blocks.

    The model stays the owner of its modules: this adapter is a plain object
    (not an ``nn.Module``), so wrapping a backbone registers no parameter
    twice and changes no state-dict key. With ``h_0 = stem(x)`` and
    ``h_i = block_i(h_{i-1})``,

    .. math::
        \\mathrm{backbone}(x) = (h_{e(s)})_{s \\in \\mathrm{out\\_indices}}

    where ``e(s)`` is the last block of stage ``s``. Running the blocks range
    by range (``forward_blocks``), with inputs detached between ranges, gives
    the same tensors as the backbone's own forward.

    The blocks are called one by one, so forward hooks registered on a
    stage *container* (e.g. ``backbone.layer2``) do not fire; hooks on the
    blocks themselves and on their submodules do.

    Subclasses describe one backbone family; build them with
    :func:`build_block_sequence`.

    Args:
        backbone (nn.Module): The backbone to view.

    Attributes:
        backbone (nn.Module): The viewed backbone.
        blocks (list[nn.Module]): The blocks in execution order, stem
            excluded.
        block_names (list[str]): Attribute paths of the blocks, so that
            ``backbone.get_submodule(block_names[i]) is blocks[i]``.
        block_stage (list[int]): Stage index of each block, in the numbering
            of the backbone's ``out_indices``.
        block_out_channels (list[int]): Channels of each block's output.
        block_strides (list[int]): Total stride (w.r.t. the input image) of
            each block's output.
        stem_out_channels (int): Channels of the stem output.
        stem_stride (int): Total stride of the stem output.
        stem_stage (int | None): Index of the stem in ``out_indices``
            numbering, or None when the stem cannot be an output (ResNet).
    """

    def __init__(self, backbone):
        self.backbone = backbone
        # indices of blocks run under activation checkpointing (set by
        # LocalLearner's ``checkpoint_blocks``)
        self.checkpointed = frozenset()
        self.blocks = []
        self.block_names = []
        self.block_stage = []
        self.block_out_channels = []
        self.block_strides = []
        stride = self.stem_stride = self._stem_stride()
        self.stem_out_channels = self._stem_out_channels()
        for stage, layer_name in self._stage_layers():
            layer = getattr(backbone, layer_name)
            if not (isinstance(layer, nn.Sequential)
                    and type(layer).forward is nn.Sequential.forward):
                raise ValueError(
                    f'{type(backbone).__name__}.{layer_name} is a '
                    f'{type(layer).__name__} with its own forward(); '
                    'BlockSequence can only cut plain nn.Sequential stages')
            for child_name, block in layer.named_children():
                stride *= self._block_stride(block)
                self.blocks.append(block)
                self.block_names.append(f'{layer_name}.{child_name}')
                self.block_stage.append(stage)
                self.block_out_channels.append(self._block_out_channels(block))
                self.block_strides.append(stride)
        if not self.blocks:
            raise ValueError(
                f'{type(backbone).__name__} has no blocks to split')
        out_indices = set(backbone.out_indices)
        # block index -> stage, for the last block of every output stage
        self._output_blocks = {
            i: s
            for i, s in enumerate(self.block_stage) if s in out_indices and (
                i + 1 == len(self.blocks) or self.block_stage[i + 1] != s)
        }
        stages = ([] if self.stem_stage is None else [self.stem_stage]) + \
            sorted(set(self.block_stage))
        # backbone.forward appends outputs while walking its layers in order
        self.out_stages = [s for s in stages if s in out_indices]

    # ---------------------------------------------------------------- family
    # What a subclass describes about its backbone family.

    stem_stage = None

    @classmethod
    def backbone_types(cls):
        """The backbone classes this adapter handles (subclasses included)."""
        raise NotImplementedError

    @classmethod
    def check_backbone(cls, backbone):
        """Raise ValueError if a subclass of a supported type changed what
        this adapter relies on (by default: ``forward``)."""
        for base in cls.backbone_types():
            if isinstance(backbone, base):
                if type(backbone).forward is not base.forward:
                    raise ValueError(
                        f'{type(backbone).__name__} subclasses '
                        f'{_qualified(base)} but overrides forward(), which '
                        f'{cls.__name__} reproduces block by block; it is '
                        'not supported. Supported backbones: '
                        f'{supported_backbones()}')
                return

    def _stage_layers(self):
        """``[(stage index, attribute name of the stage container)]``."""
        raise NotImplementedError

    def _stem_modules(self):
        """The stem's modules that hold parameters."""
        raise NotImplementedError

    def _stem_stride(self):
        raise NotImplementedError

    def _stem_out_channels(self):
        raise NotImplementedError

    def _block_stride(self, block):
        """Stride of one block (1 when it keeps the resolution)."""
        raise NotImplementedError

    def _block_out_channels(self, block):
        raise NotImplementedError

    def _frozen_by_config(self, stage):
        """Whether ``frozen_stages`` freezes a stage (the stem: None)."""
        raise NotImplementedError

    def forward_stem(self, x, outs=None):
        """Run the stem.

        Args:
            x (Tensor): The input images.
            outs (dict, optional): Where to record the stem output when the
                stem is one of the backbone's outputs (CSP ``out_indices``
                containing 0).

        Returns:
            Tensor: The stem output, input of ``blocks[0]``.
        """
        raise NotImplementedError

    # -------------------------------------------------------------- running
    def forward_blocks(self, x, start, end, outs):
        """Run ``blocks[start:end]``.

        Args:
            x (Tensor): Input of ``blocks[start]``.
            start (int): First block to run.
            end (int): One past the last block to run.
            outs (dict): When block ``i`` is the last block of a stage ``s``
                in ``backbone.out_indices``, ``outs[s]`` is set to its output.

        Returns:
            Tensor: The output of ``blocks[end - 1]`` (``x`` if the range is
            empty).
        """
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(
                f'block range [{start}, {end}) is not inside the '
                f'{self.num_blocks} blocks of {self.backbone_name}')
        for i in range(start, end):
            if i in self.checkpointed and torch.is_grad_enabled():
                x = checkpoint_block(self.blocks[i], x)
            else:
                x = self.blocks[i](x)
            if i in self._output_blocks:
                outs[self._output_blocks[i]] = x
        return x

    def collect(self, outs):
        """The recorded stage outputs as ``backbone.forward`` returns them.

        Like the backbone, the tuple follows the stage order of the layers
        (ascending stage index) for the stages in ``out_indices``.
        """
        missing = [s for s in self.out_stages if s not in outs]
        if missing:
            raise KeyError(
                f'outputs of stages {missing} of {self.backbone_name} were '
                'not recorded: run forward_stem and every block first')
        return tuple(outs[s] for s in self.out_stages)

    def forward(self, x):
        """Stem, every block, collect: equal to ``backbone(x)``."""
        outs = {}
        x = self.forward_stem(x, outs)
        self.forward_blocks(x, 0, self.num_blocks, outs)
        return self.collect(outs)

    __call__ = forward

    # ----------------------------------------------------------- properties
    @property
    def backbone_name(self):
        return type(self.backbone).__name__

    @property
    def num_blocks(self):
        return len(self.blocks)

    @property
    def stem_frozen(self):
        """Whether the stem has no trainable parameter (or is frozen by
        ``frozen_stages``)."""
        if self._frozen_by_config(None):
            return True
        return not any(p.requires_grad for m in self._stem_modules()
                       for p in m.parameters())

    @property
    def num_frozen_blocks(self):
        """Number of leading blocks that train nothing.

        A block counts as frozen when none of its parameters requires grad,
        or when the backbone's ``frozen_stages`` covers its stage. The second
        rule matters for CSPDarknet/CSPNeXt, which only freeze parameters in
        ``train()``, so right after building they still require grad.
        Computed on access, so it follows later freezing.
        """
        count = 0
        for block, stage in zip(self.blocks, self.block_stage):
            if not (self._frozen_by_config(stage)
                    or not any(p.requires_grad for p in block.parameters())):
                break
            count += 1
        return count

    @property
    def stage_starts(self):
        """Block indices (> 0) where a new stage begins."""
        return [
            i for i in range(1, self.num_blocks)
            if self.block_stage[i] != self.block_stage[i - 1]
        ]

    def __repr__(self):
        lines = [
            f'{type(self).__name__}({self.backbone_name}: '
            f'{self.num_blocks} blocks, {self.num_frozen_blocks} frozen, '
            f'stem stride {self.stem_stride} channels '
            f'{self.stem_out_channels}'
        ]
        for i, name in enumerate(self.block_names):
            lines.append(f'  [{i}] {name}: stage {self.block_stage[i]}, '
                         f'stride {self.block_strides[i]}, '
                         f'channels {self.block_out_channels[i]}')
        return '\n'.join(lines) + ')'


def _qualified(cls):
    """``mmdet.ResNet`` style name of a class."""
    return f'{cls.__module__.split(".")[0]}.{cls.__name__}'


def _conv_stride(conv):
    stride = conv.stride
    return stride[0] if isinstance(stride, tuple) else stride


class ResNetBlockSequence(BlockSequence):
    """mmdet's and mmseg's ``ResNet`` and their subclasses that keep its
    forward (``ResNetV1c``, ``ResNetV1d``, ``ResNeXt``, ``Res2Net``,
    ``ResNeSt``).

    Stem: ``stem`` (deep stem) or ``conv1``/``norm1``/``relu``, then
    ``maxpool``. Blocks: the children of ``layer1 .. layer{num_stages}``;
    ``layer{i+1}`` is stage ``i`` of ``out_indices``. ``frozen_stages=k``
    freezes the stem and ``layer1 .. layer{k}``.
    """

    @classmethod
    def backbone_types(cls):
        types = []
        try:
            from mmdet.models.backbones import ResNet as MMDetResNet
            types.append(MMDetResNet)
        except ImportError:
            pass
        try:
            from mmseg.models.backbones import ResNet as MMSegResNet
            types.append(MMSegResNet)
        except ImportError:
            pass
        return tuple(types)

    def _stage_layers(self):
        return list(enumerate(self.backbone.res_layers))

    def _stem_modules(self):
        backbone = self.backbone
        if backbone.deep_stem:
            return [backbone.stem]
        return [backbone.conv1, backbone.norm1]

    def _stem_stride(self):
        backbone = self.backbone
        convs = [
            m for m in self._stem_modules()[0].modules()
            if isinstance(m, nn.Conv2d)
        ] if backbone.deep_stem else [backbone.conv1]
        stride = 1
        for conv in convs:
            stride *= _conv_stride(conv)
        return stride * _conv_stride(backbone.maxpool)

    def _stem_out_channels(self):
        return self.backbone.stem_channels

    def _block_stride(self, block):
        return block.stride

    def _block_out_channels(self, block):
        # Bottleneck (and ResNeXt/Res2Net/ResNeSt variants) end in conv3,
        # BasicBlock in conv2; plugins after conv3 keep the channels
        last = block.conv3 if hasattr(block, 'conv3') else block.conv2
        return last.out_channels

    def _frozen_by_config(self, stage):
        frozen_stages = self.backbone.frozen_stages
        if stage is None:
            return frozen_stages >= 0
        return stage < frozen_stages

    def forward_stem(self, x, outs=None):
        backbone = self.backbone
        if backbone.deep_stem:
            x = backbone.stem(x)
        else:
            x = backbone.conv1(x)
            x = backbone.norm1(x)
            x = backbone.relu(x)
        return backbone.maxpool(x)


class CSPBlockSequence(BlockSequence):
    """mmdet's ``CSPDarknet`` (YOLOX) and ``CSPNeXt`` (RTMDet).

    ``backbone.layers`` is ``['stem', 'stage1', ...]`` and ``out_indices``
    counts the stem as 0, so ``stage{i}`` is stage ``i``. Each stage is
    ``Sequential(downsample ConvModule, [SPPBottleneck], CSPLayer)``; its
    children are the blocks (a CSPLayer is atomic: its two branches meet in
    ``final_conv``). ``frozen_stages=k`` freezes ``layers[0..k]``, the stem
    included.
    """

    stem_stage = 0

    @classmethod
    def backbone_types(cls):
        try:
            from mmdet.models.backbones import CSPDarknet, CSPNeXt
        except ImportError:
            return ()
        return (CSPDarknet, CSPNeXt)

    def _stage_layers(self):
        return [(i, name) for i, name in enumerate(self.backbone.layers)
                if i > 0]

    def _stem_modules(self):
        return [self.backbone.stem]

    def _stem_stride(self):
        from mmdet.models.backbones.csp_darknet import Focus
        stem = self.backbone.stem
        if isinstance(stem, Focus):  # space-to-depth halves the resolution
            return 2 * self._block_stride(stem.conv)
        stride = 1
        for module in stem:
            stride *= self._block_stride(module)
        return stride

    def _stem_out_channels(self):
        from mmdet.models.backbones.csp_darknet import Focus
        stem = self.backbone.stem
        return self._block_out_channels(
            stem.conv if isinstance(stem, Focus) else stem[-1])

    def _block_stride(self, block):
        from mmcv.cnn import ConvModule, DepthwiseSeparableConvModule
        from mmdet.models.backbones.csp_darknet import SPPBottleneck
        from mmdet.models.layers import CSPLayer
        if isinstance(block, ConvModule):
            return _conv_stride(block.conv)
        if isinstance(block, DepthwiseSeparableConvModule):
            return _conv_stride(block.depthwise_conv.conv)
        if isinstance(block, (SPPBottleneck, CSPLayer)):
            return 1
        raise ValueError(f'unknown block type {type(block).__name__} in '
                         f'{self.backbone_name}')

    def _block_out_channels(self, block):
        from mmcv.cnn import ConvModule, DepthwiseSeparableConvModule
        from mmdet.models.backbones.csp_darknet import SPPBottleneck
        from mmdet.models.layers import CSPLayer
        if isinstance(block, ConvModule):
            return block.conv.out_channels
        if isinstance(block, DepthwiseSeparableConvModule):
            return block.pointwise_conv.conv.out_channels
        if isinstance(block, SPPBottleneck):
            return self._block_out_channels(block.conv2)
        if isinstance(block, CSPLayer):
            return self._block_out_channels(block.final_conv)
        raise ValueError(f'unknown block type {type(block).__name__} in '
                         f'{self.backbone_name}')

    def _frozen_by_config(self, stage):
        return (0 if stage is None else stage) <= \
            self.backbone.frozen_stages

    def forward_stem(self, x, outs=None):
        x = self.backbone.stem(x)
        if outs is not None and self.stem_stage in self.out_stages:
            outs[self.stem_stage] = x
        return x


#: Adapters tried in order by :func:`build_block_sequence`.
BLOCK_SEQUENCE_ADAPTERS = [ResNetBlockSequence, CSPBlockSequence]


def supported_backbones():
    """Names of the supported backbone classes, e.g. ``'mmdet.ResNet'``."""
    return ', '.join(
        _qualified(t) for adapter in BLOCK_SEQUENCE_ADAPTERS
        for t in adapter.backbone_types())


def build_block_sequence(backbone):
    """View a backbone as a :class:`BlockSequence`.

    The adapter is chosen by ``isinstance``, so subclasses of a supported
    backbone are accepted as long as they keep its ``forward``.

    Args:
        backbone (nn.Module): An mmdet/mmseg backbone.

    Returns:
        BlockSequence: The adapter.

    Raises:
        ValueError: If no adapter supports ``type(backbone)``.
    """
    for adapter in BLOCK_SEQUENCE_ADAPTERS:
        types = adapter.backbone_types()
        if types and isinstance(backbone, types):
            adapter.check_backbone(backbone)
            return adapter(backbone)
    raise ValueError(
        f'cannot split backbone {type(backbone).__name__} into local-learning '
        f'modules; supported backbones (and their subclasses): '
        f'{supported_backbones()}')


def _as_int(value, option, backbone_name):
    if isinstance(value, bool):
        raise ValueError(
            f'{option}={value!r} must be an int for {backbone_name}')
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(
            f'{option}={value!r} must be an int for {backbone_name}') from None


def _ranges(points, num_blocks):
    bounds = [0] + list(points) + [num_blocks]
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def plan_split(seq, num_modules=None, split_points=None, stage_aligned=False):
    """Cut a block sequence into ``K`` contiguous modules.

    Frozen leading blocks (``seq.num_frozen_blocks``, e.g. ResNet
    ``frozen_stages``) never form a module of their own: they are prepended
    to module 0 and are not counted when balancing.

    Args:
        seq (BlockSequence): The backbone's blocks.
        num_modules (int, optional): ``K``. The trainable blocks are split
            into ``K`` contiguous groups whose sizes differ by at most one;
            the larger groups come **last**, because early blocks hold the
            larger activations. ``K == 1`` is end-to-end training.
        split_points (Sequence[int], optional): Block indices where a new
            module starts, strictly increasing, each in
            ``(num_frozen_blocks, num_blocks)``. ``[]`` is ``K == 1``.
        stage_aligned (bool): Only cut where a stage starts. With
            ``num_modules``, the ``K - 1`` stage starts are chosen to
            minimise the largest group (then the spread, then putting the
            larger groups last); ``K`` is at most the number of trainable
            stages. With ``split_points``, each point must be a stage start.

    Exactly one of ``num_modules`` / ``split_points`` must be given.

    Returns:
        list[tuple[int, int]]: ``K`` ``(start, end)`` block ranges covering
        ``[0, num_blocks)`` in order.

    Raises:
        ValueError: Naming the option, its value, the limit and the
            backbone.
    """
    name = seq.backbone_name
    num_blocks = seq.num_blocks
    num_frozen = seq.num_frozen_blocks
    num_trainable = num_blocks - num_frozen
    frozen_note = (f' ({num_frozen} leading blocks are frozen)'
                   if num_frozen else '')
    if (num_modules is None) == (split_points is None):
        raise ValueError(
            'give exactly one of num_modules and split_points to split '
            f'{name} (got num_modules={num_modules!r}, '
            f'split_points={split_points!r})')
    stage_starts = [i for i in seq.stage_starts if i > num_frozen]

    if split_points is not None:
        if isinstance(split_points,
                      (str, bytes)) or not hasattr(split_points, '__iter__'):
            raise ValueError(f'split_points={split_points!r} must be a list '
                             f'of block indices for {name}')
        points = [_as_int(p, 'split_points', name) for p in split_points]
        if any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError(
                f'split_points={points} must be strictly increasing (block '
                f'indices where a new module starts) for {name}')
        bad = [p for p in points if not 0 < p < num_blocks]
        if bad:
            raise ValueError(
                f'split_points={points} out of range for {name}: {bad} not '
                f'in [1, {num_blocks - 1}] ({num_blocks} blocks)')
        bad = [p for p in points if p <= num_frozen]
        if bad:
            raise ValueError(
                f'split_points={points} cut into the {num_frozen} frozen '
                f'leading blocks of {name} at {bad}: frozen blocks join '
                f'module 0, so each point must be in [{num_frozen + 1}, '
                f'{num_blocks - 1}]')
        if stage_aligned:
            bad = [p for p in points if p not in stage_starts]
            if bad:
                raise ValueError(
                    f'split_points={points} with stage_aligned=True: {bad} '
                    f'are not stage starts of {name} (trainable stage '
                    f'starts: {stage_starts})')
        return _ranges(points, num_blocks)

    k = _as_int(num_modules, 'num_modules', name)
    if k < 1:
        raise ValueError(f'num_modules={k} must be >= 1 for {name}')
    if k == 1:
        return [(0, num_blocks)]
    if k > num_trainable:
        raise ValueError(
            f'num_modules={k} exceeds the {num_trainable} trainable blocks '
            f'of {name}{frozen_note}')
    if stage_aligned:
        num_stages = len(stage_starts) + 1
        if k > num_stages:
            raise ValueError(
                f'num_modules={k} with stage_aligned=True exceeds the '
                f'{num_stages} trainable stages of {name}{frozen_note}')

        def cost(points):
            sizes = [e - s for s, e in _ranges(points, num_blocks)]
            sizes[0] -= num_frozen
            return (max(sizes), sum(n * n for n in sizes), points)

        # a backbone has a handful of stages: trying all cuts is cheap
        return _ranges(
            min(itertools.combinations(stage_starts, k - 1), key=cost),
            num_blocks)

    base, extra = divmod(num_trainable, k)
    sizes = [base] * (k - extra) + [base + 1] * extra
    points = list(itertools.accumulate([num_frozen] + sizes[:-1]))[1:]
    return _ranges(points, num_blocks)


def module_output_info(seq, ranges):
    """What each module of a split hands on.

    Args:
        seq (BlockSequence): The backbone's blocks.
        ranges (list[tuple[int, int]]): A split from :func:`plan_split`.

    Returns:
        list[dict]: Per module ``k``: ``range`` (its ``(start, end)``),
        ``out_channels``, ``stride`` and ``stage`` of its last block,
        ``last_block_name``, and ``next_block`` / ``next_block_name``: the
        first block of module ``k + 1`` (``None`` for the last module), which
        e.g. MAN copies into module ``k``'s auxiliary network.
    """
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != seq.num_blocks \
            or any(s >= e for s, e in ranges) \
            or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(
            f'ranges={list(ranges)} must be non-empty contiguous block '
            f'ranges covering [0, {seq.num_blocks}) of {seq.backbone_name}')
    info = []
    for k, (start, end) in enumerate(ranges):
        last = end - 1
        has_next = k + 1 < len(ranges)
        info.append(
            dict(
                range=(start, end),
                out_channels=seq.block_out_channels[last],
                stride=seq.block_strides[last],
                stage=seq.block_stage[last],
                last_block_name=seq.block_names[last],
                next_block=seq.blocks[end] if has_next else None,
                next_block_name=seq.block_names[end] if has_next else None,
                next_out_channels=seq.block_out_channels[end]
                if has_next else None,
                next_stride=seq.block_strides[end] if has_next else None))
    return info
