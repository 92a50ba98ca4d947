"""Aux nets' BN layers have no step counter (one kernel fewer each per
training forward); checkpoints that have the counters still load."""
import collections

import pytest
import torch
from mmengine.runner.checkpoint import load_state_dict
from torch.nn.modules.batchnorm import _BatchNorm

from local_utils import det_batch, small_aux
from test_local_learner import build


def _old_checkpoint(learner, with_metadata):
    """The learner's state dict as the code before wrote it: a
    ``num_batches_tracked`` per aux BN layer (value 7 here)."""
    state = learner.state_dict()
    old = collections.OrderedDict(state)
    added = []
    for name, m in learner.named_modules():
        if isinstance(m, _BatchNorm) and m.num_batches_tracked is None:
            key = f'{name}.num_batches_tracked'
            old[key] = torch.tensor(7)
            added.append(key)
    if with_metadata:
        old._metadata = state._metadata
    return old, added


@pytest.mark.parametrize('aux', ['mmlocal.MomentumAux'])
def test_aux_bn_without_counter_and_old_checkpoints_load(aux):
    learner = build(num_modules=2, aux=small_aux(aux))
    aux_bns = [m for m in learner.aux_nets.modules()
               if isinstance(m, _BatchNorm)]
    dropped = [m for m in aux_bns if m.num_batches_tracked is None]
    assert dropped
    # MAN's EMA copy mirrors its source's buffers: it keeps its counters
    for net in learner.aux_nets:
        if hasattr(net, 'ema'):
            assert all(m.num_batches_tracked is not None
                       for m in net.ema.modules()
                       if isinstance(m, _BatchNorm))
    # the backbone's own BN layers keep theirs
    assert all(m.num_batches_tracked is not None
               for m in learner.model.modules()
               if isinstance(m, _BatchNorm))
    # training works and the statistics still move
    running = [m.running_mean.clone() for m in dropped]
    ow = torch.optim.SGD(learner.parameters(), lr=0.01)
    from mmengine.optim import OptimWrapper
    learner.train_step(det_batch(), OptimWrapper(ow))
    assert any(not torch.equal(r, m.running_mean)
               for r, m in zip(running, dropped))
    # re-initialising the copies works without the counter
    learner.init_weights()
    state = learner.state_dict()
    for with_metadata in (True, False):
        old, added = _old_checkpoint(learner, with_metadata)
        assert added and not any(k in state for k in added)
        fresh = build(num_modules=2, aux=small_aux(aux))
        fresh.load_state_dict(old, strict=True)  # torch, strict
        for k, v in state.items():
            assert torch.equal(fresh.state_dict()[k], v), k
        # no metadata: BN adds a counter of its own (version < 2)
        build(num_modules=2, aux=small_aux(aux)).load_state_dict(
            collections.OrderedDict(state), strict=True)
        # mmengine's loader (strict: raises on any unexpected key)
        load_state_dict(build(num_modules=2, aux=small_aux(aux)), old,
                        strict=True)


def test_bn_with_cumulative_average_keeps_its_counter():
    from mmlocal.models.local.aux.base import drop_bn_step_counters
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3),
                              torch.nn.BatchNorm2d(3, momentum=None))
    drop_bn_step_counters(net)
    assert net[0].num_batches_tracked is None
    assert net[1].num_batches_tracked is not None
    net(torch.randn(2, 3, 4, 4))
    assert int(net[1].num_batches_tracked) == 1


def test_local_backward_seed_is_kept_and_renewed():
    """local_backward seeds backward with a kept 1 (no fill per module);
    the gradients are those of loss.backward(), and a backward function
    that wrote into its incoming gradient gets a fresh seed next time."""
    from mmengine.optim import OptimWrapper
    from mmlocal.engine.optim_wrappers import local_backward
    from mmlocal.engine.optim_wrappers.local_backward import _SEEDS

    class Scales(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, grad):
            return grad.mul_(3).expand(2, 3).clone()  # writes into grad

    w = torch.randn(2, 3, requires_grad=True)
    ow = OptimWrapper(torch.optim.SGD([w], lr=0.1))
    local_backward(ow, (w * w).sum())
    torch.testing.assert_close(w.grad, 2 * w.detach())
    seed = _SEEDS[(w.device, w.dtype)][0]
    w.grad = None
    local_backward(ow, (w * w).sum())
    assert _SEEDS[(w.device, w.dtype)][0] is seed  # kept
    torch.testing.assert_close(w.grad, 2 * w.detach())
    w.grad = None
    local_backward(ow, Scales.apply(w))
    torch.testing.assert_close(w.grad, torch.full((2, 3), 3.))
    w.grad = None
    local_backward(ow, (w * w).sum())  # a fresh 1, not the written 3
    assert _SEEDS[(w.device, w.dtype)][0] is not seed
    torch.testing.assert_close(w.grad, 2 * w.detach())
