"""MLAAN (MLAANAux): cascade span, leap augmented modules, EMA copies."""
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import OptimWrapper

from local_utils import TINY_FCN, det_batch, grads, seg_batch
from mmlocal.engine.hooks import MomentumAuxHook
from mmlocal.models.local.aux.auglocal import uniform_layer_indices
from test_local_cascade import _step, cascade_aux
from test_local_learner import build, module_params
from test_momentum_aux import (bn_modes, norm_eval_model, pretend_pretrained,
                               record_io)


def mlaan(**kwargs):
    return cascade_aux('mmlocal.MLAANAux', **kwargs)


def test_every_aux_net_ema_moves_after_a_step():
    """All aux nets' EMA copies follow their source (the reference CIFAR
    code updates only the last one)."""
    learner = build(num_modules=4, aux=mlaan(momentum=0.9))
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05))
    hook = MomentumAuxHook()
    runner = SimpleNamespace(model=learner, optim_wrapper=ow, iter=0)
    hook.before_train(runner)
    for aux in learner.aux_nets:
        assert aux.ema_driven
        for a, b in zip(aux.ema.parameters(), aux.source.parameters()):
            assert torch.equal(a, b)
    before = [[p.detach().clone() for p in aux.ema.parameters()]
              for aux in learner.aux_nets]
    hook.before_train_iter(runner, 0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # driven by the hook: no warning
        learner.train_step(det_batch(), ow)
    hook.after_train_iter(runner, 0)
    for aux, old in zip(learner.aux_nets, before):
        new = list(aux.ema.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(old, new))
        for o, n, s in zip(old, new, aux.source.parameters()):
            torch.testing.assert_close(n, 0.9 * o + 0.1 * s.detach())


def test_cascade_span_3_reaches_modules_i_minus_2_to_i():
    learner = build(num_modules=5, aux=mlaan(cascade_span=3))
    i = 3

    def zero(h, inputs, samples):
        return {'loss_zero': (h * 0).sum()}

    for j, aux in enumerate(learner.aux_nets):
        aux.independent_loss = zero
        if j != i:
            aux.cascade_loss = zero
    model_loss = learner.model.loss
    learner.model.loss = lambda inputs, samples: {
        n: 0 * sum(v) for n, v in model_loss(inputs, samples).items()}
    g = _step(learner, det_batch())
    touched = {n for n in g if torch.count_nonzero(g[n])}
    window = set().union(*(module_params(learner, j) for j in (1, 2, 3)))
    head = {n for n, _ in learner.named_parameters()
            if n.startswith(f'aux_nets.{i}.')}
    assert touched <= window | head, touched - window - head
    for j in (1, 2, 3):
        assert touched & module_params(learner, j), j
    assert not touched & module_params(learner, 0)


def test_leap_stack_first_block_is_learnable_plus_ema():
    learner = build(num_modules=4, aux=mlaan())
    seq = learner._seq
    g = _step(learner, det_batch())
    for k, aux in enumerate(learner.aux_nets):
        # later blocks, shape-consistent, the first one's live copy followed
        blocks = [item[1] for item in aux.plan if item[0] == 'block']
        assert blocks[0] == aux.source_block > learner.module_ranges[k][1] - 1
        assert aux.source is seq.blocks[aux.source_block]
        assert all(not p.requires_grad and p.grad is None
                   for p in aux.ema.parameters())
        assert any(torch.count_nonzero(g[f'aux_nets.{k}.lb.{n}'])
                   for n, _ in aux.lb.named_parameters())
    # the EMA copies are not trainable parameters of the learner
    assert not any('.ema.' in n for n in grads(learner))


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_one_training_step(task):
    if task == 'det':
        learner, batch = build(num_modules=4, aux=mlaan()), det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=3,
                        aux=mlaan(cascade_span=3))
        batch = seg_batch()
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01))
    with pytest.warns(UserWarning, match='MomentumAuxHook'):
        out = learner.train_step(batch, ow)
    assert all(torch.isfinite(v) for v in out.values())
    assert {'loss_local0', 'local0.loss_ind'} <= set(out)


@pytest.mark.parametrize('kwargs, match', [
    (dict(momentum=1.0), 'momentum'),
    (dict(momentum=0.0), 'momentum'),
    (dict(cascade_span=5), 'cascade_span'),
    (dict(cascade_span=0), 'cascade_span'),
    (dict(aux_depth=0), 'aux_depth'),
    (dict(aux_depth=[2, 2]), 'aux_depth'),
    (dict(aux_depth=[2, 0, 1]), 'aux_depth'),
    (dict(stage_transition='copy'), 'stage_transition'),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(num_modules=4, aux=mlaan(**kwargs))


def test_per_module_aux_depth():
    """A list gives each module its own leap depth (the reference tables
    go from deep to shallow); an int is the same for every module."""
    depths = [3, 2, 1]
    learner = build(num_modules=4, aux=mlaan(aux_depth=depths))
    per_int = [build(num_modules=4, aux=mlaan(aux_depth=d)).aux_nets[k]
               for k, d in enumerate(depths)]
    n = learner._seq.num_blocks
    for k, (aux, d) in enumerate(zip(learner.aux_nets, depths)):
        end = learner.module_ranges[k][1]
        assert aux.aux_depth == d
        assert aux.sampled_layers == uniform_layer_indices(end, n + 1, d)
        assert aux.sampled_blocks == per_int[k].sampled_blocks
        assert len(aux.sampled_blocks) == d
    assert [len(a.post) for a in learner.aux_nets] != \
        [len(a.post) for a in build(num_modules=4,
                                    aux=mlaan(aux_depth=2)).aux_nets]


def test_ema_copy_normalises_as_its_source_with_norm_eval():
    """mmdet's norm_eval=True: the live blocks use frozen statistics, and so
    does each EMA copy, which equals its source at iteration 0."""
    learner = build(norm_eval_model(True), num_modules=4, aux=mlaan())
    pretend_pretrained(learner)
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.05))
    hook = MomentumAuxHook()
    runner = SimpleNamespace(model=learner, optim_wrapper=ow, iter=0)
    hook.before_train(runner)
    refs = [copy.deepcopy(aux.source) for aux in learner.aux_nets]
    records = [record_io(aux.ema) for aux in learner.aux_nets]
    hook.before_train_iter(runner, 0)
    learner.train_step(det_batch(), ow)
    hook.after_train_iter(runner, 0)
    for aux, ref, (seen, handle) in zip(learner.aux_nets, refs, records):
        handle.remove()
        assert bn_modes(aux.ema) and not any(bn_modes(aux.ema))
        # fresh LB and later copies keep batch statistics
        assert all(bn_modes(aux.lb))
        assert len(seen) == 1  # every module's cascade aux ran once
        x, y = seen[0]
        with torch.no_grad():
            torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
