"""Fewer kernels in the cascade families (issue #15): the pieces that
removed them keep values and gradients (the end-to-end equalities are in
test_local_cascade.py and test_hpff.py)."""
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule

from mmlocal.models.local.aux import pff
from mmlocal.models.local.aux.cascade import CascadeLocalAux


def _graph_names(tensor):
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def test_weighted_sum_gradients_and_logs():
    """One stacked weighted sum: each term's gradient is exactly its
    weight, the logs are the weighted parts, the total their sum."""
    aux = CascadeLocalAux.__new__(CascadeLocalAux)
    nn.Module.__init__(aux)
    aux.independent_weight, aux.cascade_weight = 0.001, 0.999
    values = torch.tensor([0.7, 1.3, 2.1, 0.4, 0.9])
    terms = values.clone().requires_grad_()
    ind = {'loss_cls': terms[0], 'loss_bbox': terms[1]}
    cas = {'loss_cls': terms[2], 'loss_bbox': terms[3],
           'loss_recon': terms[4]}
    loss, logs = aux._weighted_sum(ind, cas)
    loss.backward()
    assert torch.equal(terms.grad, torch.tensor([0.001] * 2 + [0.999] * 3))
    want = aux._weighted({k: v.detach() for k, v in ind.items()},
                         {k: v.detach() for k, v in cas.items()})
    assert logs.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(logs[name], want[name], rtol=1e-6,
                                   atol=0)
    torch.testing.assert_close(logs.total, sum(want.values()), rtol=1e-6,
                               atol=0)
    assert not any(v.requires_grad for v in logs.values())


def test_grouped_bn_output_is_no_view_and_stats_match():
    """The grouped BN's output is not a view (the in-place ReLU after it
    copies no slices in the backward); outputs, gradients and running
    statistics equal the groups run one after the other."""
    torch.manual_seed(0)
    # float64: the comparison is not blurred by summation order
    layer = ConvModule(3, 4, 3, padding=1,
                       norm_cfg=dict(type='BN')).double()
    layer.bn.momentum = 0.3
    twin = ConvModule(3, 4, 3, padding=1, norm_cfg=dict(type='BN')).double()
    twin.load_state_dict(layer.state_dict())
    twin.bn.momentum = 0.3
    groups, x = 3, torch.randn(2 * 3, 3, 5, 6, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    with pff.grouped_batch_norm(layer, groups):
        out = layer(xa)
    assert 'CopySlices' not in _graph_names(out)
    xb = x.clone().requires_grad_()
    parts = [twin(xb[g::groups]) for g in range(groups)]
    ref = torch.stack(parts, 1).flatten(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    weight = torch.randn_like(out)
    out.backward(weight)
    ref.backward(weight)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    for a, b in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(layer.bn, name),
                                   getattr(twin.bn, name), rtol=1e-6,
                                   atol=1e-6)


def test_patch_layouts_shared_per_batch_and_released():
    """Aux nets at one stride share the cropped samples and image patches
    of a batch (made once); released, they are made anew."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    inputs = torch.randn(2, 3, 32, 48)
    samples = []
    for i in range(2):
        s = DetDataSample(metainfo=dict(img_shape=(32, 48),
                                        pad_shape=(32, 48)))
        s.gt_instances = InstanceData(
            bboxes=torch.tensor([[2., 3., 30., 20.], [20., 10., 44., 30.]]),
            labels=torch.tensor([i, 1]))
        samples.append(s)
    for shape in ((2, 4, 4, 6), (2, 4, 3, 6)):  # even; uneven (2 stacks)
        h1, h2 = torch.randn(shape), torch.randn(shape)
        a = pff.stack_patches(h1, inputs, samples, 2, 8, 'det', 'uneven')
        b = pff.stack_patches(h2, inputs, samples, 2, 8, 'det', 'uneven')
        for (ha, ia, sa, ga), (hb, ib, sb, gb) in zip(a, b):
            assert ia is ib and sa is sb and ga == gb
            assert not torch.equal(ha, hb)
        seq_a = list(pff.iter_patches(h1, inputs, samples, 2, 8, 'det',
                                      'uneven'))
        seq_b = list(pff.iter_patches(h2, inputs, samples, 2, 8, 'det',
                                      'uneven'))
        assert all(pa[2][0] is pb[2][0] for pa, pb in zip(seq_a, seq_b))
    pff.release_patch_layouts(inputs)
    c = pff.stack_patches(h1, inputs, samples, 2, 8, 'det', 'uneven')
    assert c[0][2] is not a[0][2]
    torch.testing.assert_close(c[0][1], a[0][1])
    pff.release_patch_layouts(inputs)
