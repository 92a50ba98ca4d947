import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict


def check_local_optim_wrapper(optim_wrapper):
    """Refuse optimizer wrappers whose backward local learning can't mirror.

    Local learning back-propagates K-1 local losses before the model's own
    loss goes through ``optim_wrapper.update_params``. Each partial backward
    must be scaled like that final one (gradient accumulation divides the
    loss by ``accumulative_counts``; AMP multiplies it by the loss scale)
    without counting as an extra iteration (mmengine's wrapper counts
    ``backward`` calls to decide when to step). :func:`local_backward` does
    that for :class:`OptimWrapper` and :class:`AmpOptimWrapper` through their
    public API; other wrappers are refused here rather than silently
    mis-scaled.
    """
    if isinstance(optim_wrapper, OptimWrapperDict):
        raise TypeError(
            'local learning needs a single optimizer: optim_wrapper is an '
            'OptimWrapperDict (several optimizers), which is not supported')
    if not isinstance(optim_wrapper, OptimWrapper):
        raise TypeError(
            f'optim_wrapper of type {type(optim_wrapper).__name__} is not '
            'supported by local learning; use OptimWrapper or '
            'AmpOptimWrapper (or a subclass that keeps their backward)')
    backward = type(optim_wrapper).backward
    if backward not in (OptimWrapper.backward, AmpOptimWrapper.backward):
        raise TypeError(
            f'{type(optim_wrapper).__name__} overrides backward(); local '
            'learning cannot know how to scale its partial backward passes')


def local_backward(optim_wrapper, loss, retain_graph=False):
    """Back-propagate one local loss now, scaled as the final loss will be.

    Gradients accumulate in ``.grad`` until the optimizer step that
    ``optim_wrapper.update_params`` takes after the model's own loss. The
    wrapper's iteration counter is not touched, so ``accumulative_counts``
    and ``should_update`` keep their meaning (one count per iteration).

    Args:
        optim_wrapper (OptimWrapper): The wrapper passed to ``train_step``.
        loss (Tensor): A scalar local loss.
        retain_graph (bool): Keep the graph (when a stage output of this
            module also reaches the neck attached).
    """
    check_local_optim_wrapper(optim_wrapper)
    # division by accumulative_counts (or the remainder); does not count.
    # Without accumulation mmengine divides by 1: exact, so skipped (one
    # kernel and its backward fewer per module)
    if not (type(optim_wrapper).scale_loss is OptimWrapper.scale_loss
            and getattr(optim_wrapper, '_accumulative_counts', None) == 1):
        loss = optim_wrapper.scale_loss(loss)
    if isinstance(optim_wrapper, AmpOptimWrapper):
        loss = optim_wrapper.loss_scaler.scale(loss)
    if not torch.is_tensor(loss) or not loss.requires_grad:
        return
    if loss.dim() != 0:
        loss.backward(retain_graph=retain_graph)
        return
    # a kept 1 as the seed: backward() would fill a new one (one kernel)
    loss.backward(_seed(loss), retain_graph=retain_graph)


_SEEDS = {}


def _seed(loss):
    """A 0-dim 1 of ``loss``'s device and dtype, made once. A backward
    function that wrote into its incoming gradient in place would have
    changed it: its version counter says so, and a new one is made."""
    key = (loss.device, loss.dtype)
    seed, version = _SEEDS.get(key, (None, None))
    if seed is None or seed._version != version:
        seed = torch.ones((), dtype=loss.dtype, device=loss.device)
        _SEEDS[key] = (seed, seed._version)
    return seed
