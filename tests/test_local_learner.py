"""LocalLearner: gradient isolation, exact gradients, optimisation paths."""
import copy

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from local_utils import (TINY_FCN, TINY_RETINANET, TINY_YOLOX,
                         cpu_bf16_amp_wrapper,
                         KeepGradsOptimWrapper, det_batch, grads, seg_batch,
                         small_aux)
from mmlocal.registry import MODELS


def build(model=TINY_RETINANET, scope='mmdet', **kwargs):
    cfg = dict(type='mmlocal.LocalLearner', model=ConfigDict(model))
    cfg.setdefault('num_modules', 4)
    cfg.setdefault('aux', small_aux())
    cfg.update(kwargs)
    with DefaultScope.overwrite_default_scope(scope):
        learner = MODELS.build(cfg)
    torch.manual_seed(0)
    learner.init_weights()
    return learner


def module_params(learner, k):
    """Names (in learner.named_parameters) of the blocks of module k."""
    start, end = learner.module_ranges[k]
    names = set()
    seq = learner._seq
    for i in range(start, end):
        prefix = 'model.backbone.' + seq.block_names[i] + '.'
        names |= {n for n, _ in learner.named_parameters()
                  if n.startswith(prefix)}
    if k == 0:
        blocks = tuple('model.backbone.' + b + '.' for b in seq.block_names)
        names |= {n for n, _ in learner.named_parameters()
                  if n.startswith('model.backbone.')
                  and not n.startswith(blocks)}
    return names


def reference_grads(learner, batch):
    """Sum of the detached local losses + model loss, one backward."""
    data = learner.data_preprocessor(batch, True)
    inputs, samples = data['inputs'], data['data_samples']
    seq, outs, total, x = learner._seq, {}, 0., inputs
    for k, (start, end) in enumerate(learner.module_ranges[:-1]):
        h = seq.forward_stem(x, outs) if k == 0 else x
        before = set(outs)
        h = seq.forward_blocks(h, start, end, outs)
        for s in set(outs) - before:
            outs[s] = outs[s].detach()
        loss_k, _ = learner.parse_losses(
            learner.aux_nets[k].loss(h, inputs, samples))
        total = total + loss_k
        x = h.detach()
    with learner._backbone_runs_last_module(x, learner.module_ranges[-1][0],
                                            outs):
        loss, _ = learner.parse_losses(learner.model.loss(inputs, samples))
    (total + loss).backward()
    return grads(learner)


@pytest.mark.parametrize('aux', ['mmlocal.InfoProAux', 'mmlocal.DGLAux'])
@pytest.mark.parametrize('task', ['det', 'seg', 'det-csp'])
def test_gradients_equal_summed_reference(task, aux):
    if task == 'det':
        learner = build(aux=small_aux(aux))
        batch = det_batch()
    elif task == 'det-csp':  # YOLOX: CSPDarknet split at stage children
        learner = build(TINY_YOLOX, num_modules=3, aux=small_aux(aux))
        batch = det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=2, aux=small_aux(aux))
        batch = seg_batch()
    twin = copy.deepcopy(learner)
    learner.train_step(batch, KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    got = grads(learner)
    want = reference_grads(twin, batch)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6,
                                   rtol=1e-5, msg=name)
    # every module and every aux net did receive gradient
    for k in range(learner.num_modules):
        assert any(torch.count_nonzero(got[n])
                   for n in module_params(learner, k)), k
    for k in range(learner.num_modules - 1):
        assert any(torch.count_nonzero(v) for n, v in got.items()
                   if n.startswith(f'aux_nets.{k}.')), k


def test_gradient_isolation_between_modules():
    """Module k's parameters get gradient only from aux k's loss."""
    learner = build(num_modules=4)
    k = 1
    # silence aux k: every remaining loss (other aux nets, model head) must
    # leave module k's parameters with exactly zero gradient
    original = learner.aux_nets[k].loss

    def zero_loss(h, inputs, samples):
        return {'loss_zero': (h * 0).sum()}

    learner.aux_nets[k].loss = zero_loss
    learner.train_step(det_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    g = grads(learner)
    mine = module_params(learner, k)
    assert mine
    for name in mine:
        assert torch.count_nonzero(g[name]) == 0, name
    # and the other modules did get gradient
    for j in (0, 2, 3):
        assert any(torch.count_nonzero(g[n]) for n in module_params(
            learner, j)), j

    # now only aux k speaks: it reaches module k and aux k, nothing else
    learner.zero_grad(set_to_none=True)
    learner.aux_nets[k].loss = original
    for j in (0, 2):
        learner.aux_nets[j].loss = zero_loss
    model_loss = learner.model.loss

    def zero_model_loss(inputs, samples):
        losses = model_loss(inputs, samples)
        return {n: 0 * sum(v) if isinstance(v, list) else 0 * v
                for n, v in losses.items()}

    learner.model.loss = zero_model_loss
    learner.train_step(det_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    g = grads(learner)
    allowed = mine | {n for n, _ in learner.named_parameters()
                      if n.startswith(f'aux_nets.{k}.')}
    touched = {n for n in g if torch.count_nonzero(g[n])}
    assert touched and touched <= allowed, touched - allowed
    assert any(n.startswith(f'aux_nets.{k}.') for n in touched)
    assert touched & mine


def test_k1_is_end_to_end():
    learner = build(num_modules=1)
    assert len(learner.aux_nets) == 0
    plain = copy.deepcopy(learner.model)
    batch = det_batch()
    learner.train_step(batch, KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    data = plain.data_preprocessor(batch, True)
    loss, _ = plain.parse_losses(
        plain.loss(data['inputs'], data['data_samples']))
    loss.backward()
    got, want = grads(learner.model), grads(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_val_and_predict_equal_wrapped_model():
    learner = build()
    learner.eval()
    batch = det_batch()
    ours = learner.val_step(batch)
    theirs = learner.model.val_step(batch)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.pred_instances.bboxes,
                                   b.pred_instances.bboxes)
        torch.testing.assert_close(a.pred_instances.scores,
                                   b.pred_instances.scores)
    assert len(learner.test_step(batch)) == 2


def test_losses_finite_and_decreasing():
    learner = build(num_modules=2)
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01,
                                      momentum=0.9))
    batch = det_batch()
    history = [learner.train_step(batch, ow) for _ in range(8)]
    for key in ('loss', 'loss_local0', 'loss_cls'):
        values = [float(h[key]) for h in history]
        assert all(torch.isfinite(torch.tensor(values))), key
        assert values[-1] < values[0], (key, values)
    assert {'loss_local0', 'local0.loss_cls', 'local0.loss_recon'} <= set(
        history[0])


def test_gradient_accumulation_scales_local_losses():
    learner = build(num_modules=2)
    twin = copy.deepcopy(learner)
    batch = det_batch()
    ow = KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1),
        accumulative_counts=2)
    ow.initialize_count_status(learner, 0, 10)
    learner.train_step(batch, ow)
    assert ow._inner_count == 1  # one count per iteration, not per module
    got = grads(learner)
    want = reference_grads(twin, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name] / 2, atol=1e-6,
                                   rtol=1e-5, msg=name)


def test_step_updates_every_module_once():
    learner = build(num_modules=4)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01))
    learner.train_step(det_batch(), ow)
    changed = {n for n, p in learner.named_parameters()
               if not torch.equal(p, before[n])}
    for k in range(4):
        assert module_params(learner, k) & changed, k
    # zero_grad ran after the step
    assert all(p.grad is None or not p.grad.abs().sum()
               for p in learner.parameters())


def test_amp_on_cpu_bf16(monkeypatch):
    learner = build(num_modules=2)
    ow = cpu_bf16_amp_wrapper(monkeypatch, learner.parameters())
    out = learner.train_step(det_batch(), ow)
    assert all(torch.isfinite(torch.as_tensor(v)).all()
               for v in out.values())


def test_rejects_unsupported_optim_wrapper():
    from mmengine.optim import OptimWrapperDict
    learner = build(num_modules=2)
    owd = OptimWrapperDict(a=OptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    with pytest.raises(TypeError, match='OptimWrapperDict'):
        learner.train_step(det_batch(), owd)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_modules=0), 'num_modules'),
    (dict(num_modules=99), 'num_modules'),
    (dict(num_modules=None, split_points=[5, 2]), 'split_points'),
    (dict(num_modules=None, split_points=[42]), 'split_points'),
    (dict(num_modules=None), 'num_modules'),
    (dict(aux=dict(type='mmlocal.NoSuchAux')), 'aux.type'),
    (dict(attach_stages=[7]), 'attach_stages'),
])
def test_bad_config_names_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_attached_stage_gets_neck_gradient():
    """attach_stages keeps a stage output attached: the head loss then
    reaches the module that produced it (here stage 1 = layer2)."""
    learner = build(num_modules=4, attach_stages=[1])
    learner.aux_nets[1].loss = lambda h, i, s: {'loss_zero': (h * 0).sum()}
    learner.train_step(det_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    g = grads(learner)
    # module 1 = blocks 2, 3 = layer2: its aux is silenced, so gradient can
    # only have come from the neck through the attached C3
    assert any(torch.count_nonzero(g[n]) for n in module_params(learner, 1))


def test_init_weights_reaches_aux_heads():
    """The aux dense head gets RetinaNet's focal-loss prior like the main
    head (regression: aux nets in a torch ModuleList were skipped)."""
    learner = build(num_modules=2)
    prior = learner.model.bbox_head.retina_cls.bias.detach()
    aux_bias = learner.aux_nets[0].task_head.head.retina_cls.bias.detach()
    torch.testing.assert_close(aux_bias, torch.full_like(aux_bias,
                                                         float(prior[0])))
