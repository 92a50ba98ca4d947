"""tools/analysis/cuda_like_focal_loss.py: the CPU focal loss keeps what
mmcv's CUDA op keeps, with the same values and gradients."""
import os.path as osp
import sys

import pytest
import torch
from mmdet.models.losses import FocalLoss

from conftest import REPO

sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
from cuda_like_focal_loss import cuda_like_focal_loss  # noqa: E402


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize('weighted', [False, True])
def test_same_loss_and_gradient_less_saved(weighted):
    g = torch.Generator().manual_seed(0)
    n, c = 3000, 20
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c + 1, (n, ), generator=g)  # c: background
    weight = torch.rand(n, generator=g) if weighted else None
    loss_fn = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25)
    results = []
    for cuda_like in (False, True):
        x = logits.clone().requires_grad_()
        with cuda_like_focal_loss(cuda_like):
            loss, saved = _saved_bytes(
                lambda: loss_fn(x, labels, weight, avg_factor=37.0))
            loss.backward()
        results.append((loss.detach(), x.grad, saved))
    (ref, ref_grad, ref_saved), (got, grad, saved) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    # stock CPU path: one-hot int64 + several N x C float tensors; the
    # CUDA op keeps the logits and the labels
    assert saved <= n * c * 4 + n * 8 + (n * 4 if weighted else 0) + 64
    assert ref_saved > 3 * saved, (ref_saved, saved)


def test_restored_and_soft_targets_untouched():
    import mmcv.ops.focal_loss as mmcv_focal
    before = (FocalLoss.forward, mmcv_focal.ext_module)
    loss_fn = FocalLoss(use_sigmoid=True)
    x = torch.randn(8, 4)
    soft = torch.rand(8, 4)  # soft targets: the stock Python loss
    ref = loss_fn(x, soft)
    with cuda_like_focal_loss():
        assert FocalLoss.forward is not before[0]
        got = loss_fn(x, soft)
    assert (FocalLoss.forward, mmcv_focal.ext_module) == before
    torch.testing.assert_close(got, ref)
