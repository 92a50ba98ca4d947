"""LocalLearner's NaN guard: a non-finite loss stops (or skips) the
iteration before it reaches any weight."""
import copy
import re
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

import mmlocal.models.local.learner as learner_mod
from local_utils import HostReads, det_batch, small_aux
from mmlocal.engine.hooks import MomentumAuxHook
from test_local_cascade import cascade_aux
from test_local_learner import build

NAN = float('nan')
_hub_count = [0]


def fresh_hub(iteration=None):
    """A new current MessageHub (optionally with runner.iter set)."""
    _hub_count[0] += 1
    hub = MessageHub.get_instance(f'test_nan_guard_{_hub_count[0]}')
    if iteration is not None:
        hub.update_info('iter', iteration)
    return hub


def sgd(learner, **kwargs):
    return OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05,
                                        momentum=0.9), **kwargs)


def snapshot(learner, ow):
    return dict(
        params={n: p.detach().clone()
                for n, p in learner.named_parameters()},
        buffers={n: b.detach().clone() for n, b in learner.named_buffers()},
        optim=copy.deepcopy(ow.optimizer.state_dict()))


def assert_unchanged(learner, ow, before, buffers=True):
    for n, p in learner.named_parameters():
        assert torch.equal(p, before['params'][n]), n
    if buffers:
        for n, b in learner.named_buffers():
            assert torch.equal(b, before['buffers'][n]), n
    state = ow.optimizer.state_dict()
    assert state['state'].keys() == before['optim']['state'].keys()
    for idx, entry in state['state'].items():
        for key, value in entry.items():
            want = before['optim']['state'][idx][key]
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(want)), (idx, key)


def changed(learner, before):
    return [n for n, p in learner.named_parameters()
            if not torch.equal(p, before['params'][n])]


def poison_aux(learner, k, term='loss_cls'):
    """Module k's auxiliary loss term ``term`` becomes NaN."""
    aux = learner.aux_nets[k]
    original = aux.loss

    def loss(h, inputs, samples):
        losses = dict(original(h, inputs, samples))
        value = losses[term]
        losses[term] = [v * NAN for v in value] if isinstance(
            value, (list, tuple)) else value * NAN
        return losses

    aux.loss = loss
    return lambda: delattr(aux, 'loss')


def blocks(learner, k):
    start, end = learner.module_ranges[k]
    return f'module {k} (blocks {start}-{end - 1})'


def test_invalid_option_names_nan_guard():
    with pytest.raises(ValueError, match='nan_guard'):
        build(num_modules=2, nan_guard='warn')


def test_invalid_check_names_nan_guard_check():
    with pytest.raises(ValueError, match='nan_guard_check'):
        build(num_modules=2, nan_guard_check='iteration')


@pytest.mark.parametrize('check', ['step', 'module'])
def test_nan_local_loss_raises_before_any_change(check):
    learner = build(num_modules=3, nan_guard_check=check)
    ow = sgd(learner)
    learner.train_step(det_batch(seed=0), ow)  # optimizer state exists now
    before = snapshot(learner, ow)
    poison_aux(learner, 1)
    fresh_hub(iteration=7)
    with pytest.raises(FloatingPointError) as info:
        learner.train_step(det_batch(seed=1), ow)
    msg = str(info.value)
    assert blocks(learner, 1) in msg, msg
    assert 'iteration 7' in msg and 'loss_cls=nan' in msg, msg
    assert info.value.module == 1 and info.value.iteration == 7
    assert info.value.terms == ['loss_cls']
    assert f'nan_guard_check={check!r}' in msg, msg
    # only the parameters are compared: BN statistics of the modules that
    # ran did move (documented)
    assert_unchanged(learner, ow, before, buffers=False)
    # the model's own loss was never back-propagated
    assert all(p.grad is None for p in learner.model.bbox_head.parameters())
    if check == 'module':
        # the NaN loss never reached a gradient: module 0's local loss was
        # back-propagated, module 1's was not
        grads = [p.grad for p in learner.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert all(p.grad is None for p in learner.aux_nets[1].parameters())
        assert 'before back-propagating it' in msg
    else:
        # read once at the end: module 1's loss went back, module 2 ran
        assert any(not torch.isfinite(p.grad).all()
                   for p in learner.aux_nets[1].parameters()
                   if p.grad is not None)
        assert "gradients hold its backward" in msg


@pytest.mark.parametrize('mode', ['raise', 'skip'])
def test_a_later_failure_after_a_nan_names_the_nan(mode):
    """'step' reads the flags at the end; when a later module fails first
    (an assigner given NaN costs), the NaN is still what is reported (and
    skipped); without a NaN the failure propagates unchanged."""
    learner = build(num_modules=3, nan_guard=mode)
    ow = sgd(learner)
    learner.train_step(det_batch(seed=0), ow)
    before = snapshot(learner, ow)
    aux = learner.aux_nets[1]

    def broken(h, inputs, samples):
        raise ValueError('matrix contains invalid numeric entries')

    aux.loss = broken
    undo = poison_aux(learner, 0)
    fresh_hub(iteration=4)
    if mode == 'raise':
        with pytest.raises(FloatingPointError) as info:
            learner.train_step(det_batch(seed=1), ow)
        msg = str(info.value)
        assert info.value.module == 0 and blocks(learner, 0) in msg, msg
        assert 'ValueError: matrix contains invalid' in msg
        assert isinstance(info.value.__cause__, ValueError)
    else:
        assert learner.train_step(det_batch(seed=1), ow) == {}
        assert learner.num_skipped_iters == 1
    assert_unchanged(learner, ow, before, buffers=mode == 'skip')
    undo()  # no NaN: the failure is the failure
    with pytest.raises(ValueError, match='invalid numeric'):
        learner.train_step(det_batch(seed=2), ow)


@pytest.mark.parametrize('check', ['step', 'module'])
def test_host_syncs_of_the_guard(check):
    """'step' reads the loss flags once per iteration, 'module' once per
    module; no guard reads none."""
    counts = {}
    for guard in (None, 'raise'):
        learner = build(num_modules=3, nan_guard=guard,
                        nan_guard_check=check)
        ow = sgd(learner)
        learner.train_step(det_batch(seed=0), ow)
        with HostReads() as reads:
            learner.train_step(det_batch(seed=1), ow)
        counts[guard] = reads.count
    extra = counts['raise'] - counts[None]
    assert extra == (1 if check == 'step' else learner.num_modules), counts


def test_iteration_from_the_models_own_count_without_runner():
    learner = build(num_modules=2)
    ow = sgd(learner)
    fresh_hub()  # no 'iter' in the message hub
    learner.train_step(det_batch(seed=0), ow)
    learner.train_step(det_batch(seed=1), ow)
    poison_aux(learner, 0, term='loss_bbox')
    with pytest.raises(FloatingPointError,
                       match=re.escape(blocks(learner, 0)) +
                       r'.*iteration 2: .*loss_bbox=nan'):
        learner.train_step(det_batch(seed=2), ow)


def test_nan_in_the_model_loss():
    learner = build(num_modules=3)
    ow = sgd(learner)
    learner.train_step(det_batch(seed=0), ow)
    before = snapshot(learner, ow)
    original = learner.model.loss

    def loss(inputs, samples):
        losses = original(inputs, samples)
        losses['loss_bbox'] = [v * float('inf') for v in
                               losses['loss_bbox']]
        return losses

    learner.model.loss = loss
    fresh_hub(iteration=3)
    with pytest.raises(FloatingPointError) as info:
        learner.train_step(det_batch(seed=1), ow)
    msg = str(info.value)
    assert "the model's own loss of " + blocks(learner, 2) in msg, msg
    assert re.search(r'loss_bbox=(nan|inf)', msg) and 'iteration 3' in msg
    assert 'loss_cls' not in msg  # the finite terms are not blamed
    assert_unchanged(learner, ow, before, buffers=False)
    assert all(p.grad is None for p in learner.model.bbox_head.parameters())


def test_guard_off_lets_nan_through():
    learner = build(num_modules=2, nan_guard=None)
    poison_aux(learner, 0)
    out = learner.train_step(det_batch(), sgd(learner))
    assert torch.isnan(out['loss_local0'])
    assert any(torch.isnan(p).any() for p in learner.parameters())


def test_skip_restores_everything_and_training_continues(monkeypatch):
    """NaN input (every loss NaN, BN statistics poisoned by the forward):
    the iteration is dropped, the MAN EMA copies do not move, the next good
    iteration trains."""
    logged = []
    monkeypatch.setattr(learner_mod, 'print_log',
                        lambda msg, **kw: logged.append((msg, kw)))
    learner = build(num_modules=3, nan_guard='skip',
                    aux=small_aux('mmlocal.MomentumAux', momentum=0.9))
    ow = sgd(learner)
    hook = MomentumAuxHook()
    runner = SimpleNamespace(model=learner, optim_wrapper=ow, iter=0)
    hook.before_train(runner)

    def iteration(i, batch):
        fresh_hub(iteration=i)
        hook.before_train_iter(runner, i)
        out = learner.train_step(batch, ow)
        hook.after_train_iter(runner, i)
        return out

    assert 'loss_local1' in iteration(0, det_batch(seed=0))
    before = snapshot(learner, ow)
    ema = {n: p.clone() for n, p in learner.named_parameters()
           if '.ema.' in n}
    assert ema

    preprocess = learner.data_preprocessor.forward

    def nan_inputs(data, training=False):
        data = preprocess(data, training)
        data['inputs'] = data['inputs'] * NAN
        return data

    learner.data_preprocessor.forward = nan_inputs
    out = iteration(1, det_batch(seed=1))
    assert out == {}
    assert learner.last_iter_skipped and learner.num_skipped_iters == 1
    assert_unchanged(learner, ow, before)  # parameters, BN stats, optimizer
    assert all(p.grad is None for p in learner.parameters())
    assert len(logged) == 1
    msg, kwargs = logged[0]
    assert blocks(learner, 0) in msg and 'iteration 1' in msg, msg
    assert 'skipped' in msg and kwargs['level'] >= 30  # WARNING

    del learner.data_preprocessor.forward
    out = iteration(2, det_batch(seed=2))
    assert torch.isfinite(out['loss']) and not learner.last_iter_skipped
    moved = changed(learner, before)
    assert any(n.startswith('model.backbone.') for n in moved)
    assert any(not torch.equal(p, ema[n])
               for n, p in learner.named_parameters() if n in ema)


def test_skipped_ema_check_is_what_keeps_the_copies():
    """Without the flag the hook would have moved the EMA copies (so the
    previous test's EMA assertion can fail)."""
    learner = build(num_modules=2, nan_guard='skip',
                    aux=small_aux('mmlocal.MomentumAux', momentum=0.9))
    ow = sgd(learner)
    hook = MomentumAuxHook()
    runner = SimpleNamespace(model=learner, optim_wrapper=ow, iter=0)
    hook.before_train(runner)
    hook.before_train_iter(runner, 0)
    learner.train_step(det_batch(seed=0), ow)
    hook.after_train_iter(runner, 0)
    ema = [p.clone() for p in learner.aux_nets[0].ema.parameters()]
    learner.last_iter_skipped = True
    hook.before_train_iter(runner, 1)
    hook.after_train_iter(runner, 1)
    assert all(torch.equal(a, b) for a, b in
               zip(ema, learner.aux_nets[0].ema.parameters()))
    learner.last_iter_skipped = False  # as if the iteration was real
    hook.after_train_iter(runner, 1)
    assert any(not torch.equal(a, b) for a, b in
               zip(ema, learner.aux_nets[0].ema.parameters()))


def test_skip_keeps_gradient_accumulation_exact():
    """accumulative_counts=2, iterations good / NaN / good: the step is that
    of the two good iterations, and the skipped one does not count."""
    learner = build(num_modules=3, nan_guard='skip')
    twin = copy.deepcopy(learner)
    ow = sgd(learner, accumulative_counts=2)
    ow_twin = sgd(twin, accumulative_counts=2)
    ow.initialize_count_status(learner, 0, 10)
    ow_twin.initialize_count_status(twin, 0, 10)
    fresh_hub()
    start = snapshot(learner, ow)

    learner.train_step(det_batch(seed=0), ow)
    assert ow._inner_count == 1
    window = {n: p.grad.clone() for n, p in learner.named_parameters()
              if p.grad is not None}
    restore = poison_aux(learner, 1)
    assert learner.train_step(det_batch(seed=1), ow) == {}
    restore()
    assert ow._inner_count == 1  # the dropped iteration does not count
    for n, p in learner.named_parameters():  # window gradients restored
        assert (p.grad is None) == (n not in window), n
        if n in window:
            assert torch.equal(p.grad, window[n]), n
    learner.train_step(det_batch(seed=2), ow)
    assert ow._inner_count == 2

    assert changed(learner, start)  # the window stepped

    twin.train_step(det_batch(seed=0), ow_twin)
    twin.train_step(det_batch(seed=2), ow_twin)
    for (n, p), q in zip(learner.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize('check', ['step', 'module'])
@pytest.mark.parametrize('mode', ['raise', 'skip'])
def test_cascade_family(mode, check):
    """HPFF with PFF patches: the NaN cascade loss of module 2 is caught at
    its patch backward ('module') or at the end ('step'), and named."""
    learner = build(num_modules=4, nan_guard=mode, nan_guard_check=check,
                    aux=cascade_aux(patch_grid=2))
    ow = sgd(learner)
    fresh_hub(iteration=5)
    learner.train_step(det_batch(seed=0), ow)
    before = snapshot(learner, ow)
    aux = learner.aux_nets[2]
    original = aux.cascade_loss

    def cascade_loss(h, inputs, samples):
        losses = dict(original(h, inputs, samples))
        losses['loss_recon'] = losses['loss_recon'] * NAN
        return losses

    aux.cascade_loss = cascade_loss
    fresh_hub(iteration=6)
    if mode == 'raise':
        with pytest.raises(FloatingPointError) as info:
            learner.train_step(det_batch(seed=1), ow)
        msg = str(info.value)
        assert blocks(learner, 2) in msg and 'iteration 6' in msg, msg
        assert 'loss_cas_recon=nan' in msg, msg
        assert 'loss_ind' not in msg
        assert_unchanged(learner, ow, before, buffers=False)
        return
    assert learner.train_step(det_batch(seed=1), ow) == {}
    assert_unchanged(learner, ow, before)
    assert all(p.grad is None for p in learner.parameters())
    del aux.cascade_loss
    out = learner.train_step(det_batch(seed=2), ow)
    assert torch.isfinite(out['loss']) and changed(learner, before)
