import copy

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from mmlocal.registry import MODELS
from .base import reset_parameters
from .ema_copy import MomentumCopyMixin, check_momentum
from .infopro import InfoProAux


class _MixBranches(torch.autograd.Function):
    """``y = s * lb + (2 - s) * ema`` with the gradients autograd gives it
    (``s * g``, ``(2 - s) * g`` and ``<g, lb - ema>``) in 3 kernels forward
    and 4 backward instead of autograd's 4 and 8 (two products with their
    own gradients each, one of them with a sum and a negation)."""

    @staticmethod
    def forward(ctx, s, lb, ema):
        # eager type promotion (a 0-dim s keeps lb's dtype), not autocast's
        # widest-type rule for addcmul
        with torch.autocast(lb.device.type, enabled=False):
            t = 2 - s
            y = torch.addcmul(lb * s, ema, t)
        ctx.save_for_backward(s, t, lb, ema)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s, t, lb, ema = ctx.saved_tensors
        grad_s = grad_lb = grad_ema = None
        if ctx.needs_input_grad[1]:
            grad_lb = grad * s
        if ctx.needs_input_grad[2]:
            grad_ema = grad * t
        if ctx.needs_input_grad[0]:
            diff = lb - ema
            if grad.dtype == diff.dtype == s.dtype:
                grad_s = torch.dot(grad.reshape(-1), diff.reshape(-1))
            else:  # reduced precision: accumulate in s's dtype
                grad_s = torch.sum(grad * diff, dtype=s.dtype)
        return grad_s, grad_lb, grad_ema


def mix_branches(s, lb, ema):
    """MAN++'s ``s * lb + (2 - s) * ema`` (a learnable 0-dim ``s``)."""
    return _MixBranches.apply(s, lb, ema)


@MODELS.register_module()
class MomentumAux(MomentumCopyMixin, InfoProAux):
    """Momentum Auxiliary Network: MAN (ECCV 2024) and MAN++ (TPAMI 2026).

    Su et al. give module k's auxiliary net a view of what comes next: the
    first block of module k+1, ``B``. Two copies of ``B`` sit in front of the
    InfoPro-style task and reconstruction heads:

    .. math::
        y_k = s_k \\, LB_k(h_k) + (2 - s_k) \\, EMA_k(h_k), \\qquad
        \\theta_{EMA_k} \\leftarrow m\\,\\theta_{EMA_k} + (1 - m)\\,\\theta_B

    ``LB_k`` (the "learnable bias") is a trainable copy of ``B``; ``EMA_k`` is
    a frozen copy updated by exponential moving average after every
    optimizer step (by :class:`MomentumAuxHook`). MAN has ``s_k = 1``; MAN++
    (``learnable_scale=True``) learns one scalar ``s_k`` per module, init 1.
    The local loss is InfoPro's on ``y_k``:
    ``lambda_1 BCE(D(y_k), x) + lambda_2 L_task(g(y_k), y)``. The EMA branch
    passes gradient to ``h_k`` but its own weights receive none.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``; its
            ``next_block`` is ``B``.
        momentum (float): ``m`` in (0, 1). Default 0.995 (every reference
            README).
        learnable_scale (bool): MAN++'s ``s_k``. Default False (MAN).
        init_ema_from_source (bool): Start ``EMA_k`` equal to ``B`` (after
            pretrained weights are loaded). The reference code does not (its
            copies are re-initialised). Default True.
        init_lb_from_source (bool): Start ``LB_k`` equal to ``B`` too.
            Default False (reference: fresh initialisation).
        ema_buffers (bool): Also average the running statistics of BN
            layers in train mode (which read batch statistics while
            training). Those of a source BN layer in eval mode (mmdet's
            ``norm_eval``) are always averaged, and the EMA copy's BN layers
            run in their source's mode (see :class:`MomentumCopyMixin`).
            The reference averages parameters only, all in train mode.
            Default False.
        **kwargs: InfoProAux options (``recon_weight``, ``task_weight``,
            heads).
    """

    def __init__(self,
                 module_info,
                 momentum=0.995,
                 learnable_scale=False,
                 init_ema_from_source=True,
                 init_lb_from_source=False,
                 ema_buffers=False,
                 **kwargs):
        check_momentum(momentum)
        if module_info.next_block is None:
            raise ValueError(
                f'MomentumAux of module {module_info.index} needs the first '
                'block of the next module; the last module has none')
        self.momentum = momentum
        self.learnable_scale = learnable_scale
        self.init_ema_from_source = init_ema_from_source
        self.init_lb_from_source = init_lb_from_source
        self.ema_buffers = ema_buffers
        super().__init__(module_info, **kwargs)

    def build_transform(self, module_info):
        source = module_info.next_block
        self._set_source(source)
        self.lb = copy.deepcopy(source)
        self.ema = copy.deepcopy(source)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        if self.learnable_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer('scale', torch.tensor(1.0))
        return module_info.next_out_channels, module_info.next_stride

    def init_weights(self):
        """Re-initialise the copies unless they start from the source.

        Called by mmengine *before* pretrained weights would be visible in
        ``source`` for ``init_from_source``; :meth:`sync_from_source` (run by
        the hook before the first iteration) does the copying.
        """
        super().init_weights()
        for copy_ in (self.lb, self.ema):
            reset_parameters(copy_)

    transform_segments = True  # LB and EMA: one checkpoint segment each

    def transform(self, h):
        if not self.learnable_scale:
            # MAN: s = 1 (a constant buffer): 1 * LB + 1 * EMA, exactly,
            # in one kernel instead of four (and their backward)
            return self.segment(self.lb, h) + self.segment(self.ema, h)
        return mix_branches(self.scale, self.segment(self.lb, h),
                            self.segment(self.ema, h))
