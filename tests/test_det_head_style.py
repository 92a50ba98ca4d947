"""DetAuxHead(style='reference'): the auxiliary head of MAN++'s COCO
RetinaNet (JunhaoSu0/MAN_PlusPlus, Exp_on_COCO/networks/retinanet.py)."""
import math

import pytest
import torch
from mmengine.registry import init_default_scope

from mmlocal.models.local.heads import DetAuxHead
from test_anchor_targets import NUM_CLASSES, _samples


def _ref_head(stride=32, **kwargs):
    init_default_scope('mmdet')
    torch.manual_seed(0)
    return DetAuxHead(8, stride, NUM_CLASSES, style='reference', **kwargs)


def _reference_anchors(height, width, stride):
    """The reference's anchors at one level, from its description: size
    4 x stride, scales 2^(0, 1/3, 2/3), ratios (h/w) 0.5, 1, 2 (ratio-major),
    centred in each cell, cells row-major, 9 per cell."""
    size = 4 * stride
    base = []
    for ratio in (0.5, 1.0, 2.0):
        for scale in (1.0, 2**(1 / 3), 2**(2 / 3)):
            h = size * scale * math.sqrt(ratio)
            w = size * scale / math.sqrt(ratio)
            base.append([-w / 2, -h / 2, w / 2, h / 2])
    base = torch.tensor(base)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width),
                            indexing='ij')
    cx = (xs.reshape(-1).float() + 0.5) * stride
    cy = (ys.reshape(-1).float() + 0.5) * stride
    shifts = torch.stack([cx, cy, cx, cy], dim=1)
    return (shifts[:, None] + base[None]).reshape(-1, 4)


def test_reference_style_settings():
    aux = _ref_head()
    head = aux.head
    # P5-P7 for the stride-32 module, one level for the others
    assert aux.strides == [32, 64, 128]
    assert _ref_head(stride=16).strides == [16]
    assert head.num_base_priors == 9 and head.feat_channels == 256
    assert not aux.input_proj.with_norm and aux.input_proj.with_bias
    assert type(head.loss_bbox).__name__ == 'SyncFreeSmoothL1Loss'
    assert head.loss_bbox.beta == 1.0
    assert not head.assigner.match_low_quality
    assert head.assigner.pos_iou_thr == 0.5
    assert head.assigner.neg_iou_thr == 0.4
    assert aux.batched_targets
    # normal(0, 0.01) projection (reference init), not kaiming
    assert abs(aux.input_proj.conv.weight.std().item() - 0.01) < 2e-3
    for height, width, stride in ((3, 4, 32), (2, 2, 64), (1, 1, 128)):
        ours = head.prior_generator.single_level_grid_priors(
            (height, width), aux.strides.index(stride), device='cpu')
        torch.testing.assert_close(
            ours, _reference_anchors(height, width, stride))


def test_reference_levels_relu_before_conv():
    """Level l+1 = conv(ReLU(level l)): the levels after the first are not
    rectified; the first (1x1 conv + ReLU) is."""
    aux = _ref_head()
    feats = aux(torch.randn(2, 8, 3, 4))
    assert [f.shape[-2:] for f in feats] == [(3, 4), (2, 2), (1, 1)]
    assert feats[0].min() >= 0
    assert feats[1].min() < 0
    torch.testing.assert_close(
        feats[1], aux.level_convs[0].conv(feats[0].relu()))


def test_reference_loss_equals_mmdet_path():
    aux = _ref_head(stride=8, num_levels={8: 2})  # anchors 32-80 px
    samples = _samples(seed=2)
    y = torch.randn(3, 8, 12, 16, requires_grad=True)
    losses = aux.loss(y, None, samples)
    grads = torch.autograd.grad(sum(losses.values()), [y] + list(
        aux.parameters()))
    aux.batched_targets = False
    y2 = y.detach().clone().requires_grad_()
    ref = aux.loss(y2, None, samples)
    ref_grads = torch.autograd.grad(sum(ref.values()), [y2] + list(
        aux.parameters()))
    for k in ref:
        assert ref[k] > 0
        torch.testing.assert_close(losses[k], ref[k])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_explicit_arguments_override_the_style():
    aux = _ref_head(feat_channels=64, num_levels=1,
                    norm_cfg=dict(type='BN'))
    assert aux.head.feat_channels == 64 and aux.strides == [32]
    assert aux.input_proj.with_norm
    default = DetAuxHead(8, 32, NUM_CLASSES)
    assert default.head.num_base_priors == 3 and default.strides == [32]
    assert default.head.assigner.match_low_quality
    assert DetAuxHead(8, 16, NUM_CLASSES, num_levels={'16': 2}).strides == [
        16, 32]
    with pytest.raises(ValueError, match='style'):
        DetAuxHead(8, 32, NUM_CLASSES, style='paper')
    with pytest.raises(ValueError, match='num_levels'):
        DetAuxHead(8, 32, NUM_CLASSES, num_levels={32: 0})
    with pytest.raises(ValueError, match='num_levels'):
        DetAuxHead(8, 32, NUM_CLASSES, num_levels=0)
