"""Stock box and segmentation losses without a host read per call.

A host read of a device value (``.item()``, ``if tensor:``) makes the host
wait for the GPU's queue; in a local-learning step, where the auxiliary
heads run between the modules, each one stops the host from queueing the
next module ahead of the device. These twins give the stock losses' values
and gradients without such reads. :func:`sync_free_loss` swaps a stock loss
for its twin; ``DetAuxHead`` and ``SegAuxHead`` do so for their heads.

**Box losses.**

mmdet's ``L1Loss.forward`` and ``SmoothL1Loss.forward`` start with
``if weight is not None and not torch.any(weight > 0)``: a shortcut that
returns ``(pred * weight).sum()`` when no box is positive. Reading that
condition on the host is a device synchronisation on a GPU, once per call,
i.e. once per pyramid level and head. The shortcut changes nothing that the
normal path does not give too: with every weight zero the weighted loss is
``loss_weight * sum(0) / (avg_factor + eps) = 0`` and its gradient is zero,
and a NaN/inf prediction gives NaN both ways. So these subclasses always take
the normal path, with mmdet's own ``l1_loss`` / ``smooth_l1_loss``.

The one difference: where every weight is zero and a *target* is NaN, mmdet
returns 0 and these NaN (box coders give finite targets, zeros for negatives).
``reduction='none'``, and a sum with an ``avg_factor`` (an error in mmdet
unless no weight is positive), keep mmdet's forward.

Equal means bit-identical on the CPU (tested); on CUDA a division by a
device tensor ``avg_factor`` instead of a host number may round differently
in the last bit.

**Cross-entropy.** mmseg's ``CrossEntropyLoss(avg_non_ignore=True)`` (the
mean over non-ignored pixels, as PyTorch's ``ignore_index`` mean) counts
them with ``.item()``; :class:`SyncFreeCrossEntropyLoss` passes the same
count as a tensor ``avg_factor`` (mmseg divides by ``avg_factor + eps``
either way). Only the softmax criterion without class weights is changed.

**Focal loss summed over weighted rows.** :class:`FusedFocalLoss` is
``mmdet.FocalLoss`` that, for ``reduction='sum'`` with per-row weights and
no ``avg_factor`` where mmcv's fused kernel runs (CUDA), computes
``loss_weight * sum_i w_i sum_c FL(x_ic, t_i)`` with that kernel and one
weighted sum (:class:`WeightedFocalSum`): no zero-filled output, no
``1.0 *`` for a unit ``loss_weight``; backward is the kernel and one
scaling. ``DetAuxHead`` passes weights already divided by the
normaliser (``avg_factor + eps``), so the loss is mmdet's ``mean`` with
``avg_factor`` up to the rounding of the division. Every other call
(CPU, one-hot targets, other reductions) is mmdet's.
"""
import mmcv.ops.focal_loss as mmcv_focal
import torch
from mmdet.models.losses import FocalLoss, L1Loss, SmoothL1Loss
from mmdet.models.losses.smooth_l1_loss import l1_loss, smooth_l1_loss
from mmseg.models.losses import CrossEntropyLoss
from mmseg.models.losses.cross_entropy_loss import cross_entropy
from torch.autograd.function import once_differentiable

from mmlocal.registry import MODELS


def _reduction(loss, reduction_override):
    assert reduction_override in (None, 'none', 'mean', 'sum')
    return reduction_override if reduction_override else loss.reduction


def _weighted(loss_weight, loss):
    """``loss_weight * loss``; weight 1 costs no kernel (``1.0 * x`` is
    ``x``, value and gradient)."""
    return loss if loss_weight == 1.0 else loss_weight * loss


def _stock_path(reduction, avg_factor):
    """Where mmdet's no-positive shortcut gives what the normal path does
    not: a scalar for ``'none'``, 0 instead of its error for a sum with an
    ``avg_factor``. These calls keep mmdet's forward (and its host read)."""
    return reduction == 'none' or (reduction == 'sum'
                                   and avg_factor is not None)


@MODELS.register_module()
class SyncFreeL1Loss(L1Loss):
    """``mmdet.L1Loss`` without the host read of its no-positive shortcut
    (same value and gradient; see the module docstring)."""

    def forward(self, pred, target, weight=None, avg_factor=None,
                reduction_override=None):
        reduction = _reduction(self, reduction_override)
        if _stock_path(reduction, avg_factor):
            return super().forward(pred, target, weight, avg_factor,
                                   reduction_override)
        if (reduction == 'sum' and avg_factor is None and weight is not None
                and weight.shape == pred.shape == target.shape
                and pred.numel() and pred.dtype == target.dtype ==
                weight.dtype == torch.float32):
            # sum(|pred - target| * weight) as a dot product: one kernel
            # fewer (its backward: the same three)
            with torch.autocast(pred.device.type, enabled=False):
                return _weighted(self.loss_weight, torch.dot(
                    (pred - target).abs().reshape(-1), weight.reshape(-1)))
        return _weighted(self.loss_weight, l1_loss(
            pred, target, weight, reduction=reduction, avg_factor=avg_factor))


@MODELS.register_module()
class SyncFreeSmoothL1Loss(SmoothL1Loss):
    """``mmdet.SmoothL1Loss`` without the host read of its no-positive
    shortcut (same value and gradient; see the module docstring)."""

    def forward(self, pred, target, weight=None, avg_factor=None,
                reduction_override=None, **kwargs):
        reduction = _reduction(self, reduction_override)
        if _stock_path(reduction, avg_factor):
            return super().forward(pred, target, weight, avg_factor,
                                   reduction_override, **kwargs)
        return _weighted(self.loss_weight, smooth_l1_loss(
            pred, target, weight, beta=self.beta, reduction=reduction,
            avg_factor=avg_factor, **kwargs))


@MODELS.register_module()
class SyncFreeCrossEntropyLoss(CrossEntropyLoss):
    """``mmseg.CrossEntropyLoss`` whose ``avg_non_ignore`` count of the
    non-ignored pixels stays on the device (same value and gradient)."""

    def forward(self, cls_score, label, weight=None, avg_factor=None,
                reduction_override=None, ignore_index=-100, **kwargs):
        reduction = reduction_override if reduction_override else \
            self.reduction
        if (avg_factor is None and reduction == 'mean'
                and self.avg_non_ignore and self.class_weight is None
                and self.cls_criterion is cross_entropy):
            avg_factor = (label != ignore_index).sum()
        return super().forward(cls_score, label, weight, avg_factor,
                               reduction_override, ignore_index, **kwargs)


def focal_kernel_runs(pred):
    """mmcv's fused sigmoid focal-loss kernel runs for ``pred``: mmdet's
    own condition (``FocalLoss`` takes it on CUDA only).
    ``tools/analysis/count_ops.py --cuda-like-focal-loss`` extends it to
    the CPU, where it provides the kernel."""
    return torch.cuda.is_available() and pred.is_cuda


class WeightedFocalSum(torch.autograd.Function):
    """``sum_i weight_i * sum_c FL(pred_ic, target_i)`` with mmcv's fused
    sigmoid focal-loss kernels (``ext_module``).

    Forward: the kernel (it writes every element, so its output is not
    zero-filled first, unlike mmcv's ``SigmoidFocalLossFunction``) and the
    weighted sum; backward: the kernel and one scaling by
    ``weight * grad``. Same values as ``mmcv.ops.sigmoid_focal_loss(...,
    reduction='none')`` weighted and summed, as mmdet does.
    """

    @staticmethod
    def forward(ctx, pred, target, weight, gamma, alpha):
        ext = mmcv_focal.ext_module
        loss = pred.new_empty(pred.shape)
        ext.sigmoid_focal_loss_forward(pred, target, pred.new_empty(0), loss,
                                       gamma=gamma, alpha=alpha)
        ctx.save_for_backward(pred, target, weight)
        ctx.gamma, ctx.alpha = gamma, alpha
        return (loss * weight[:, None]).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        pred, target, weight = ctx.saved_tensors
        grad_pred = pred.new_empty(pred.shape)
        mmcv_focal.ext_module.sigmoid_focal_loss_backward(
            pred, target, pred.new_empty(0), grad_pred, gamma=ctx.gamma,
            alpha=ctx.alpha)
        grad_pred *= (weight * grad)[:, None]
        return grad_pred, None, None, None, None


@MODELS.register_module()
class FusedFocalLoss(FocalLoss):
    """``mmdet.FocalLoss``; a weighted sum where mmcv's kernel runs takes
    :class:`WeightedFocalSum` (same value and gradient; see the module
    docstring)."""

    def forward(self, pred, target, weight=None, avg_factor=None,
                reduction_override=None):
        reduction = _reduction(self, reduction_override)
        if (reduction == 'sum' and avg_factor is None and weight is not None
                and self.use_sigmoid and not self.activated
                and pred.dim() == 2 and target.dim() == 1
                and weight.dim() == 1 and target.dtype == torch.long
                and focal_kernel_runs(pred)):
            return _weighted(self.loss_weight, WeightedFocalSum.apply(
                pred.contiguous(), target.contiguous(), weight,
                float(self.gamma), float(self.alpha)))
        return super().forward(pred, target, weight, avg_factor,
                               reduction_override)


def sync_free_loss(loss):
    """The sync-free twin of a stock mmdet ``L1Loss``/``SmoothL1Loss`` or
    mmseg ``CrossEntropyLoss`` instance (same settings), or the
    :class:`FusedFocalLoss` of a stock ``FocalLoss``; any other loss is
    returned unchanged."""
    if type(loss) is FocalLoss:
        twin = FusedFocalLoss(
            use_sigmoid=loss.use_sigmoid, gamma=loss.gamma, alpha=loss.alpha,
            reduction=loss.reduction, loss_weight=loss.loss_weight,
            activated=loss.activated)
    elif type(loss) is L1Loss:
        twin = SyncFreeL1Loss(reduction=loss.reduction,
                              loss_weight=loss.loss_weight)
    elif type(loss) is SmoothL1Loss:
        twin = SyncFreeSmoothL1Loss(beta=loss.beta, reduction=loss.reduction,
                                    loss_weight=loss.loss_weight)
    elif type(loss) is CrossEntropyLoss:
        twin = SyncFreeCrossEntropyLoss(
            use_sigmoid=loss.use_sigmoid, use_mask=loss.use_mask,
            reduction=loss.reduction, class_weight=loss.class_weight,
            loss_weight=loss.loss_weight, loss_name=loss.loss_name,
            avg_non_ignore=loss.avg_non_ignore)
    else:
        return loss
    twin.train(loss.training)
    return twin
