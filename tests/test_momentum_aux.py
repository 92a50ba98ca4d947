"""MAN / MAN++ (MomentumAux) and the hook that drives its EMA copies."""
import copy
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import OptimWrapper
from torch.nn.modules.batchnorm import _BatchNorm

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


def norm_eval_model(norm_eval):
    """The tiny RetinaNet with mmdet's ``norm_eval`` set as asked."""
    model = copy.deepcopy(TINY_RETINANET)
    model['backbone'] = dict(model['backbone'], norm_eval=norm_eval)
    return model


def pretend_pretrained(learner):
    """Give the backbone's BN layers non-trivial running statistics and
    affine weights (as pretrained weights would; the random init zeroes the
    last BN of each residual branch), then put the learner in train mode as
    the runner does (mmdet's ``norm_eval`` takes effect there)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in learner.model.backbone.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(
                    torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(
                    torch.rand(m.running_var.shape, generator=g) + 0.5)
    learner.train()


def record_io(module):
    """Record ``(input, output)`` of every call of ``module``."""
    seen = []

    def hook(mod, args, out):
        seen.append((args[0].detach().clone(), out.detach().clone()))

    return seen, module.register_forward_hook(hook)


def bn_modes(module):
    return [m.training for m in module.modules()
            if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize('norm_eval', [True, False])
def test_copies_from_the_source_compute_the_source_block(norm_eval):
    """At iteration 0 the EMA copy (and LB started from the source) is
    ``B``: same output on the same input, normalised as ``B`` is (frozen
    statistics with mmdet's ``norm_eval=True``, batch ones otherwise)."""
    learner = build(norm_eval_model(norm_eval), num_modules=3,
                    aux=man(init_lb_from_source=True))
    pretend_pretrained(learner)
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05))
    hook, runner = MomentumAuxHook(), _runner(learner, ow)
    hook.before_train(runner)
    refs, records = [], []
    for aux in learner.aux_nets:
        # B at iteration 0, in the modes the backbone put it in
        refs.append(copy.deepcopy(aux.source))
        assert all(t is not norm_eval for t in bn_modes(aux.source))
        records += [record_io(aux.ema), record_io(aux.lb)]
    hook.before_train_iter(runner, 0)
    learner.train_step(det_batch(), ow)
    hook.after_train_iter(runner, 0)
    for handle in [r[1] for r in records]:
        handle.remove()
    for k, aux in enumerate(learner.aux_nets):
        for seen, _ in records[2 * k:2 * k + 2]:
            assert len(seen) == 1
            x, y = seen[0]
            with torch.no_grad():
                torch.testing.assert_close(y, refs[k](x), rtol=1e-6,
                                           atol=1e-6)
                if norm_eval:  # not vacuous: batch statistics differ
                    train_mode = copy.deepcopy(refs[k]).train()
                    assert not torch.allclose(y, train_mode(x), atol=1e-3)
        assert bn_modes(aux.ema) == bn_modes(aux.source)
        assert bn_modes(aux.lb) == bn_modes(aux.source)


def test_fresh_lb_keeps_batch_statistics_under_norm_eval():
    learner = build(norm_eval_model(True), num_modules=2, aux=man())
    pretend_pretrained(learner)
    learner.train_step(det_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    aux = learner.aux_nets[0]
    assert bn_modes(aux.ema) and not any(bn_modes(aux.ema))
    assert bn_modes(aux.lb) and all(bn_modes(aux.lb))


@pytest.mark.parametrize('norm_eval', [True, False])
def test_frozen_statistics_are_averaged(norm_eval):
    """With ``norm_eval`` the source's frozen running statistics are part of
    its function: the EMA averages them (the reference initialisation:
    ``init_ema_from_source=False``). Train-mode statistics are left to BN
    unless ``ema_buffers`` (unchanged behaviour)."""
    learner = build(norm_eval_model(norm_eval), num_modules=2,
                    aux=man(momentum=0.9, init_ema_from_source=False))
    pretend_pretrained(learner)
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05))
    hook, runner = MomentumAuxHook(), _runner(learner, ow)
    hook.before_train(runner)
    aux = learner.aux_nets[0]
    old = [b.clone() for b in aux.ema.buffers()]
    hook.before_train_iter(runner, 0)
    learner.train_step(det_batch(), ow)
    mid = [b.clone() for b in aux.ema.buffers()]
    hook.after_train_iter(runner, 0)
    rows = [row for row in zip(old, mid, aux.ema.buffers(),
                               aux.source.buffers())
            if row[0].dtype.is_floating_point]
    assert rows
    for o, before_update, b, s in rows:
        if norm_eval:  # frozen in the forward, averaged by the update
            assert torch.equal(before_update, o)
            torch.testing.assert_close(b, 0.9 * o + 0.1 * s)
        else:  # batch statistics: BN's own update only, not the hook's
            assert not torch.equal(before_update, o)
            assert torch.equal(b, before_update)


@pytest.mark.parametrize('name', [
    'man_retinanet_r50_fpn_k4_8xb2-1x_coco.py',
    'manpp_retinanet_r50_fpn_k4_8xb2-1x_coco.py',
    'man_faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py',
    'manpp_faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py'])
def test_detection_configs_use_the_reference_loss(name):
    """MAN++'s COCO code trains the aux nets with the detection loss at
    weight 1 and no reconstruction term."""
    from mmengine.config import Config
    from conftest import REPO
    cfg = Config.fromfile(f'{REPO}/configs/local/{name}')
    assert cfg.model.aux.recon_weight is None
    assert cfg.model.aux.task_weight == 1.0


def test_update_from_before_step_uses_the_weights_of_the_forward():
    """``update_from='before_step'``: the reference's order (update after
    the local backward, before ``optimizer.step()``)."""
    learner = build(num_modules=3, aux=man(momentum=0.9))
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05))
    hook = MomentumAuxHook(update_from='before_step')
    runner = _runner(learner, ow)
    hook.before_train(runner)
    aux = learner.aux_nets[0]
    pre_step = [p.detach().double() for p in aux.ema.parameters()]
    post_step = list(pre_step)
    for i in range(2):
        before = [p.detach().double() for p in aux.source.parameters()]
        hook.before_train_iter(runner, i)
        learner.train_step(det_batch(seed=i), ow)
        hook.after_train_iter(runner, i)
        pre_step = [0.9 * e + 0.1 * s for e, s in zip(pre_step, before)]
        post_step = [0.9 * e + 0.1 * s.detach().double()
                     for e, s in zip(post_step, aux.source.parameters())]
    off = []
    for e, a, p in zip(pre_step, post_step, aux.ema.parameters()):
        ulp = torch.finfo(torch.float32).eps * e.abs().clamp(min=1)
        assert ((p.double() - e).abs() <= 3 * ulp).all()
        off.append(((p.double() - a).abs() > 1e-5).any())
    assert any(off)  # not the after-step average
    with pytest.raises(ValueError, match='update_from'):
        MomentumAuxHook(update_from='later')


def test_mix_branches_equals_autograd():
    """MAN++'s s * LB + (2 - s) * EMA in fewer kernels: the same value and
    gradients as autograd's (1e-6), and gradcheck in float64."""
    from mmlocal.models.local.aux.momentum import mix_branches
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    lb, ema = (torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g,
                           requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(mix_branches, (s, lb, ema))
    out_grad = torch.randn(2, 3, 5, 4, generator=g)
    results = []
    for fn in (mix_branches, lambda s, a, b: s * a + (2 - s) * b):
        args = [t.detach().float().requires_grad_() for t in (s, lb, ema)]
        y = fn(*args)
        y.backward(out_grad)
        results.append([y.detach()] + [a.grad for a in args])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
