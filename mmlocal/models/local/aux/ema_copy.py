import warnings

import torch


def check_momentum(momentum):
    """``momentum`` must be in (0, 1); ValueError naming the option."""
    if isinstance(momentum, bool) or not isinstance(
            momentum, (int, float)) or not 0.0 < momentum < 1.0:
        raise ValueError(f'momentum={momentum!r} must be in (0, 1)')


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

    @torch.no_grad()
    def sync_from_source(self):
        """Copy the source into the EMA (and LB) copy as the options ask."""
        if self.init_ema_from_source:
            self.ema.load_state_dict(self.source.state_dict())
        if self.init_lb_from_source:
            self.lb.load_state_dict(self.source.state_dict())

    @torch.no_grad()
    def update_ema(self):
        """``theta_EMA <- m * theta_EMA + (1 - m) * theta_src``; BN
        statistics too when ``ema_buffers`` (integer buffers copied)."""
        m = self.momentum
        ema = list(self.ema.parameters())
        src = [p.detach() for p in self.source.parameters()]
        if self.ema_buffers:
            for b_ema, b_src in zip(self.ema.buffers(),
                                    self.source.buffers()):
                if b_ema.dtype.is_floating_point:
                    ema.append(b_ema)
                    src.append(b_src)
                else:
                    b_ema.copy_(b_src)
        # one multi-tensor launch group instead of two kernels per tensor
        # (theta + (1 - m) (src - theta) = m theta + (1 - m) src)
        if ema:
            torch._foreach_lerp_(ema, src, 1 - m)

    def _warn_if_not_driven(self):
        """Warn once when training without :class:`MomentumAuxHook`."""
        if self.training and not self.ema_driven and \
                not self._warned_no_hook:
            warnings.warn(f'{type(self).__name__} is training without '
                          'mmlocal.MomentumAuxHook: its EMA copies are not '
                          'updated. Add custom_hooks=[dict(type='
                          '"mmlocal.MomentumAuxHook")].')
            self._warned_no_hook = True
