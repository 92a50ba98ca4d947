import copy

import torch.nn as nn

from mmlocal.registry import MODELS
from .auglocal import (STAGE_TRANSITIONS, block_sequence_of, build_layer,
                       plan_block_stack, reset_parameters,
                       sample_later_blocks, stack_output)
from .cascade import CascadeLocalAux
from .ema_copy import MomentumCopyMixin, check_momentum


@MODELS.register_module()
class MLAANAux(MomentumCopyMixin, CascadeLocalAux):
    """Multilaminar Leap Augmented Auxiliary Network (Zhang et al., AAAI
    2025).

    **Multilaminar local modules** (MLM): module k has an independent loss
    on its own output and a cascade loss on the output of the window of the
    last ``w = cascade_span`` modules (2 in the reference CIFAR code, 3 on
    ImageNet), see :class:`CascadeLocalAux`:

    .. math::
        \\mathcal{L}_k = w_x \\mathcal{L}_{ind}(g_k(h_k))
            + w_y \\mathcal{L}_{task}\\big(c_k(\\mathrm{LAM}_k(z_k))\\big),
        \\quad z_k = f_k \\circ \\dots \\circ f_{k-w+1}(sg(h_{k-w}))

    **Leap augmented modules** (LAM): the cascade aux net is an
    AugLocal-style stack of copies of later blocks ``B_{j_1} .. B_{j_d}``
    (sampled uniformly, :func:`uniform_layer_indices`); its first block is
    MAN's learnable + momentum pair:

    .. math::
        \\mathrm{LAM}_k(z) = \\tilde B_{j_d} \\circ \\dots \\circ
            \\tilde B_{j_2}\\big(LB_k(z) + EMA_k(z)\\big),\\qquad
        \\theta_{EMA_k} \\leftarrow m\\,\\theta_{EMA_k}
            + (1 - m)\\,\\theta_{B_{j_1}}

    ``EMA_k`` is a frozen copy of the live block ``B_{j_1}``, updated after
    every optimizer step by :class:`MomentumAuxHook` for **every** module
    (the reference CIFAR code only updates the last aux net). ``LB_k`` and
    the other copies are trainable with fresh weights.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        cascade_span (int): ``w``, 2 or 3 in the reference. Default 2.
        momentum (float): ``m`` in (0, 1). Default 0.995 (README).
        aux_depth (int | list[int]): ``d``, blocks of the leap stack: one
            for every module, or one per module ``0..K-2`` (the reference
            tables go from deep to shallow, e.g. ImageNet ResNet-34 K=16:
            5 -> 2). Default 2.
        stage_transition (str): How sampled blocks are made
            shape-consistent, see :func:`plan_block_stack`.
        init_ema_from_source (bool): Start ``EMA_k`` equal to ``B_{j_1}``
            (after pretrained weights are loaded). Default True.
        init_lb_from_source (bool): Start ``LB_k`` equal to it too.
            Default False.
        ema_buffers (bool): Also average the running statistics of BN
            layers in train mode; those of a source layer in eval mode
            (``norm_eval``) always are. Default False (reference:
            parameters only). See :class:`MomentumCopyMixin`.
        recon_weight (float, optional): Reconstruction term of the cascade
            aux. Default None (the reference's cascade loss is CE only).
        **kwargs: :class:`CascadeLocalAux` options (``independent_weight``,
            ``cascade_weight``, heads, ``patch_grid``).
    """

    def __init__(self,
                 module_info,
                 cascade_span=2,
                 momentum=0.995,
                 aux_depth=2,
                 stage_transition='entry_block',
                 init_ema_from_source=True,
                 init_lb_from_source=False,
                 ema_buffers=False,
                 recon_weight=None,
                 **kwargs):
        check_momentum(momentum)
        depths = aux_depth if isinstance(aux_depth, (list, tuple)) \
            else [aux_depth]
        if isinstance(aux_depth, (list, tuple)) and \
                len(aux_depth) != module_info.num_modules - 1:
            raise ValueError(
                f'aux_depth={aux_depth!r} needs one depth per module with an '
                f'auxiliary net ({module_info.num_modules - 1} for K='
                f'{module_info.num_modules})')
        if not depths or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1
                for d in depths):
            raise ValueError(f'aux_depth={aux_depth!r} must be an int >= 1 '
                             'or a list of them')
        if isinstance(aux_depth, (list, tuple)):
            aux_depth = aux_depth[module_info.index]
        if stage_transition not in STAGE_TRANSITIONS:
            raise ValueError(f'stage_transition={stage_transition!r} must '
                             f'be one of {STAGE_TRANSITIONS}')
        self.momentum = momentum
        self.aux_depth = aux_depth
        self.stage_transition = stage_transition
        self.init_ema_from_source = init_ema_from_source
        self.init_lb_from_source = init_lb_from_source
        self.ema_buffers = ema_buffers
        super().__init__(module_info, cascade_span=cascade_span,
                         recon_weight=recon_weight, **kwargs)

    def build_transform(self, module_info):
        seq, (_, end) = block_sequence_of(module_info)
        self.sampled_layers, self.sampled_blocks = sample_later_blocks(
            module_info, self.aux_depth)
        self.plan = plan_block_stack(seq, end - 1, self.sampled_blocks,
                                     self.stage_transition)
        first = next(i for i, item in enumerate(self.plan)
                     if item[0] == 'block')
        self.source_block = self.plan[first][1]
        source = seq.blocks[self.source_block]
        self._set_source(source)
        # 1x1 adapters before the first block ('adapter' transition only)
        self.pre = nn.Sequential(
            *(build_layer(seq, item) for item in self.plan[:first]))
        self.lb = build_layer(seq, self.plan[first])
        self.ema = copy.deepcopy(source)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.post = nn.Sequential(
            *(build_layer(seq, item) for item in self.plan[first + 1:]))
        return stack_output(seq, self.plan)

    def init_weights(self):
        """Fresh weights for the copies (the hook then syncs the EMA copy,
        and LB if asked, from the source)."""
        super().init_weights()
        for module in (self.pre, self.lb, self.ema, self.post):
            reset_parameters(module)

    transform_segments = True  # one checkpoint segment per block

    def transform(self, h):
        z = self.run_stack(self.pre, h)
        z = self.segment(self.lb, z) + self.segment(self.ema, z)
        return self.run_stack(self.post, z)
