"""Which blocks of a CNN backbone RepL can replace, and how they are fused.

**ResNet family** (mmdet's and mmseg's ``ResNet``, ``ResNetV1c``/``V1d``,
``ResNeXt`` and other subclasses that keep ``ResNet.forward``): the units
are the ``BasicBlock``/``Bottleneck`` children of ``layer1..layer4``, in the
order and with the stage numbering of
:class:`~mmlocal.models.local.split.BlockSequence`. Every parameter of a
replaced block is synthesised: ``conv1``/``conv2`` (``conv3``) weights and
the weight and bias of every norm (and any plugin or DCN parameter that the
neighbours have too); ``stride``, ``dilation``, padding, the residual and the
activation come from the block's own (stock) code. BN running statistics
stay the block's own buffers.

Shapes inside a stage, ``p = planes`` (Bottleneck, ``e = 4``):

========== ================ ============== =====================
tensor     first block (0)  block j >= 1   fusion for block j
========== ================ ============== =====================
conv1      ``p x c_in``     ``p x e p``    j = 1: from k+1 only
conv2/3    same             same           ``T(k-1, k+1)``
norms      same             same           ``T(k-1, k+1)``
downsample ``e p x c_in``   --             --
========== ================ ============== =====================

So the **first block of a stage is never replaced**: it changes the
resolution (stride) and the channels (its ``downsample`` projection), and no
block of the stage has a tensor of its ``downsample`` or ``conv1`` shape to
synthesise it from (``c_in`` = previous stage's width). Any later block is:
its neighbours ``k-1`` and ``k+1`` share all shapes with it except
``conv1`` of the first block (``c_in != e p``), which the ``'mirror'`` fusion
rule takes from ``k+1`` alone. The last block of a stage has no successor in
the stage (the next stage's first block has other shapes): ``'mirror'``
synthesises it from ``k-1`` alone, ``W_k = T(W_{k-1}, W_{k-1})`` -- the
reflecting boundary of a sequence of same-shaped residual steps. For
ResNet-18/34 a ``BasicBlock`` ``j = 1`` of a 2-block stage whose ``conv1``
matches neither neighbour keeps that one tensor as its own trainable
parameter (reported in the plan).

**CSP backbones** (mmdet's ``CSPDarknet``, ``CSPNeXt``): a ``CSPLayer``
splits its input, runs ``blocks`` (``DarknetBottleneck``/``CSPNeXtBlock``,
all of one shape) on the main branch and fuses the branches, so the
replaceable units are those bottlenecks, one stage per ``CSPLayer``. The
stage-level modules (downsampling ``ConvModule``, ``SPPBottleneck``, the
``CSPLayer`` convs) have no same-shaped neighbour and are never replaced;
nor is the first bottleneck of a ``CSPLayer`` (its predecessor is
``main_conv``). A ``CSPLayer`` with fewer than two bottlenecks (YOLOX-s: one
in its first and last stage) offers nothing to replace.
"""
from mmlocal.models.local.split import (CSPBlockSequence, ResNetBlockSequence,
                                        build_block_sequence)
from .synthesis import RepLUnit


def _frozen(seq, stage, block):
    params = list(block.parameters())
    return seq._frozen_by_config(stage) or (bool(params)
                                            and not any(p.requires_grad
                                                        for p in params))


def resnet_units(backbone):
    """RepL units of a ResNet-family backbone (one per residual block)."""
    seq = build_block_sequence(backbone)
    sizes = {}
    for stage in seq.block_stage:
        sizes[stage] = sizes.get(stage, 0) + 1
    units, position, last_stage = [], 0, None
    for i, (name, block, stage) in enumerate(
            zip(seq.block_names, seq.blocks, seq.block_stage)):
        position = position + 1 if stage == last_stage else 0
        last_stage = stage
        refusal = None
        if position == 0:
            refusal = (
                f'it is the first block of stage {stage} (layer{stage + 1}); '
                'it changes resolution/channels (stride, downsample) and no '
                'fusion rule synthesises a downsampling block from its '
                'neighbours')
        units.append(
            RepLUnit(
                index=i,
                name=name,
                module=block,
                stage=stage,
                position=position,
                stage_size=sizes[stage],
                frozen=_frozen(seq, stage, block),
                refusal=refusal))
    return units


def csp_units(backbone):
    """RepL units of a CSP backbone (the bottlenecks of each CSPLayer)."""
    from mmdet.models.layers import CSPLayer
    seq = build_block_sequence(backbone)
    units = []
    group = 0
    for name, block, stage in zip(seq.block_names, seq.blocks,
                                  seq.block_stage):
        if not isinstance(block, CSPLayer):
            continue
        inner = list(block.blocks.named_children())
        for position, (child, bottleneck) in enumerate(inner):
            refusal = None
            if position == 0:
                refusal = (f'it is the first bottleneck of {name} (its '
                           'predecessor is the CSPLayer main_conv, not a '
                           'bottleneck); no fusion rule applies')
            units.append(
                RepLUnit(
                    index=len(units),
                    name=f'{name}.blocks.{child}',
                    module=bottleneck,
                    stage=group,
                    position=position,
                    stage_size=len(inner),
                    frozen=_frozen(seq, stage, bottleneck),
                    refusal=refusal))
        group += 1
    return units


def conv_units(backbone):
    """RepL units of a supported CNN backbone, or None if it is not one."""
    if ResNetBlockSequence.backbone_types() and isinstance(
            backbone, ResNetBlockSequence.backbone_types()):
        return resnet_units(backbone)
    if CSPBlockSequence.backbone_types() and isinstance(
            backbone, CSPBlockSequence.backbone_types()):
        return csp_units(backbone)
    return None


def conv_supported_types():
    return tuple(ResNetBlockSequence.backbone_types()) + tuple(
        CSPBlockSequence.backbone_types())
