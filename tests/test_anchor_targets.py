"""Batched anchor targets of the auxiliary detection head equal mmdet's
per-image ``get_targets`` and give the same losses and gradients."""
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from local_utils import HostReads, spy_anchor_target_passes
from mmlocal.models.local.heads import DetAuxHead
from mmlocal.models.local.heads.anchor_targets import (
    SharedAnchorTargets, anchor_targets, multi_anchor_targets,
    unsupported_reason)

NUM_CLASSES = 5
# padded batch 96 x 128; images smaller than the batch leave invalid anchors
SHAPES = [(96, 128), (80, 100), (64, 128)]


def _samples(num_boxes=(4, 0, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for (h, w), n in zip(SHAPES, num_boxes):
        bw = 6 + torch.rand(n, generator=g) * (w / 2)
        bh = 6 + torch.rand(n, generator=g) * (h / 2)
        x1 = torch.rand(n, generator=g) * (w - bw)
        y1 = torch.rand(n, generator=g) * (h - bh)
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)
        if n >= 3:
            boxes[2] = boxes[1]  # a duplicate box (ties in the IoU argmax)
        if n >= 4:
            boxes[3] = torch.tensor([1.0, 1.0, 3.0, 2.5])  # tiny box
        s = DetDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w),
                                        batch_input_shape=SHAPES[0],
                                        scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(
            bboxes=boxes,
            labels=torch.randint(0, NUM_CLASSES, (n, ), generator=g))
        samples.append(s)
    return samples


def _head(**kwargs):
    init_default_scope('mmdet')
    torch.manual_seed(0)
    return DetAuxHead(in_channels=8, stride=8, num_classes=NUM_CLASSES,
                      feat_channels=16, **kwargs)


ASSIGNERS = [
    {},
    dict(neg_iou_thr=(0.1, 0.4)),
    dict(gt_max_assign_all=False),
    dict(match_low_quality=False),
    dict(min_pos_iou=0.3, pos_iou_thr=0.6),
]


@pytest.mark.parametrize('assigner,num_boxes', [
    (a, (4, 0, 6)) for a in ASSIGNERS] + [({}, (4, 2, 6))])
@pytest.mark.parametrize('num_levels', [1, 3])
def test_targets_equal_mmdet(assigner, num_boxes, num_levels):
    train_cfg = dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5,
                      neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'), allowed_border=-1,
        pos_weight=-1 if num_levels == 1 else 2.0, debug=False)
    train_cfg['assigner'].update(assigner)
    aux = _head(num_levels=num_levels, train_cfg=train_cfg)
    head = aux.head
    assert unsupported_reason(head) is None
    # (4, 2, 6): every image has boxes (the all-background step skipped)
    samples = _samples(num_boxes)
    sizes = [(96 // s, 128 // s) for s in aux.strides]
    metas = [s.metainfo for s in samples]
    gts = [s.gt_instances for s in samples]

    anchor_list, valid_list = head.get_anchors(sizes, metas, device='cpu')
    ref = head.get_targets(anchor_list, valid_list, gts, metas)
    *ours, avg_factor = anchor_targets(head, sizes, gts, metas, 'cpu')
    labels, label_w, box_t, box_w = ours[1:]
    for lvl in range(num_levels):
        assert torch.equal(labels[lvl], ref[0][lvl])
        torch.testing.assert_close(label_w[lvl], ref[1][lvl], rtol=0, atol=0)
        torch.testing.assert_close(box_t[lvl], ref[2][lvl])
        torch.testing.assert_close(box_w[lvl], ref[3][lvl], rtol=0, atol=0)
        torch.testing.assert_close(ours[0][lvl][0], anchor_list[0][lvl])
    assert int(avg_factor) == ref[4]
    # the low-quality matching really was exercised
    assert sum(int((lb < NUM_CLASSES).sum()) for lb in labels) > 0


def test_loss_and_gradients_equal_mmdet():
    aux = _head(num_levels=2)
    assert aux.batched_targets
    samples = _samples(seed=1)
    y = torch.randn(3, 8, 12, 16, requires_grad=True)
    losses = aux.loss(y, None, samples)
    grads = torch.autograd.grad(sum(losses.values()), [y] + list(
        aux.parameters()))
    aux.batched_targets = False
    y2 = y.detach().clone().requires_grad_()
    ref = aux.loss(y2, None, samples)
    ref_grads = torch.autograd.grad(sum(ref.values()), [y2] + list(
        aux.parameters()))
    assert set(losses) == set(ref) == {'loss_cls', 'loss_bbox'}
    for k in ref:
        assert ref[k] > 0
        torch.testing.assert_close(losses[k], ref[k])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_no_positive_anchor_gives_zero_box_loss():
    aux = _head()
    samples = _samples(num_boxes=(0, 0, 0))
    losses = aux.loss(torch.randn(3, 8, 12, 16), None, samples)
    assert torch.isfinite(losses['loss_cls']) and losses['loss_cls'] > 0
    assert losses['loss_bbox'] == 0


def test_batched_targets_need_fewer_ops_and_syncs():
    aux = _head()
    y = torch.randn(3, 8, 12, 16)
    counts = {}
    for batched in (True, False):
        for boxes in (2, 8):
            aux.batched_targets = batched
            samples = _samples(num_boxes=(boxes, ) * 3)
            with torch.no_grad():
                aux.loss(y, None, samples)  # anchors of these shapes cached
            with torch.no_grad(), HostReads() as c:
                aux.loss(y, None, samples)
            counts[batched, boxes] = (c.ops, c.count)
    # mmdet: one sync per box and image (its low-quality loop) + nonzero's
    assert counts[False, 8][1] >= 3 * 8
    assert counts[False, 8][1] > counts[False, 2][1]
    # batched: a constant few, whatever the number of boxes (on the CPU
    # the focal loss's one_hot checks its range: 2; L1Loss's
    # any(weight > 0): 1)
    assert counts[True, 8] == counts[True, 2], counts
    assert counts[True, 8][1] <= 3, counts
    assert counts[True, 8][0] < counts[False, 8][0] / 2, counts


def test_unsupported_heads_fall_back_to_mmdet():
    aux = _head(head=dict(
        type='mmdet.RetinaHead', stacked_convs=1,
        anchor_generator=dict(type='mmdet.AnchorGenerator',
                              octave_base_scale=4, scales_per_octave=1,
                              ratios=[1.0]),
        bbox_coder=dict(type='mmdet.DeltaXYWHBBoxCoder'),
        reg_decoded_bbox=True,
        loss_bbox=dict(type='mmdet.GIoULoss')))
    assert not aux.batched_targets
    assert 'reg_decoded_bbox' in aux.batched_targets_unsupported
    losses = aux.loss(torch.randn(3, 8, 12, 16), None, _samples())
    assert all(torch.isfinite(v) for v in losses.values())
    # and the option turns the batched path off
    assert not _head(batched_targets=False).batched_targets


def test_anchors_cached_per_shape():
    aux = _head()
    y = torch.randn(3, 8, 12, 16)
    samples = _samples()
    aux.loss(y, None, samples)
    cache = aux._anchor_cache
    # one anchor set, one valid-flag set per distinct pad shape (3 here)
    # and their stack for this batch (and the box index of assign)
    shaped = [k for k in cache if k[0] != 'box index']
    assert len(shaped) == 1 + len(SHAPES) + 1
    first = dict(cache)
    aux.loss(y, None, samples)
    assert all(cache[k] is v for k, v in first.items())  # reused
    aux.loss(torch.randn(3, 8, 10, 16), None, samples)  # other feature size
    shaped = [k for k in cache if k[0] != 'box index']
    assert len(shaped) == 2 * (1 + len(SHAPES) + 1)
    for _ in range(20):  # bounded
        aux.loss(torch.randn(1, 8, 4 + _, 16), None, samples[:1])
    assert len(cache) <= 32


# -- several heads in one pass (multi_anchor_targets, SharedAnchorTargets)

def _aux_heads(train_cfg=None, style='mmlocal'):
    """Aux heads of a K=5 learner: strides 8, 16, 32 (three levels) and a
    second stride-16 head (same anchors as the first)."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    kwargs = dict(num_classes=NUM_CLASSES, style=style)
    if train_cfg is not None:
        kwargs['train_cfg'] = train_cfg
    if style == 'mmlocal':
        kwargs['feat_channels'] = 16
    return [
        DetAuxHead(8, stride, num_levels=levels, **kwargs)
        for stride, levels in ((8, 1), (16, 1), (32, 3), (16, 1))
    ]


def _sizes(aux):
    return [(-(-96 // s), -(-128 // s)) for s in aux.strides]


@pytest.mark.parametrize('assigner', ASSIGNERS)
def test_multi_head_targets_equal_mmdet_per_head(assigner):
    """One pass for heads with different anchors gives each head mmdet's
    own targets (low-quality matches among its own anchors, its own
    avg_factor), in the per-level layout mmdet's loss reads."""
    train_cfg = dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5,
                      neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'), allowed_border=-1,
        pos_weight=-1, debug=False)
    train_cfg['assigner'].update(assigner)
    heads = _aux_heads(train_cfg)
    samples = _samples()
    metas = [s.metainfo for s in samples]
    gts = [s.gt_instances for s in samples]
    results = multi_anchor_targets([(a.head, _sizes(a)) for a in heads], gts,
                                   metas, 'cpu')
    for aux, ours in zip(heads, results):
        sizes = _sizes(aux)
        anchor_list, valid_list = aux.head.get_anchors(sizes, metas, 'cpu')
        ref = aux.head.get_targets(anchor_list, valid_list, gts, metas)
        for lvl in range(len(sizes)):
            for kind in range(4):
                assert ours[kind + 1][lvl].is_contiguous()
                torch.testing.assert_close(ours[kind + 1][lvl],
                                           ref[kind][lvl], rtol=0, atol=0)
            torch.testing.assert_close(ours[0][lvl][0], anchor_list[0][lvl])
        assert int(ours[5]) == ref[4]
    # the heads really differ in their positives
    positives = [sum(int((lb < NUM_CLASSES).sum()) for lb in r[1])
                 for r in results]
    assert len(set(positives[:3])) > 1 and positives[1] == positives[3]


def test_multi_head_targets_refuse_different_assigners():
    heads = _aux_heads()
    heads[1].head.assigner.pos_iou_thr = 0.6
    with pytest.raises(ValueError, match='target_signature'):
        multi_anchor_targets(
            [(a.head, _sizes(a)) for a in _aux_heads()[:1]] +
            [(heads[1].head, _sizes(heads[1]))], [
                s.gt_instances for s in _samples()
            ], [s.metainfo for s in _samples()], 'cpu')


def test_shared_targets_one_pass_and_fallbacks(monkeypatch):
    """The first head of a batch computes every head's targets; a head
    whose sizes differ from the prediction, or that asks for other
    samples, is not served (it computes its own)."""
    calls = spy_anchor_target_passes(monkeypatch)
    heads = _aux_heads()
    group = SharedAnchorTargets(heads)
    samples = _samples()
    group.begin(samples)
    got = [group.targets(a, _sizes(a), samples, 'cpu') for a in heads]
    assert calls == [4] and all(g is not None for g in got)
    # the aux heads take weights divided by their normaliser
    assert all(a.normalised_targets for a in heads)
    alone = anchor_targets(heads[2].head, _sizes(heads[2]),
                           [s.gt_instances for s in samples],
                           [s.metainfo for s in samples], 'cpu',
                           normalise=True)
    assert got[2][5] is None and alone[5] is None
    for kind in range(1, 5):
        for a, b in zip(got[2][kind], alone[kind]):
            assert torch.equal(a, b)
    assert group.targets(heads[0], [(7, 9)], samples, 'cpu') is None
    assert group.targets(heads[0], _sizes(heads[0]), list(samples),
                         'cpu') is None
    group.release()
    assert group.targets(heads[0], _sizes(heads[0]), samples, 'cpu') is None
    assert calls == [4, 1]  # + the explicit anchor_targets above
    # a copy shares nothing (its heads compute their own targets)
    import copy
    assert len(copy.deepcopy(group)) == 0


def test_learner_step_same_with_shared_targets(monkeypatch):
    """A LocalLearner step with one target pass for all aux heads leaves
    exactly the losses and gradients of one pass per head."""
    from mmengine.optim import OptimWrapper  # noqa: F401
    from local_utils import (TINY_RETINANET, KeepGradsOptimWrapper,
                             assert_same_step, det_batch, grads, small_aux)
    from mmlocal.models.local.learner import LocalLearner
    calls = spy_anchor_target_passes(monkeypatch)
    runs = []
    for share in (True, False):
        init_default_scope('mmdet')
        torch.manual_seed(0)
        learner = LocalLearner(TINY_RETINANET, num_modules=4,
                               aux=small_aux())
        if not share:
            learner._shared_targets = SharedAnchorTargets()
        ow = KeepGradsOptimWrapper(
            torch.optim.SGD(learner.parameters(), lr=0.))
        calls.clear()
        logs = learner.train_step(det_batch(seed=3), ow)
        runs.append((logs, grads(learner), list(calls)))
    assert runs[0][2] == [3] and runs[1][2] == [1, 1, 1], runs[0][2]
    assert_same_step(runs[0][0], runs[0][1], runs[1][0], runs[1][1],
                     rtol=0, atol=0)
