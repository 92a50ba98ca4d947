"""MAN / MAN++ (MomentumAux) and the hook that drives its EMA copies."""
import copy
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import OptimWrapper

from local_utils import (TINY_FCN, TINY_RETINANET, KeepGradsOptimWrapper,
                         det_batch, grads, seg_batch, small_aux)
from mmlocal.engine.hooks import MomentumAuxHook
from test_local_learner import build


def man(**kwargs):
    return small_aux('mmlocal.MomentumAux', **kwargs)


def _runner(learner, optim_wrapper, it=0):
    return SimpleNamespace(model=learner, optim_wrapper=optim_wrapper,
                           iter=it)


def test_ema_update_follows_the_formula():
    learner = build(num_modules=3, aux=man(momentum=0.9))
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05))
    hook = MomentumAuxHook()
    runner = _runner(learner, ow)
    hook.before_train(runner)
    aux = learner.aux_nets[0]
    # initialised from the source block (pretrained weights in a real run)
    for a, b in zip(aux.ema.parameters(), aux.source.parameters()):
        assert torch.equal(a, b)
    # reference in float64; the float32 EMA must match it to float32
    # rounding (a few ulps; a wrong momentum would be off by ~1e-3)
    expected = [p.detach().double() for p in aux.ema.parameters()]
    for i in range(3):
        hook.before_train_iter(runner, i)
        learner.train_step(det_batch(seed=i), ow)
        hook.after_train_iter(runner, i)
        expected = [0.9 * e + 0.1 * s.detach().double()
                    for e, s in zip(expected, aux.source.parameters())]
    for e, p in zip(expected, aux.ema.parameters()):
        ulp = torch.finfo(torch.float32).eps * e.abs().clamp(min=1)
        assert ((p.double() - e).abs() <= 3 * ulp).all()
    # the source did move, so the test is not vacuous
    assert any(not torch.equal(p, s) for p, s in zip(
        aux.ema.parameters(), aux.source.parameters()))


def test_ema_gets_no_gradient_lb_and_scale_do():
    learner = build(num_modules=3, aux=man(learnable_scale=True))
    learner.train_step(det_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    aux = learner.aux_nets[1]
    assert all(not p.requires_grad and p.grad is None
               for p in aux.ema.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad)
               for p in aux.lb.parameters())
    assert aux.scale.requires_grad and aux.scale.grad is not None
    assert float(aux.scale.grad) != 0.0
    # the EMA copies are not in the optimizer's trainable set
    names = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert not any('.ema.' in n for n in names)


def test_man_plus_plus_with_s1_equals_man():
    torch.manual_seed(0)
    plain = build(num_modules=2, aux=man())
    plus = build(num_modules=2, aux=man(learnable_scale=True))
    plus.load_state_dict(plain.state_dict(), strict=False)
    assert float(plus.aux_nets[0].scale) == 1.0
    batch = det_batch()
    out_a = plain.train_step(batch, KeepGradsOptimWrapper(
        torch.optim.SGD(plain.parameters(), lr=0.1)))
    out_b = plus.train_step(batch, KeepGradsOptimWrapper(
        torch.optim.SGD(plus.parameters(), lr=0.1)))
    torch.testing.assert_close(out_a['loss_local0'], out_b['loss_local0'])
    ga, gb = grads(plain), grads(plus)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], msg=name)


def test_no_ema_update_without_optimizer_step():
    learner = build(num_modules=2, aux=man())
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.1),
                      accumulative_counts=2)
    ow.initialize_count_status(learner, 0, 10)
    hook, runner = MomentumAuxHook(), _runner(learner, ow)
    hook.before_train(runner)
    before = [p.clone() for p in learner.aux_nets[0].ema.parameters()]
    hook.before_train_iter(runner, 0)
    learner.train_step(det_batch(), ow)  # accumulates, no step
    hook.after_train_iter(runner, 0)
    for a, b in zip(before, learner.aux_nets[0].ema.parameters()):
        assert torch.equal(a, b)


def test_resumed_run_keeps_its_ema():
    learner = build(num_modules=2, aux=man())
    aux = learner.aux_nets[0]
    with torch.no_grad():
        for p in aux.ema.parameters():
            p.add_(1.0)
    saved = copy.deepcopy(learner.state_dict())
    assert any('aux_nets.0.ema.' in k for k in saved)
    fresh = build(num_modules=2, aux=man())
    fresh.load_state_dict(saved)
    MomentumAuxHook().before_train(_runner(fresh, None, it=7))
    for a, b in zip(aux.ema.parameters(), fresh.aux_nets[0].ema.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_one_training_step(task):
    if task == 'det':
        learner = build(num_modules=3, aux=man(learnable_scale=True))
        batch = det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=2,
                        aux=man(learnable_scale=True))
        batch = seg_batch()
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01))
    with pytest.warns(UserWarning, match='MomentumAuxHook'):
        out = learner.train_step(batch, ow)
    assert all(torch.isfinite(v) for v in out.values())
    assert 'loss_local0' in out


def test_bad_momentum_and_last_module():
    with pytest.raises(ValueError, match='momentum'):
        build(num_modules=2, aux=man(momentum=1.0))
    with pytest.raises(ValueError, match='momentum'):
        build(num_modules=2, aux=man(momentum=0.0))
    assert TINY_RETINANET  # the tiny model has a next block for K=2..8
