"""Measure a detector's memory on the CPU as its sigmoid focal loss would
take it on a GPU.

On CUDA, mmdet's ``FocalLoss`` calls mmcv's fused ``sigmoid_focal_loss``
op: an autograd function that keeps only the logits and the labels and
recomputes everything in backward. On the CPU, where mmcv has no kernel,
mmdet takes ``py_sigmoid_focal_loss``: a one-hot int64 target and about six
``N x C`` intermediate tensors live in the autograd graph until backward.
For RetinaNet at 2x3x800x1333 (~440k anchors x 80 classes) that is the
largest item of the step, so CPU peaks of any module holding a RetinaNet
loss (the end-to-end model, the last local module, the aux detection heads)
are far above a GPU's, while blocks, necks and other heads match the GPU
within a few percent (docs/local_learning.md, "On a GPU").

:func:`cuda_like_focal_loss` patches, for the duration of a ``with``
block, ``FocalLoss.forward`` to take its CUDA branch for CPU tensors with
integer labels (mmdet's ``sigmoid_focal_loss``: no one-hot target, weights,
reduction and ``avg_factor`` as on CUDA), and gives mmcv's ``ext_module``,
for CPU tensors only, the PyTorch forward/backward of the CUDA kernel from
``tools/device/mmcv_ext_stub.py`` (tested against mmdet's loss there).
One-hot or soft targets, ``activated`` losses and other devices keep their
own paths.
Losses and gradients equal the stock CPU path's (``tests/test_cuda_like_
focal_loss.py``); only what autograd keeps changes.
"""
import contextlib
import importlib.util
import os.path as osp


_STUB = osp.join(
    osp.dirname(osp.dirname(osp.abspath(__file__))), 'device',
    'mmcv_ext_stub.py')
_stub = None


def _stub_module():
    global _stub
    if _stub is None:
        spec = importlib.util.spec_from_file_location('mmcv_ext_stub', _STUB)
        _stub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_stub)
    return _stub


class _CpuFocalExt:
    """mmcv's ``ext_module`` with CPU focal-loss kernels."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def sigmoid_focal_loss_forward(self, input, *args, **kwargs):
        if input.device.type == 'cpu':
            return _stub_module().sigmoid_focal_loss_forward(
                input, *args, **kwargs)
        return self._ext.sigmoid_focal_loss_forward(input, *args, **kwargs)

    def sigmoid_focal_loss_backward(self, input, *args, **kwargs):
        if input.device.type == 'cpu':
            return _stub_module().sigmoid_focal_loss_backward(
                input, *args, **kwargs)
        return self._ext.sigmoid_focal_loss_backward(input, *args, **kwargs)


@contextlib.contextmanager
def cuda_like_focal_loss(enabled=True):
    """Within the block, CPU focal losses keep what mmcv's CUDA op keeps."""
    if not enabled:
        yield
        return
    import mmcv.ops.focal_loss as mmcv_focal
    import mmdet.models.losses.focal_loss as mmdet_focal
    focal = mmdet_focal.FocalLoss
    forward = focal.forward
    ext = mmcv_focal.ext_module

    def cuda_branch(self, pred, target, weight=None, avg_factor=None,
                    reduction_override=None):
        # FocalLoss.forward's CUDA branch (labels, not a one-hot target)
        if pred.device.type == 'cpu' and self.use_sigmoid and \
                not self.activated and pred.dim() != target.dim():
            assert reduction_override in (None, 'none', 'mean', 'sum')
            reduction = reduction_override or self.reduction
            return self.loss_weight * mmdet_focal.sigmoid_focal_loss(
                pred, target, weight, gamma=self.gamma, alpha=self.alpha,
                reduction=reduction, avg_factor=avg_factor)
        return forward(self, pred, target, weight, avg_factor,
                       reduction_override)

    focal.forward = cuda_branch
    mmcv_focal.ext_module = _CpuFocalExt(ext)
    try:
        yield
    finally:
        focal.forward = forward
        mmcv_focal.ext_module = ext
