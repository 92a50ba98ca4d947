import copy

import torch.nn as nn
from mmcv.cnn import ConvModule

from mmlocal.registry import MODELS
from .base import BaseLocalAux, reset_parameters

STAGE_TRANSITIONS = ('entry_block', 'adapter')


def uniform_layer_indices(layer, num_layers, depth):
    """AugLocal's uniform sampling of the layers after ``layer``.

    ``round(l + (L - l - 1) / d * i)`` for ``i = 1..d``; when ``d >= L-1-l``
    every later layer ``l+1 .. L-1``. ``round`` is Python's (half to even),
    as in the reference code.

    Args:
        layer (int): ``l``, index of the hidden layer (0 = the stem).
        num_layers (int): ``L``, layers of the network (stem included).
        depth (int): ``d``, number of layers of the auxiliary net.
    """
    if not 0 <= layer < num_layers - 1:
        raise ValueError(f'layer={layer} has no later layer among '
                         f'{num_layers} layers')
    if depth >= num_layers - 1 - layer:
        return list(range(layer + 1, num_layers))
    return [round(layer + (num_layers - layer - 1) / depth * i)
            for i in range(1, depth + 1)]


def pyramid_depth(depth, index, num_modules, coeff):
    """AugLocal's pyramidal depth of module ``index``'s auxiliary net.

    ``d_k = max(1, round(d * (1 - r) + r))`` with ``r = k * c / (K - 2)``
    (``r = 0`` when ``K = 2``, where the reference divides by zero):
    ``d`` at the first module, ``round(d (1 - c) + c)`` at the last one with
    an auxiliary net (``k = K - 2``). ``coeff=None`` keeps ``d``.
    """
    if coeff is None:
        return depth
    ratio = index * coeff / (num_modules - 2) if num_modules > 2 else 0.0
    return max(1, round(depth * (1 - ratio) + ratio))


def _stage_entry(seq, index):
    """First block of the stage of block ``index``."""
    stage = seq.block_stage[index]
    return seq.block_stage.index(stage)


def _block_input(seq, index):
    """``(channels, stride)`` a block takes (the previous block's output)."""
    if index == 0:
        return seq.stem_out_channels, seq.stem_stride
    return seq.block_out_channels[index - 1], seq.block_strides[index - 1]


def _block_output(seq, index):
    return seq.block_out_channels[index], seq.block_strides[index]


def plan_block_stack(seq, after, sampled, transition='entry_block'):
    """Make a list of later blocks shape-consistent after block ``after``.

    Blocks of a stage after its first one keep the channels and stride, so
    only entering a new stage changes the shape. With
    ``transition='entry_block'`` a sampled block that cannot take the
    current feature (it is in a later stage and is not that stage's first
    block) is **replaced** by its stage's first (downsampling) block, which
    has the same widths plus the projection shortcut, and the first blocks
    of stages skipped entirely are **inserted**; the reference rebuilds each
    sampled CIFAR block to take its input in the same way. With
    ``'adapter'`` the sampled blocks are kept and a 1x1 conv + BN + ReLU
    (strided as needed) is put before any block whose input differs.

    Args:
        seq (BlockSequence): The backbone's blocks.
        after (int): The last block of the module (its output feeds the
            stack).
        sampled (list[int]): Increasing block indices, all ``> after``.
        transition (str): ``'entry_block'`` or ``'adapter'``.

    Returns:
        list[tuple]: ``('block', i)`` (a copy of block ``i``) or
        ``('adapter', in_channels, out_channels, stride)``.
    """
    if transition not in STAGE_TRANSITIONS:
        raise ValueError(f'stage_transition={transition!r} must be one of '
                         f'{STAGE_TRANSITIONS}')
    if not sampled or sampled[0] <= after or any(
            b <= a for a, b in zip(sampled, sampled[1:])) or \
            sampled[-1] >= seq.num_blocks:
        raise ValueError(f'sampled blocks {sampled} must increase and lie '
                         f'in ({after}, {seq.num_blocks})')
    plan = []
    last = after  # the backbone block whose output shape the stack has
    for block in sampled:
        current = _block_output(seq, last)
        if _block_input(seq, block) == current:
            plan.append(('block', block))
        elif transition == 'adapter':
            channels, stride = _block_input(seq, block)
            if stride % current[1]:
                raise ValueError(
                    f'cannot adapt stride {current[1]} to {stride} before '
                    f'block {seq.block_names[block]}')
            plan.append(('adapter', current[0], channels,
                         stride // current[1]))
            plan.append(('block', block))
        else:
            # first blocks of the stages entered on the way; the block's own
            # stage entry stands for the block when it is not that entry
            entry = _stage_entry(seq, block)
            plan.extend(('block', i) for i in range(last + 1, entry + 1)
                        if i == _stage_entry(seq, i))
            block = entry
        last = block
    # check the chain: every block takes what the one before gives
    shape = _block_output(seq, after)
    for item in plan:
        if item[0] == 'adapter':
            shape = (item[2], shape[1] * item[3])
            continue
        if _block_input(seq, item[1]) != shape:
            raise ValueError(
                f'block {seq.block_names[item[1]]} takes '
                f'{_block_input(seq, item[1])} (channels, stride), the stack '
                f'gives {shape}; {type(seq).__name__} changes shapes inside '
                'a stage, which plan_block_stack does not support')
        shape = _block_output(seq, item[1])
    return plan


def build_layer(seq, item):
    """A fresh layer for one item of :func:`plan_block_stack`: a trainable
    deep copy of a backbone block, or a 1x1 conv + BN + ReLU adapter."""
    if item[0] == 'adapter':
        _, in_channels, out_channels, stride = item
        return ConvModule(in_channels, out_channels, 1, stride=stride,
                          norm_cfg=dict(type='BN'))
    block = copy.deepcopy(seq.blocks[item[1]])
    for p in block.parameters():
        p.requires_grad_(True)
    return block


def stack_output(seq, plan):
    """``(channels, stride)`` of a planned stack (its last block's)."""
    last = [item for item in plan if item[0] == 'block'][-1][1]
    return _block_output(seq, last)


def build_block_stack(seq, plan):
    """``nn.Sequential`` of fresh layers for a plan of
    :func:`plan_block_stack`, and its output ``(channels, stride)``."""
    return nn.Sequential(*(build_layer(seq, item) for item in plan)), \
        stack_output(seq, plan)


def block_sequence_of(module_info):
    """The ``BlockSequence`` ``LocalLearner`` passes in ``extra``."""
    seq = module_info.extra.get('block_sequence')
    if seq is None or 'module_range' not in module_info.extra:
        raise ValueError(
            'this auxiliary family copies later backbone blocks: its '
            "module_info.extra needs 'block_sequence' and 'module_range' "
            '(LocalLearner fills them in)')
    return seq, module_info.extra['module_range']


def sample_later_blocks(module_info, depth):
    """AugLocal's sampled blocks after module ``k`` and their layer indices.

    Layers are ``[stem, block_0, .., block_{N-1}]`` (``L = N + 1``); module
    k's output is layer ``l = end`` (its last block is ``end - 1``).

    Returns:
        tuple[list[int], list[int]]: sampled layer indices and the block
        indices (``layer - 1``).
    """
    seq, (_, end) = block_sequence_of(module_info)
    layers = uniform_layer_indices(end, seq.num_blocks + 1, depth)
    return layers, [layer - 1 for layer in layers]


@MODELS.register_module()
class AugLocalAux(BaseLocalAux):
    """AugLocal auxiliary net (Ma, Wu, Si, Tan, ICLR 2024).

    Module k's auxiliary net is a stack of blocks **uniformly sampled from
    the later layers** of the network, with fresh weights (same
    architecture), followed by the task head:

    .. math::
        a_k = \\big(\\tilde B_{j_1}, \\dots, \\tilde B_{j_{d_k}}\\big),\\quad
        j_i = \\mathrm{round}\\Big(l + \\frac{L - l - 1}{d_k}\\, i\\Big),\\quad
        d_k = \\max\\Big(1, \\mathrm{round}\\big(d (1 - r_k) + r_k\\big)
        \\Big),\\ r_k = \\frac{k c}{K - 2}

    with ``L`` layers (stem = layer 0, block ``b`` = layer ``b + 1``), ``l``
    the last layer of module k, ``d`` = ``aux_depth`` and ``c`` =
    ``pyramid_coeff`` (pyramidal depth: deeper aux nets early, shallower
    later). When ``d_k >= L - 1 - l`` all later layers are used. The loss is
    the task loss on the stack's output (AugLocal's rule has no
    reconstruction term; ``recon_weight`` adds InfoPro's). Stage changes are
    made shape-consistent by ``stage_transition``
    (:func:`plan_block_stack`).

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        aux_depth (int): ``d``. Default 2 (reference ResNet-32 script,
            ``--local_module_num 16``: its ``train.py`` trains
            ``16 - d = 14`` modules, which is ``num_modules=14`` here).
        pyramid_coeff (float, optional): ``c``. Default 0.5 (reference
            scripts); None = every module gets ``d``.
        stage_transition (str): ``'entry_block'`` (default) or
            ``'adapter'``.
        **kwargs: :class:`BaseLocalAux` options (``task_weight``, heads,
            ``recon_weight``).
    """

    def __init__(self, module_info, aux_depth=2, pyramid_coeff=0.5,
                 stage_transition='entry_block', **kwargs):
        if isinstance(aux_depth, bool) or not isinstance(
                aux_depth, int) or aux_depth < 1:
            raise ValueError(f'aux_depth={aux_depth!r} must be an int >= 1')
        if pyramid_coeff is not None and not 0 <= pyramid_coeff <= 1:
            raise ValueError(f'pyramid_coeff={pyramid_coeff} must be in '
                             '[0, 1] (or None)')
        if stage_transition not in STAGE_TRANSITIONS:
            raise ValueError(f'stage_transition={stage_transition!r} must '
                             f'be one of {STAGE_TRANSITIONS}')
        self.aux_depth = aux_depth
        self.pyramid_coeff = pyramid_coeff
        self.stage_transition = stage_transition
        super().__init__(module_info, **kwargs)

    def build_transform(self, module_info):
        seq, (_, end) = block_sequence_of(module_info)
        self.depth = pyramid_depth(self.aux_depth, module_info.index,
                                   module_info.num_modules,
                                   self.pyramid_coeff)
        self.sampled_layers, self.sampled_blocks = sample_later_blocks(
            module_info, self.depth)
        self.plan = plan_block_stack(seq, end - 1, self.sampled_blocks,
                                     self.stage_transition)
        self.stack, (channels, stride) = build_block_stack(seq, self.plan)
        return channels, stride

    def init_weights(self):
        """The copied blocks get fresh weights (AugLocal: same architecture,
        new initialisation), whatever the backbone was initialised with."""
        super().init_weights()
        reset_parameters(self.stack)

    transform_segments = True  # one checkpoint segment per block

    def transform(self, h):
        return self.run_stack(self.stack, h)
