"""HPFF (HPFFAux): HiLo gradient reach and Patch Feature Fusion."""
import copy

import pytest
import torch
from mmengine.optim import OptimWrapper

from mmlocal.models.local.aux import pff
from local_utils import (TINY_FCN, KeepGradsOptimWrapper, det_batch, grads,
                         module_phase_peak, seg_batch)
from test_local_cascade import (_assert_close, _step, cascade_aux,
                                cascade_reference_grads)
from test_local_learner import build, module_params


def hpff(**kwargs):
    return cascade_aux('mmlocal.HPFFAux', **kwargs)


def _zero(h, inputs, samples):
    return {'loss_zero': (h * 0).sum()}


def _silence_model(learner):
    model_loss = learner.model.loss

    def zero_model_loss(inputs, samples):
        return {n: 0 * sum(v) if isinstance(v, list) else 0 * v
                for n, v in model_loss(inputs, samples).items()}

    learner.model.loss = zero_model_loss


def _touched(learner):
    g = _step(learner, det_batch())
    return {n for n in g if torch.count_nonzero(g[n])}


def test_cascade_loss_reaches_modules_i_minus_1_and_i_only():
    learner = build(num_modules=4, aux=hpff(patch_grid=1))
    i = 2
    for j, aux in enumerate(learner.aux_nets):
        aux.independent_loss = _zero
        if j != i:
            aux.cascade_loss = _zero
    _silence_model(learner)
    touched = _touched(learner)
    mine = module_params(learner, i - 1) | module_params(learner, i)
    head = {n for n, _ in learner.named_parameters()
            if n.startswith(f'aux_nets.{i}.')
            and '.independent_head.' not in n}
    assert touched <= mine | head, touched - mine - head
    assert touched & module_params(learner, i - 1)
    assert touched & module_params(learner, i)
    assert touched & head
    assert not touched & module_params(learner, i - 2)


def test_independent_loss_reaches_module_i_only():
    learner = build(num_modules=4, aux=hpff(patch_grid=1))
    i = 1
    for j, aux in enumerate(learner.aux_nets):
        aux.cascade_loss = _zero
        if j != i:
            aux.independent_loss = _zero
    _silence_model(learner)
    touched = _touched(learner)
    head = {n for n, _ in learner.named_parameters()
            if n.startswith(f'aux_nets.{i}.independent_head.')}
    allowed = module_params(learner, i) | head
    assert touched <= allowed, touched - allowed
    assert touched & module_params(learner, i) and touched & head


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_pff_with_one_patch_equals_no_pff(task):
    """A 1x1 grid is the whole map with the whole ground truth: same loss,
    same gradients w.r.t. the feature and the aux net."""
    if task == 'det':
        learner, batch = build(num_modules=2, aux=hpff()), det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=2, aux=hpff())
        batch = seg_batch()
    aux = learner.aux_nets[0]
    aux.patch_grid = 1
    data = learner.data_preprocessor(batch, True)
    inputs, samples = data['inputs'], data['data_samples']
    start, end = learner.module_ranges[0]
    with torch.no_grad():
        h = learner._seq.forward_blocks(
            learner._seq.forward_stem(inputs), start, end, {})
    results = []
    for patched in (False, True):
        torch.manual_seed(0)
        leaf = h.clone().requires_grad_()
        args = aux.patches(leaf, inputs, samples)[0] if patched else \
            (leaf, inputs, samples)
        if patched:
            assert args[0].shape == leaf.shape
            assert args[1].shape == inputs.shape
        losses = aux.cascade_loss(*args)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        leaf.grad, grads(aux)))
        aux.zero_grad(set_to_none=True)
    (la, ga, pa), (lb, gb, pb) = results
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], msg=name)


def test_pff_gradients_equal_one_graph_patch_average():
    """Patch by patch, each share back-propagated at once == the averaged
    patch loss in one graph, one backward (1e-6)."""
    learner = build(num_modules=2, aux=hpff(patch_grid=2))
    twin = copy.deepcopy(learner)
    batch = det_batch()
    _assert_close(_step(learner, batch),
                  cascade_reference_grads(twin, batch, joint_patches=True))
    # and it differs from no PFF (the patches see their own GT)
    twin = copy.deepcopy(twin)
    for aux in twin.aux_nets:
        aux.patch_grid = 1
    twin.zero_grad(set_to_none=True)
    other = _step(twin, batch)
    assert any(not torch.allclose(other[n], grads(learner)[n])
               for n in other if n.startswith('aux_nets.0.task_head'))


def _aux_step_peak(patch_grid):
    torch.manual_seed(0)
    # the aux head dominates: a wide FCN head and decoder on a narrow module
    aux = hpff(patch_grid=patch_grid,
               seg_head=dict(channels=128, head=dict(dropout_ratio=0.0)),
               recon=dict(channels=128, out_stride=1))
    learner = build(TINY_FCN, 'mmseg', num_modules=2, aux=aux)
    return module_phase_peak(learner, seg_batch(n=2, size=64))


def test_pff_lowers_the_aux_step_peak():
    plain, pff = _aux_step_peak(1), _aux_step_peak(2)
    assert pff < 0.8 * plain, (pff, plain)


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_one_training_step(task):
    if task == 'det':
        learner, batch = build(num_modules=3, aux=hpff()), det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=3, aux=hpff())
        batch = seg_batch()
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01))
    out = learner.train_step(batch, ow)
    assert all(torch.isfinite(v) for v in out.values())
    assert {'loss_local0', 'local0.loss_ind', 'local0.loss_cas_recon'} <= \
        set(out)
    torch.testing.assert_close(
        out['loss_local1'],
        sum(v for k, v in out.items() if k.startswith('local1.')))


def test_uneven_patches():
    # 64 px, stride 8: an 8x8 map cut into 3 + 3 + 2 rows and columns
    learner = build(TINY_FCN, 'mmseg', num_modules=2,
                    aux=hpff(patch_grid=3, patch_remainder='uneven'))
    aux = learner.aux_nets[0]
    h = torch.zeros(2, 8, 8, 8)
    data = learner.data_preprocessor(seg_batch(), True)
    patches = aux.patches(h, data['inputs'], data['data_samples'])
    assert [p[0].shape[-2:] for p in patches[:3]] == [(3, 3), (3, 3), (3, 2)]
    assert patches[-1][2][0].gt_sem_seg.data.shape[-2:] == (16, 16)
    out = learner.train_step(seg_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.01)))
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize('kwargs, match', [
    (dict(cascade_span=5), 'cascade_span'),
    (dict(cascade_span=0), 'cascade_span'),
    (dict(patch_grid=0), 'patch_grid'),
    (dict(patch_remainder='pad'), 'patch_remainder'),
    (dict(independent_weight=-1.0), 'independent_weight'),
    (dict(patch_reduction='max'), 'patch_reduction'),
    (dict(patch_batch='yes'), 'patch_batch'),
    (dict(patch_parts='decoder'), 'patch_parts'),
    (dict(patch_grid=2, patch_batch=True, with_cp=True), 'with_cp'),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(num_modules=4, aux=hpff(**kwargs))


def test_patch_grid_that_does_not_divide_the_feature_map():
    # 64 px input: module 2 ends at stride 16, a 4x4 map; 3 does not divide
    learner = build(num_modules=4, aux=hpff(patch_grid=3))
    with pytest.raises(ValueError, match='patch_grid=3'):
        learner.train_step(det_batch(), KeepGradsOptimWrapper(
            torch.optim.SGD(learner.parameters(), lr=0.01)))


def _logged_step(learner, batch):
    logs = learner.train_step(batch, KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    return logs, grads(learner)


def _bn_buffers(learner):
    return {n: b.clone() for n, b in learner.named_buffers()
            if n.startswith('aux_nets.') and 'running' in n}


@pytest.mark.parametrize('case', ['det', 'det-mmdet-loss', 'seg',
                                  'seg-uneven', 'det-sum'])
def test_patch_batch_equals_sequential_patches(case):
    """All patches stacked along the batch, one aux forward/backward ==
    one patch after the other: logged losses, every gradient and (one stack
    of equal patches) the aux nets' BN running statistics (1e-5)."""
    kwargs = dict(patch_grid=2)
    if case == 'det-mmdet-loss':  # mmdet's own per-image loss, per group
        kwargs['det_head'] = dict(feat_channels=16, batched_targets=False)
    if case == 'det-sum':
        kwargs['patch_reduction'] = 'sum'
    if case == 'seg-uneven':  # 8x8 map cut 3 + 3 + 2: four patch sizes
        kwargs.update(patch_grid=3, patch_remainder='uneven')
    if case.startswith('det'):
        learner, batch = build(num_modules=3, aux=hpff(**kwargs)), \
            det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=2, aux=hpff(**kwargs))
        batch = seg_batch()
    twin = copy.deepcopy(learner)
    for aux in twin.aux_nets:
        aux.patch_batch = True
    logs, g = _logged_step(learner, batch)
    logs_b, g_b = _logged_step(twin, batch)
    assert logs.keys() == logs_b.keys()
    for name in logs:
        torch.testing.assert_close(logs_b[name], logs[name], rtol=1e-5,
                                   atol=1e-6, msg=name)
    for name in g:
        torch.testing.assert_close(g_b[name], g[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert any(torch.count_nonzero(v) for n, v in g.items()
               if n.startswith('aux_nets.0.task_head'))
    if case == 'seg-uneven':
        return  # stacks of several sizes: BN running stats in stack order
    bufs, bufs_b = _bn_buffers(learner), _bn_buffers(twin)
    assert bufs
    for name in bufs:
        torch.testing.assert_close(bufs_b[name], bufs[name], rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_patch_batch_runs_the_aux_net_once(monkeypatch):
    learner = build(num_modules=2, aux=hpff(patch_grid=2, patch_batch=True))
    aux = learner.aux_nets[0]
    calls = []
    forward = aux.task_head.forward
    monkeypatch.setattr(aux.task_head, 'forward',
                        lambda y: calls.append(y.shape) or forward(y))
    learner.train_step(det_batch(), KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.1)))
    # 2 images x 4 patches, in one call
    side = 64 // aux.in_stride // 2
    assert calls == [torch.Size([8, aux.task_head.in_channels, side, side])]


def test_patch_reduction_sum_is_p2_times_mean():
    learner = build(num_modules=2, aux=hpff(patch_grid=2))
    aux = learner.aux_nets[0]
    data = learner.data_preprocessor(det_batch(), True)
    inputs, samples = data['inputs'], data['data_samples']
    side = 64 // aux.in_stride
    h = torch.randn(2, aux.task_head.in_channels, side, side)
    torch.manual_seed(0)
    mean = aux.loss(h, inputs, samples)
    aux.patch_reduction = 'sum'
    torch.manual_seed(0)
    total = aux.loss(h, inputs, samples)
    assert mean.keys() == total.keys()
    for name in mean:
        want = mean[name] if name == 'loss_ind' else 4 * mean[name]
        torch.testing.assert_close(total[name], want, msg=name)


def _recon_scope_reference(learner, batch):
    """``patch_parts='recon'`` as the HPFF reference defines PFF: the
    cascade task head on the whole window output, only the decoder on the
    patches (each against its region of the image, padding left out),
    written out here from the pieces (decoder, slices), all in one graph."""
    from mmlocal.models.local.heads.recon_decoder import padding_mask
    data = learner.data_preprocessor(batch, True)
    inputs, samples = data['inputs'], data['data_samples']
    seq, span, ranges = learner._seq, learner.cascade_span, \
        learner.module_ranges

    def run(j, x):
        start, end = ranges[j]
        return seq.forward_blocks(seq.forward_stem(x, {}) if j == 0 else x,
                                  start, end, {})

    total, x, x_in, outs = 0., inputs, [], {}
    image = None
    for k, (start, end) in enumerate(ranges[:-1]):
        x_in.append(x)
        aux = learner.aux_nets[k]
        if image is None:
            image = aux.image01(inputs)
            valid = padding_mask(samples, inputs)
            assert (valid is None) == (learner.aux_nets[0].task == 'seg')
        h = run(k, x)
        ind = aux.independent_loss(h, inputs, samples)
        z = x_in[max(0, k - span + 1)]
        for j in range(max(0, k - span + 1), k + 1):
            z = run(j, z)
        cas = sum(aux.task_weight * v for v in aux.task_head.loss(
            aux.transform(z), inputs, samples).values())
        rows = pff.grid_slices(z.shape[-2], aux.patch_grid, 'uneven')
        cols = pff.grid_slices(z.shape[-1], aux.patch_grid, 'uneven')
        s = aux.in_stride
        for r0, r1 in rows:
            for c0, c1 in cols:
                box = (..., slice(r0 * s, r1 * s), slice(c0 * s, c1 * s))
                # 'sum': the reference's sum of the patch BCEs
                cas = cas + aux.recon_weight * aux.recon.loss(
                    aux.transform(z[..., r0:r1, c0:c1]), image[box],
                    None if valid is None else valid[box]) / (
                        aux.patch_grid**2
                        if aux.patch_reduction == 'mean' else 1)
        total = total + aux.independent_weight * sum(ind.values()) + \
            aux.cascade_weight * cas
        h_out = {}
        seq.forward_blocks(seq.forward_stem(x, {}) if k == 0 else x, start,
                           end, h_out)
        outs.update({n: v.detach() for n, v in h_out.items()})
        x = h.detach()
    with learner._backbone_runs_last_module(x, ranges[-1][0], outs):
        loss, _ = learner.parse_losses(learner.model.loss(inputs, samples))
    (total + loss).backward()
    return grads(learner)


@pytest.mark.parametrize('case', ['det', 'seg-uneven-sum'])
def test_recon_patch_parts_equal_the_reference_pff(case):
    """``patch_parts='recon'``: one patch at a time, stacked
    (``patch_batch``) and the written-out reference give the same
    gradients; the cascade task head runs once, on the whole input."""
    if case == 'det':
        learner = build(num_modules=3,
                        aux=hpff(patch_grid=2, patch_parts='recon'))
        batch = det_batch()
    else:  # 8x8 map cut 3 + 3 + 2: four patch sizes
        learner = build(TINY_FCN, 'mmseg', num_modules=2,
                        aux=hpff(patch_grid=3, patch_remainder='uneven',
                                 patch_parts='recon',
                                 patch_reduction='sum'))
        batch = seg_batch()
    # det: the first image is padded (its image 56 rows high), the
    # decoder's patches leave the padding out of their targets (mmseg's
    # preprocessor resets img_shape: no padding there)
    shape = batch['data_samples'][0].metainfo['img_shape']
    batch['data_samples'][0].set_metainfo(
        dict(img_shape=(shape[0] - 8, shape[1])))
    batched, reference = copy.deepcopy(learner), copy.deepcopy(learner)
    for aux in batched.aux_nets:
        aux.patch_batch = True
    aux = learner.aux_nets[0]
    calls = []
    loss = aux.task_head.loss
    aux.task_head.loss = lambda y, *args, **kwargs: calls.append(
        y.shape) or loss(y, *args, **kwargs)
    got = _step(learner, batch)
    assert len(calls) == 1 and calls[0][-1] == 64 // aux.in_stride
    want = _recon_scope_reference(reference, batch)
    _assert_close(got, want)
    _assert_close(_step(batched, batch), want)
    assert any(torch.count_nonzero(v) for n, v in got.items()
               if n.startswith('aux_nets.0.recon'))
