"""The sync-free twins of mmdet's L1/smooth L1 and mmseg's cross-entropy
equal the stock losses (values, gradients) without host reads, and a local
step adds no host read to the plain model's besides the NaN guard's one."""
import os.path as osp
import sys

import pytest
import torch
from mmdet.models.losses import L1Loss, SmoothL1Loss
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from mmseg.models.losses import CrossEntropyLoss

from local_utils import (TINY_FCN, TINY_RETINANET, HostReads, det_batch,
                         seg_batch, small_aux)
from mmlocal.models.losses.sync_free_losses import (
    FusedFocalLoss, SyncFreeCrossEntropyLoss, SyncFreeL1Loss,
    SyncFreeSmoothL1Loss, sync_free_loss)
from mmlocal.registry import MODELS
from conftest import REPO
from test_local_learner import build

sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
from cuda_like_focal_loss import cuda_like_focal_loss  # noqa: E402


def _run(loss, *args, **kwargs):
    """(value, grad of the prediction, host reads) of one call."""
    pred = args[0].detach().clone().requires_grad_()
    with HostReads() as reads:
        value = loss(pred, *args[1:], **kwargs)
    value.sum().backward()
    return value.detach(), pred.grad, reads.count


def _box_args(positives, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(40, 4, generator=g), torch.randn(
        40, 4, generator=g)
    weight = torch.zeros(40, 4)
    weight[:positives] = 1.
    return pred, target, weight


BOX = [(L1Loss(loss_weight=2.0), SyncFreeL1Loss(loss_weight=2.0)),
       (SmoothL1Loss(beta=0.5, loss_weight=1.5),
        SyncFreeSmoothL1Loss(beta=0.5, loss_weight=1.5))]


@pytest.mark.parametrize('stock,twin', BOX)
@pytest.mark.parametrize('positives', [0, 1, 7])
@pytest.mark.parametrize('avg_factor', [None, 7, 'tensor'])
@pytest.mark.parametrize('reduction', [None, 'sum', 'none'])
def test_box_losses_equal_mmdet(stock, twin, positives, avg_factor,
                                reduction):
    if avg_factor == 'tensor':
        avg_factor = torch.tensor(7.)
    args = _box_args(positives)
    kwargs = dict(weight=args[2], avg_factor=avg_factor,
                  reduction_override=reduction)
    if avg_factor is not None and reduction == 'sum' and positives:
        # mmdet refuses avg_factor with a sum (its shortcut returns 0
        # when no weight is positive): the twin is mmdet there
        for loss in (stock, twin):
            with pytest.raises(ValueError, match='avg_factor'):
                _run(loss, *args[:2], **kwargs)
        return
    value, grad, reads = _run(twin, *args[:2], **kwargs)
    want_value, want_grad, stock_reads = _run(stock, *args[:2], **kwargs)
    if reduction == 'none' and positives == 0:
        # mmdet's scalar shortcut, kept
        assert value.shape == want_value.shape == ()
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    assert stock_reads >= 1
    stock_path = reduction == 'none' or (reduction == 'sum'
                                         and avg_factor is not None)
    assert reads == (stock_reads if stock_path else 0)


def _seg_args(ignore_all=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 8, generator=g)
    label = torch.randint(0, 4, (2, 6, 8), generator=g)
    label[0, :3] = 255
    if ignore_all:
        label[:] = 255
    return logits, label


@pytest.mark.parametrize('avg_non_ignore', [True, False])
@pytest.mark.parametrize('ignore_all', [False, True])
@pytest.mark.parametrize('pixel_weight', [False, True])
def test_cross_entropy_equals_mmseg(avg_non_ignore, ignore_all,
                                    pixel_weight):
    stock = CrossEntropyLoss(avg_non_ignore=avg_non_ignore, loss_weight=0.7)
    twin = sync_free_loss(stock)
    assert type(twin) is SyncFreeCrossEntropyLoss
    logits, label = _seg_args(ignore_all)
    weight = torch.rand(label.shape) if pixel_weight else None
    kwargs = dict(weight=weight, ignore_index=255)
    value, grad, reads = _run(twin, logits, label, **kwargs)
    want_value, want_grad, stock_reads = _run(stock, logits, label, **kwargs)
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    assert torch.isfinite(value)
    assert reads == 0 and stock_reads == (1 if avg_non_ignore else 0)


def test_twins_keep_settings_and_leave_other_losses():
    ce = CrossEntropyLoss(class_weight=[1., 2., 1., 1.], avg_non_ignore=True,
                          loss_name='loss_x', loss_weight=0.3)
    twin = sync_free_loss(ce)
    assert (twin.class_weight, twin.loss_name, twin.loss_weight,
            twin.avg_non_ignore) == ([1., 2., 1., 1.], 'loss_x', 0.3, True)
    logits, label = _seg_args()
    label = label.clamp(max=3)  # mmseg's class-weight path indexes by label
    # class weights: mmseg's own path (and its value)
    torch.testing.assert_close(
        twin(logits, label, ignore_index=255),
        ce(logits, label, ignore_index=255), rtol=0, atol=0)
    smooth = sync_free_loss(SmoothL1Loss(beta=0.25, reduction='sum'))
    assert (type(smooth), smooth.beta, smooth.reduction) == (
        SyncFreeSmoothL1Loss, 0.25, 'sum')
    from mmdet.models.losses import GIoULoss
    giou = GIoULoss()
    assert sync_free_loss(giou) is giou
    with DefaultScope.overwrite_default_scope('mmlocal'):
        built = MODELS.build(dict(type='mmlocal.SyncFreeL1Loss',
                                  loss_weight=0.5))
    assert isinstance(built, SyncFreeL1Loss) and built.loss_weight == 0.5


def _host_reads_of_step(model, batch):
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    model.train_step(batch, ow)  # first step: lazy state, calibrations
    with HostReads() as reads:
        model.train_step(batch, ow)
    return reads.count


@pytest.mark.parametrize('task', ['det', 'seg'])
@pytest.mark.parametrize('aux', ['mmlocal.MomentumAux', 'mmlocal.HPFFAux'])
def test_local_step_adds_one_host_read_to_the_plain_model(task, aux):
    """The aux heads of modules 0..K-2 read nothing on the host; the NaN
    guard reads its flags once (nan_guard_check='step'). The focal loss
    takes its CUDA branch (mmdet's CPU branch reads labels in one_hot)."""
    model, batch = (TINY_RETINANET, det_batch(size=96)) if task == 'det' \
        else (TINY_FCN, seg_batch(size=64))
    scope = 'mmdet' if task == 'det' else 'mmseg'
    extra = dict(patch_grid=2) if aux.endswith('HPFFAux') else {}
    learner = build(model, scope=scope, num_modules=3,
                    aux=small_aux(aux, **extra))
    with cuda_like_focal_loss():
        local = _host_reads_of_step(learner, batch)
        plain = _host_reads_of_step(learner.model, batch)
    assert local == plain + 1, (local, plain)


def test_aux_heads_use_the_twins():
    from mmlocal.models.local.heads import DetAuxHead, SegAuxHead
    with DefaultScope.overwrite_default_scope('mmlocal'):
        seg = SegAuxHead(8, 3, channels=8)
        both = SegAuxHead(8, 3, channels=8, head=dict(loss_decode=[
            dict(type='mmseg.CrossEntropyLoss', avg_non_ignore=True),
            dict(type='mmseg.DiceLoss')
        ]))
        det = DetAuxHead(8, 8, 3, feat_channels=8)
        # a head without a box loss module builds as before
        DetAuxHead(8, 8, 3, feat_channels=8,
                   head=dict(type='mmdet.CenterNetHead'))
    assert type(seg.head.loss_decode) is SyncFreeCrossEntropyLoss
    assert [type(m).__name__ for m in both.head.loss_decode] == [
        'SyncFreeCrossEntropyLoss', 'DiceLoss'
    ]
    assert type(det.head.loss_bbox) is SyncFreeL1Loss
    assert type(det.head.loss_cls) is FusedFocalLoss and det.normalised_targets


@pytest.fixture
def cpu_focal_kernel(monkeypatch):
    """mmcv's fused focal-loss kernels on the CPU (the stand-in of
    tools/device/mmcv_ext_stub.py), taken by FusedFocalLoss as on CUDA."""
    from mmlocal.models.losses import sync_free_losses
    calls = []
    real = sync_free_losses.WeightedFocalSum.apply

    def apply(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sync_free_losses, 'focal_kernel_runs',
                        lambda pred: True)
    monkeypatch.setattr(sync_free_losses.WeightedFocalSum, 'apply', apply)
    with cuda_like_focal_loss(True):
        yield calls


@pytest.mark.parametrize('loss_weight', [1.0, 2.0])
def test_fused_focal_sum_equals_mmdet_mean(cpu_focal_kernel, loss_weight):
    """mmcv's kernels + one weighted sum, with weights divided by
    avg_factor + eps, give mmdet's mean over avg_factor (CPU path)."""
    from mmdet.models.losses import FocalLoss
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(500, 6, generator=g)
    target = torch.randint(0, 7, (500, ), generator=g)  # 6: background
    weight = (torch.rand(500, generator=g) > 0.2).float()
    avg = torch.tensor(37.)
    eps = torch.finfo(torch.float32).eps
    fused = FusedFocalLoss(loss_weight=loss_weight)
    value, grad, _ = _run(fused, pred, target, weight / (avg + eps),
                          reduction_override='sum')
    assert cpu_focal_kernel == [1]
    with cuda_like_focal_loss(False):  # mmdet's own CPU path
        ref, ref_grad, _ = _run(FocalLoss(loss_weight=loss_weight), pred,
                                target, weight, avg_factor=avg)
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    # any other call is mmdet's
    fused(pred, target, weight, avg_factor=avg)
    assert cpu_focal_kernel == [1]


@pytest.mark.parametrize('style,levels', [('mmlocal', 2), ('reference', 1)])
def test_aux_head_fused_losses_equal_mmdet(cpu_focal_kernel, style, levels):
    """DetAuxHead's normalised targets, summed by the fused focal loss and
    the box loss, give mmdet's losses and gradients (1e-6)."""
    from mmengine.registry import init_default_scope
    from mmlocal.models.local.heads import DetAuxHead
    from test_anchor_targets import NUM_CLASSES, _samples
    init_default_scope('mmdet')
    torch.manual_seed(0)
    aux = DetAuxHead(in_channels=8, stride=8, num_classes=NUM_CLASSES,
                     feat_channels=16, style=style, num_levels=levels)
    assert aux.normalised_targets
    samples = _samples(seed=1)
    y = torch.randn(3, 8, 12, 16)
    results = []
    for batched in (True, False):
        aux.batched_targets = batched
        x = y.clone().requires_grad_()
        if batched:
            losses = aux.loss(x, None, samples)
        else:  # mmdet's loss_by_feat, its own CPU focal loss
            with cuda_like_focal_loss(False):
                losses = aux.loss(x, None, samples)
        total = sum(losses.values())
        results.append((losses, torch.autograd.grad(
            total, [x] + list(aux.parameters()))))
    assert len(cpu_focal_kernel) == len(aux.strides)
    (losses, grads), (ref, ref_grads) = results
    for k in ('loss_cls', 'loss_bbox'):
        assert ref[k] > 0
        torch.testing.assert_close(losses[k], ref[k], rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
