"""The cascade engine (two-stream families): exact gradients against the
reference's two-stream computation, gradient reach of the last module."""
import copy

import pytest
import torch

from local_utils import (TINY_FCN, KeepGradsOptimWrapper, det_batch, grads,
                         cpu_bf16_amp_wrapper, seg_batch, small_aux)
from test_local_learner import build, module_params


def cascade_aux(type='mmlocal.HPFFAux', **kwargs):
    """Narrow two-stream aux (fast tests). HPFF patches the whole cascade
    aux (``patch_parts='all'``, what :func:`cascade_reference_grads`
    computes) unless told otherwise."""
    if type == 'mmlocal.HPFFAux':
        kwargs.setdefault('patch_parts', 'all')
    kwargs.setdefault('independent_det_head', dict(feat_channels=16))
    kwargs.setdefault('independent_seg_head',
                      dict(channels=16, head=dict(dropout_ratio=0.0)))
    return small_aux(type, **kwargs)


def cascade_reference_grads(learner, batch, joint_patches=True):
    """The two-stream objective as the reference code computes it, summed
    and back-propagated once.

    Module k: the independent stream runs module k on its detached input;
    the cascade stream recomputes modules s..k from the detached input of
    module s = max(0, k - w + 1) (the reference's second stream ``y``). With
    PFF the cascade loss is the patch average, all patches in one graph.
    """
    data = learner.data_preprocessor(batch, True)
    inputs, samples = data['inputs'], data['data_samples']
    seq, span = learner._seq, learner.cascade_span
    ranges = learner.module_ranges
    outs, total, x_in = {}, 0., []

    def run(j, x):
        start, end = ranges[j]
        h = seq.forward_stem(x, {}) if j == 0 else x
        return seq.forward_blocks(h, start, end, {})

    x = inputs
    for k, (start, end) in enumerate(ranges[:-1]):
        x_in.append(x)
        aux = learner.aux_nets[k]
        h = run(k, x)
        independent = aux.independent_loss(h, inputs, samples)
        first = max(0, k - span + 1)
        z = x_in[first]
        for j in range(first, k + 1):
            z = run(j, z)
        if aux.patch_grid == 1 or not joint_patches:
            cascade = aux.cascade_loss(z, inputs, samples)
        else:
            patches = aux.patches(z, inputs, samples)
            cascade = {}
            for patch in patches:
                for n, v in aux.cascade_loss(*patch).items():
                    cascade[n] = cascade.get(n, 0.) + v / len(patches)
        total = total + aux.independent_weight * sum(independent.values()) \
            + aux.cascade_weight * sum(cascade.values())
        # the stage outputs the neck sees: detached from the last module's
        # point of view, unless attached (attach_stages)
        h_out = {}
        seq.forward_blocks(seq.forward_stem(x, {}) if k == 0 else x,
                           start, end, h_out)
        outs.update({s: v if s in learner.attach_stages else v.detach()
                     for s, v in h_out.items()})
        x = h.detach()
    with learner._backbone_runs_last_module(x, ranges[-1][0], outs):
        loss, _ = learner.parse_losses(learner.model.loss(inputs, samples))
    (total + loss).backward()
    return grads(learner)


def _step(learner, batch):
    learner.train_step(batch, KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    return grads(learner)


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6,
                                   rtol=1e-5, msg=name)


@pytest.mark.parametrize('aux', [
    cascade_aux(patch_grid=1),                     # HPFF HiLo, w=2
    cascade_aux('mmlocal.MLAANAux', cascade_span=3),
    cascade_aux(cascade_span=1, patch_grid=1),     # both streams on k
])
def test_cascade_gradients_equal_two_stream_reference(aux):
    learner = build(num_modules=4, aux=aux)
    learner.aux_nets.apply(lambda m: setattr(m, 'ema_driven', True))
    twin = copy.deepcopy(learner)
    batch = det_batch()
    got = _step(learner, batch)
    _assert_close(got, cascade_reference_grads(twin, batch))
    # every module and every aux net did receive gradient
    for k in range(4):
        assert any(torch.count_nonzero(got[n])
                   for n in module_params(learner, k)), k


def test_cascade_gradients_segmentor_with_pff():
    learner = build(TINY_FCN, 'mmseg', num_modules=3,
                    aux=cascade_aux(patch_grid=2))
    twin = copy.deepcopy(learner)
    batch = seg_batch()
    _assert_close(_step(learner, batch), cascade_reference_grads(twin, batch))


def test_last_module_is_trained_by_the_model_loss_only():
    """The model's loss (neck + heads) reaches the last module only: the
    window of the last module is not extended into module K-2."""
    learner = build(num_modules=4, aux=cascade_aux(patch_grid=1))
    for aux in learner.aux_nets:
        aux.backward_streams = lambda hi, hc, *a, backward, **kw: backward(
            (hi * 0).sum() + (hc * 0).sum()) or {}
    g = _step(learner, det_batch())
    touched = {n for n in g if torch.count_nonzero(g[n])}
    allowed = module_params(learner, 3) | {
        n for n, _ in learner.named_parameters()
        if n.startswith(('model.neck.', 'model.bbox_head.'))}
    assert touched and touched <= allowed, touched - allowed
    assert touched & module_params(learner, 3)


def test_attached_stage_with_cascade():
    """attach_stages keeps working: the neck reaches module 1 (layer2)."""
    learner = build(num_modules=4, attach_stages=[1],
                    aux=cascade_aux(patch_grid=1))
    twin = copy.deepcopy(learner)
    batch = det_batch()
    got = _step(learner, batch)
    assert got  # the step ran with retained graphs
    # silence every aux: module 1 still gets gradient through C3
    learner.zero_grad(set_to_none=True)
    for aux in learner.aux_nets:
        aux.backward_streams = lambda hi, hc, *a, backward, **kw: backward(
            (hi * 0).sum() + (hc * 0).sum()) or {}
    g = _step(learner, batch)
    assert any(torch.count_nonzero(g[n]) for n in module_params(learner, 1))
    assert not any(torch.count_nonzero(g[n])
                   for n in module_params(learner, 0))
    del twin


def test_attached_stage_gradients_equal_two_stream_reference(monkeypatch):
    """A module whose stage the neck sees (attach_stages) hands its pending
    gradient to the model's backward (_JoinPending): one pass through its
    graph, the same gradients as the reference; nothing is kept after."""
    from mmlocal.models.local import learner as learner_module
    learner = build(num_modules=4, attach_stages=[1],
                    aux=cascade_aux(patch_grid=1))
    twin = copy.deepcopy(learner)
    batch = det_batch()
    joined = []
    join = learner_module._join_pending

    def spy(loss, deferred):
        joined.append(len(deferred))
        return join(loss, deferred)

    monkeypatch.setattr(learner_module, '_join_pending', spy)
    got = _step(learner, batch)
    assert joined == [1] and learner._deferred == []
    _assert_close(got, cascade_reference_grads(twin, batch))


def test_gradient_accumulation_scales_cascade_losses():
    learner = build(num_modules=3, aux=cascade_aux(patch_grid=2))
    twin = copy.deepcopy(learner)
    batch = det_batch()
    ow = KeepGradsOptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.1),
                               accumulative_counts=2)
    ow.initialize_count_status(learner, 0, 10)
    learner.train_step(batch, ow)
    assert ow._inner_count == 1
    got, want = grads(learner), cascade_reference_grads(twin, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name] / 2, atol=1e-6,
                                   rtol=1e-5, msg=name)


def test_amp_on_cpu_bf16(monkeypatch):
    learner = build(num_modules=3, aux=cascade_aux(patch_grid=2))
    ow = cpu_bf16_amp_wrapper(monkeypatch, learner.parameters())
    out = learner.train_step(det_batch(), ow)
    assert all(torch.isfinite(torch.as_tensor(v)).all()
               for v in out.values())


def test_module_params_found_once_follow_requires_grad():
    """The cascade engine's per-module parameter lists are found once (no
    walk over the modules per step) and still follow requires_grad."""
    learner = build(aux=small_aux('mmlocal.HPFFAux', cascade_span=2))
    names = {id(p): n for n, p in learner.named_parameters()}
    for k in range(len(learner.module_ranges) - 1):
        got = {names[id(p)] for p in learner._module_params(k)}
        want = {n for n in module_params(learner, k)
                if learner.get_parameter(n).requires_grad}
        assert got == want and got, k
    assert learner._module_params_found  # kept
    frozen = next(iter(learner._module_params(1)))
    frozen.requires_grad_(False)
    assert all(p is not frozen for p in learner._module_params(1))
