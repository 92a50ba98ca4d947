"""tools/device/mmcv_ext_stub.py (mmcv ops in PyTorch, for measurement
machines without a compiled mmcv) against mmdet's focal loss and mmcv's own
compiled CPU ops."""
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmcv.ops import RoIAlign, nms
from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    'mmcv_ext_stub', osp.join(REPO, 'tools', 'device', 'mmcv_ext_stub.py'))
stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stub)


def test_sigmoid_focal_loss_matches_mmdet_python_loss():
    torch.manual_seed(0)
    # more rows than one chunk; label C = background
    x = torch.randn(stub._CHUNK + 123, 5, dtype=torch.float64,
                    requires_grad=True)
    t = torch.randint(0, 6, (x.size(0), ))
    ref = py_sigmoid_focal_loss(x, F.one_hot(t, 6)[:, :5].to(x), None,
                                gamma=2.0, alpha=0.25, reduction='none')
    grad_out = torch.rand_like(ref)
    ref_grad, = torch.autograd.grad(ref, x, grad_out)
    out = torch.zeros_like(x)
    stub.sigmoid_focal_loss_forward(x.detach(), t, x.new_empty(0), out,
                                    gamma=2.0, alpha=0.25)
    grad = torch.zeros_like(x)
    stub.sigmoid_focal_loss_backward(x.detach(), t, x.new_empty(0), grad,
                                     gamma=2.0, alpha=0.25)
    # the stub computes in float32, as mmcv's kernel for float inputs
    assert torch.allclose(out, ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad * grad_out, ref_grad, rtol=1e-4, atol=1e-6)


def test_nms_and_roi_align_match_mmcv():
    torch.manual_seed(0)
    boxes = torch.rand(60, 4) * 50
    boxes[:, 2:] += boxes[:, :2] + 1
    scores = torch.rand(60)
    _, keep = nms(boxes, scores, 0.5)
    assert torch.equal(stub.nms(boxes, scores, iou_threshold=0.5), keep)

    x = torch.randn(2, 4, 20, 24, requires_grad=True)
    rois = torch.cat([
        torch.randint(0, 2, (10, 1)).float(),
        torch.rand(10, 2) * 40,
        torch.rand(10, 2) * 40 + 45
    ], 1)
    op = RoIAlign(7, spatial_scale=0.5, sampling_ratio=0, aligned=True)
    ref = op(x, rois)
    g = torch.rand_like(ref)
    ref_grad, = torch.autograd.grad(ref, x, g)
    out = ref.new_zeros(ref.shape)
    stub.roi_align_forward(x.detach(), rois, out, None, None, 7, 7, 0.5, 0,
                           1, True)
    grad = torch.zeros_like(x)
    stub.roi_align_backward(g, rois, None, None, grad, 7, 7, 0.5, 0, 1,
                            True)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_other_ops_raise_when_called():
    with pytest.raises(NotImplementedError, match='deform_conv_forward'):
        stub.deform_conv_forward()
    assert not hasattr(stub, '__path__')  # not mistaken for a package
