"""AIoULoss: hand-computed values, its CIoU/EIoU limits, mmdet's loss
semantics, the alpha schedule and bad arguments."""
import math

import pytest
import torch
from mmdet.models.losses import CIoULoss
from mmdet.structures.bbox import bbox_overlaps
from mmengine.logging import MessageHub

from mmlocal.models.losses import AIoULoss

V_FACTOR = 4 / math.pi**2


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# (pred, target, CIoU loss, EIoU loss), worked out by hand (see comments);
# IoU = I/U, c^2 = enclosing diagonal^2, rho^2 = centre distance^2.
CASES = {
    # identical boxes: IoU = 1 and every penalty 0
    'identical': ((0, 0, 10, 10), (0, 0, 10, 10), 0.0, 0.0),
    # nested, same centre: IoU = 36/100; squares so v = 0;
    # EIoU adds (10-6)^2/10^2 for w and for h
    'nested': ((0, 0, 10, 10), (2, 2, 8, 8), 1 - 0.36, 1 - 0.36 + 0.32),
    # disjoint, side by side: IoU = 0, enclosing 6x2 -> c^2 = 40,
    # rho^2 = (5-1)^2 = 16; equal sizes
    'disjoint': ((0, 0, 2, 2), (4, 0, 6, 2), 1 + 16 / 40, 1 + 16 / 40),
    # transposed 4x2 vs 2x4: IoU = 4/12, c^2 = 32, rho^2 = 2; IoU <= 0.5
    # so CIoU's aspect term is off; EIoU: (4-2)^2/16 twice
    'transposed':
    ((0, 0, 4, 2), (0, 0, 2, 4), 1 - 1 / 3 + 2 / 32, 1 - 1 / 3 + 2 / 32 + 0.5),
    # 10x8 vs 10x10: IoU = 0.8, c^2 = 200, rho^2 = 1,
    # v = 4/pi^2 (atan 1 - atan 1.25)^2, a = v / (0.2 + v); EIoU: 2^2/10^2
    'aspect': ((0, 0, 10, 8), (0, 0, 10, 10), None, 1 - 0.8 + 1 / 200 + 0.04),
    # zero-area prediction at the target's centre: IoU = 0, rho = 0,
    # c^2 = 200; EIoU: 10^2/10^2 for w and for h
    'zero_area_pred': ((5, 5, 5, 5), (0, 0, 10, 10), 1.0, 3.0),
    # both boxes empty and equal: only 1 - IoU = 1 is left
    'both_empty': ((3, 3, 3, 3), (3, 3, 3, 3), 1.0, 1.0),
}
_V = V_FACTOR * (math.atan(1.0) - math.atan(1.25))**2
CASES['aspect'] = CASES['aspect'][:2] + (
    1 - 0.8 + 1 / 200 + _V / (0.2 + _V) * _V, ) + CASES['aspect'][3:]


@pytest.mark.parametrize('name', sorted(CASES))
def test_hand_computed_values(name):
    pred, target, ciou, eiou = CASES[name]
    pred, target = _boxes(pred), _boxes(target)
    for alpha in (0.0, 0.3, 1.0):
        loss = AIoULoss(alpha=alpha, reduction='none', eps=1e-9)(pred, target)
        expected = alpha * ciou + (1 - alpha) * eiou
        assert loss.item() == pytest.approx(expected, abs=1e-6), (name, alpha)


def test_ciou_aspect_term_without_gate():
    # 'transposed' with the YOLOv8 CIoU (no IoU gate): a = v / (1 - IoU + v)
    v = V_FACTOR * (math.atan(0.5) - math.atan(2.0))**2
    expected = 1 - 1 / 3 + 2 / 32 + v / (2 / 3 + v) * v
    loss = AIoULoss(
        alpha=1.0, ciou_iou_thr=None, reduction='none', eps=1e-9)(_boxes(
            (0, 0, 4, 2)), _boxes((0, 0, 2, 4)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def _random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], 1)


def _random_pairs(n=64, seed=0):
    target = _random_boxes(n, seed)
    # half the predictions near their targets (IoU > 0.5), half anywhere
    near = target[:n // 2] + torch.randn(
        n // 2, 4, generator=torch.Generator().manual_seed(seed + 1)) * 2
    near = torch.cat([near[:, :2], torch.max(near[:, 2:], near[:, :2] + 1)], 1)
    pred = torch.cat([near, _random_boxes(n - n // 2, seed + 2)])
    return pred, target


def test_alpha_one_is_mmdet_ciou():
    pred, target = _random_pairs()
    ours = AIoULoss(alpha=1.0, reduction='none')(pred, target)
    mmdet = CIoULoss(reduction='none')(pred, target)
    torch.testing.assert_close(ours, mmdet, rtol=1e-5, atol=1e-5)
    # the same reductions and weighting
    w = torch.rand(len(pred))
    torch.testing.assert_close(
        AIoULoss(alpha=1.0, loss_weight=2.)(pred, target, w, avg_factor=7.),
        CIoULoss(loss_weight=2.)(pred, target, w, avg_factor=7.))


def _eiou(pred, target, eps=1e-6):
    """EIoU = 1 - IoU + rho^2/c^2 + (w-w')^2/Cw^2 + (h-h')^2/Ch^2."""
    w1, h1 = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]
    w2, h2 = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    iw = (torch.min(pred[:, 2], target[:, 2]) -
          torch.max(pred[:, 0], target[:, 0])).clamp(min=0)
    ih = (torch.min(pred[:, 3], target[:, 3]) -
          torch.max(pred[:, 1], target[:, 1])).clamp(min=0)
    inter = iw * ih
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    cw = torch.max(pred[:, 2], target[:, 2]) - torch.min(
        pred[:, 0], target[:, 0])
    ch = torch.max(pred[:, 3], target[:, 3]) - torch.min(
        pred[:, 1], target[:, 1])
    dx = (pred[:, 0] + pred[:, 2] - target[:, 0] - target[:, 2]) / 2
    dy = (pred[:, 1] + pred[:, 3] - target[:, 1] - target[:, 3]) / 2
    return (1 - iou + (dx**2 + dy**2) / (cw**2 + ch**2 + eps) + (w1 - w2)**2 /
            (cw**2 + eps) + (h1 - h2)**2 / (ch**2 + eps))


def test_alpha_zero_is_eiou_and_gamma_is_focal():
    pred, target = _random_pairs(seed=3)
    eiou = _eiou(pred, target)
    torch.testing.assert_close(
        AIoULoss(alpha=0.0, reduction='none')(pred, target), eiou)
    # Focal-EIoU: IoU^gamma * L_EIoU
    iou = bbox_overlaps(pred, target, is_aligned=True, eps=1e-6)
    torch.testing.assert_close(
        AIoULoss(alpha=0.0, gamma=0.5, reduction='none')(pred, target),
        iou.pow(0.5) * eiou)


@pytest.mark.parametrize('ciou_iou_thr', [0.5, None])
@pytest.mark.parametrize('gamma', [0.0, 0.5])
def test_gradients_finite(ciou_iou_thr, gamma):
    rows = [CASES[k][:2] for k in sorted(CASES)]
    pred = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    target = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    # large identical boxes: mmdet's CIoULoss returns NaN here in float32
    pred = torch.cat([pred, torch.tensor([[10., 10., 610., 410.]])])
    target = torch.cat([target, torch.tensor([[10., 10., 610., 410.]])])
    pred.requires_grad_(True)
    loss_fn = AIoULoss(
        gamma=gamma, ciou_iou_thr=ciou_iou_thr, reduction='none')
    loss = loss_fn(pred, target)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all(), pred.grad
    # the disjoint prediction's right side is pulled towards its target
    # (with gamma > 0 the focal weight IoU^gamma = 0 silences it)
    grad_x2 = pred.grad[sorted(CASES).index('disjoint'), 2]
    assert grad_x2 < 0 if gamma == 0 else grad_x2 == 0


def test_reduction_weight_and_avg_factor():
    pred, target = _random_pairs(n=10, seed=5)
    weight = torch.rand(10)
    loss_fn = AIoULoss(alpha=0.3, loss_weight=2.0)
    per_box = AIoULoss(alpha=0.3, reduction='none')(pred, target)
    torch.testing.assert_close(loss_fn(pred, target), 2 * per_box.mean())
    torch.testing.assert_close(
        loss_fn(pred, target, reduction_override='sum'), 2 * per_box.sum())
    torch.testing.assert_close(
        loss_fn(pred, target, weight), 2 * (per_box * weight).mean())
    torch.testing.assert_close(
        loss_fn(pred, target, weight, avg_factor=3.0),
        2 * (per_box * weight).sum() / 3.0)
    torch.testing.assert_close(
        loss_fn(pred, target, weight, reduction_override='none'),
        2 * per_box * weight)
    # (n, 4) weights are averaged over the box sides, as in mmdet
    torch.testing.assert_close(
        loss_fn(pred, target, weight[:, None].expand(-1, 4).contiguous()),
        loss_fn(pred, target, weight))
    # all-zero weights: zero loss that still reaches pred in the graph
    pred.requires_grad_(True)
    zero = loss_fn(pred, target, torch.zeros(10))
    assert zero.item() == 0 and zero.requires_grad
    with pytest.raises(ValueError, match='avg_factor'):
        loss_fn(pred, target, avg_factor=2.0, reduction_override='sum')
    with pytest.raises(ValueError, match='reduction_override'):
        loss_fn(pred, target, reduction_override='max')


def test_scheduled_alpha_follows_the_iteration():
    hub = MessageHub.get_instance('test_aiou_schedule')
    assert MessageHub.get_current_instance() is hub
    loss_fn = AIoULoss(
        alpha=dict(start=1.0, end=0.5, iters=100), reduction='none')
    pred, target = _random_pairs(n=8, seed=7)
    for it, alpha in ((0, 1.0), (50, 0.75), (100, 0.5), (250, 0.5)):
        hub.update_info('iter', it)
        assert loss_fn.current_alpha() == pytest.approx(alpha)
        torch.testing.assert_close(
            loss_fn(pred, target),
            AIoULoss(alpha=alpha, reduction='none')(pred, target))


@pytest.mark.parametrize('kwargs, option', [
    (dict(alpha=1.5), 'alpha'),
    (dict(alpha='ciou'), 'alpha'),
    (dict(alpha=dict(start=1.0, end=0.5)), 'alpha'),
    (dict(alpha=dict(start=1.0, end=2.0, iters=10)), 'alpha.end'),
    (dict(alpha=dict(start=1.0, end=0.5, iters=0)), 'alpha.iters'),
    (dict(gamma=-1), 'gamma'),
    (dict(ciou_iou_thr=2.0), 'ciou_iou_thr'),
    (dict(reduction='max'), 'reduction'),
    (dict(eps=0), 'eps'),
])
def test_bad_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        AIoULoss(**kwargs)
