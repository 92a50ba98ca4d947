import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def check_momentum(momentum):
    """``momentum`` must be in (0, 1); ValueError naming the option."""
    if isinstance(momentum, bool) or not isinstance(
            momentum, (int, float)) or not 0.0 < momentum < 1.0:
        raise ValueError(f'momentum={momentum!r} must be in (0, 1)')


def _norm_pairs(copy_, source):
    """``(copy BN, source BN)`` pairs of a deep copy and its source, in
    module order."""
    pairs = [(a, b) for a, b in zip(copy_.modules(), source.modules())
             if isinstance(b, _BatchNorm)]
    if any(not isinstance(a, _BatchNorm) for a, _ in pairs):
        raise RuntimeError('a momentum copy no longer has the structure of '
                           'its source block')
    return pairs


class MomentumCopyMixin:
    """An auxiliary net holding a frozen momentum copy ``self.ema`` (and a
    learnable copy ``self.lb``) of a live backbone block, the *source*.

    Shared by MAN / MAN++ (:class:`MomentumAux`) and MLAAN's leap augmented
    modules (:class:`MLAANAux`). :class:`MomentumAuxHook` finds the nets by
    :meth:`update_ema`, sets ``ema_driven`` and calls
    :meth:`sync_from_source` once before training and :meth:`update_ema`
    after every optimizer step:

    .. math::
        \\theta_{EMA} \\leftarrow m\\,\\theta_{EMA} + (1 - m)\\,\\theta_{src}

    **Normalisation.** Each BN layer of the EMA copy runs in the mode of
    the source's BN layer (:meth:`follow_source_norm`, called by
    :meth:`before_transform`, i.e. before the copies run): with mmdet's ``norm_eval=True`` the live block normalises
    with its frozen running statistics, and so does its EMA copy, so that
    ``EMA(h) = B(h)`` when the copy starts from the source. The statistics
    of such a frozen source layer are part of the function it computes, so
    :meth:`update_ema` averages them too; ``ema_buffers`` decides only for
    BN layers in train mode (which read batch statistics). LB follows the
    source's modes only when it starts from the source
    (``init_lb_from_source``); with fresh weights it has no statistics to
    freeze and keeps batch statistics, as in the reference code (where
    every block trains in train mode).

    The class using it sets ``momentum``, ``init_ema_from_source``,
    ``init_lb_from_source``, ``ema_buffers`` and calls
    :meth:`_set_source`.
    """

    def _set_source(self, block):
        # a list, not a submodule: the backbone owns the block (no duplicate
        # state-dict keys or parameters)
        self._source = [block]
        self._warned_no_hook = False
        self.ema_driven = False  # set by MomentumAuxHook

    @property
    def source(self):
        """The live block the EMA copy follows."""
        return self._source[0]

    def _following_copies(self):
        copies = [self.ema]
        if self.init_lb_from_source:
            copies.append(self.lb)
        return copies

    def follow_source_norm(self):
        """Put each BN layer of the EMA copy (and of LB when it starts from
        the source) in the train/eval mode of the source's BN layer.

        Run before the copies run (mmdet applies ``norm_eval`` in the
        backbone's ``train()``; the copies live outside the backbone).
        Pairs are found afresh each time, so a later SyncBN conversion
        is followed too.
        """
        if not self.training:
            return
        for copy_ in self._following_copies():
            for bn_copy, bn_src in _norm_pairs(copy_, self.source):
                if bn_copy.training != bn_src.training:
                    bn_copy.train(bn_src.training)

    @torch.no_grad()
    def sync_from_source(self):
        """Copy the source into the EMA (and LB) copy as the options ask."""
        if self.init_ema_from_source:
            self.ema.load_state_dict(self.source.state_dict())
        if self.init_lb_from_source:
            self.lb.load_state_dict(self.source.state_dict())

    @torch.no_grad()
    def source_parameters(self):
        """A copy of the source's parameters as they are now (for an update
        from the weights before the optimizer step)."""
        return [p.detach().clone() for p in self.source.parameters()]

    @torch.no_grad()
    def update_ema(self, source_params=None):
        """``theta_EMA <- m * theta_EMA + (1 - m) * theta_src``; the BN
        statistics too where the source's BN layer is in eval mode (frozen
        statistics, e.g. mmdet's ``norm_eval``), and everywhere when
        ``ema_buffers`` (integer buffers copied).

        Args:
            source_params (list[Tensor], optional): ``theta_src`` as kept by
                :meth:`source_parameters`; default: the source's current
                parameters.
        """
        m = self.momentum
        ema = list(self.ema.parameters())
        src = [p.detach() for p in self.source.parameters()] \
            if source_params is None else list(source_params)
        for m_ema, m_src in zip(self.ema.modules(), self.source.modules()):
            frozen = isinstance(m_src, _BatchNorm) and not m_src.training
            if not (self.ema_buffers or frozen):
                continue
            for b_ema, b_src in zip(m_ema.buffers(recurse=False),
                                    m_src.buffers(recurse=False)):
                if b_ema.dtype.is_floating_point:
                    ema.append(b_ema)
                    src.append(b_src)
                else:
                    b_ema.copy_(b_src)
        # one multi-tensor launch group instead of two kernels per tensor
        # (theta + (1 - m) (src - theta) = m theta + (1 - m) src)
        if ema:
            torch._foreach_lerp_(ema, src, 1 - m)

    def before_transform(self):
        """Eager, before the (possibly compiled) transform: warn when no
        hook drives the EMA, put the copies' BN layers in the source's
        modes."""
        self._warn_if_not_driven()
        self.follow_source_norm()

    def _warn_if_not_driven(self):
        """Warn once when training without :class:`MomentumAuxHook`."""
        if self.training and not self.ema_driven and \
                not self._warned_no_hook:
            warnings.warn(f'{type(self).__name__} is training without '
                          'mmlocal.MomentumAuxHook: its EMA copies are not '
                          'updated. Add custom_hooks=[dict(type='
                          '"mmlocal.MomentumAuxHook")].')
            self._warned_no_hook = True
