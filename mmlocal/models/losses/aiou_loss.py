import math
from numbers import Number
from typing import Optional, Union

import torch
import torch.nn as nn
from mmdet.models.losses.utils import weighted_loss
from mmengine.logging import MessageHub
from torch import Tensor

from mmlocal.registry import MODELS


@weighted_loss
def aiou_loss(pred: Tensor,
              target: Tensor,
              alpha: float = 0.5,
              gamma: float = 0.0,
              ciou_iou_thr: Optional[float] = 0.5,
              eps: float = 1e-6) -> Tensor:
    r"""Element-wise AIoU loss of boxes in (x1, y1, x2, y2) format.

    .. math::
        L_{AIoU} = IoU^{\gamma} \cdot
            \big(\alpha L_{CIoU} + (1 - \alpha) L_{EIoU}\big)

    with the terms defined in :class:`AIoULoss`.

    Args:
        pred (Tensor): Predicted boxes, shape (n, 4).
        target (Tensor): Target boxes, shape (n, 4).
        alpha (float): Weight of the CIoU term, in [0, 1]. Defaults to 0.5.
        gamma (float): Exponent of the focal weight :math:`IoU^\gamma`
            (no gradient flows through it); 0 switches it off.
            Defaults to 0.
        ciou_iou_thr (float, optional): The CIoU aspect term :math:`a v` is
            used only where IoU > ``ciou_iou_thr``, as in the journal
            version of CIoU and mmdet's ``CIoULoss``; ``None`` uses it
            everywhere (YOLOv8). Defaults to 0.5.
        eps (float): Guards every division. Defaults to 1e-6.

    Returns:
        Tensor: Loss of each box pair, shape (n, ).
    """
    # IoU
    overlap_wh = (torch.min(pred[:, 2:], target[:, 2:]) -
                  torch.max(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = overlap_wh[:, 0] * overlap_wh[:, 1]
    pred_w = pred[:, 2] - pred[:, 0]
    pred_h = pred[:, 3] - pred[:, 1]
    target_w = target[:, 2] - target[:, 0]
    target_h = target[:, 3] - target[:, 1]
    union = pred_w * pred_h + target_w * target_h - overlap + eps
    ious = overlap / union

    # smallest enclosing box: C_w, C_h and the squared diagonal c^2
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) -
                  torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose_w2 = enclose_wh[:, 0]**2
    enclose_h2 = enclose_wh[:, 1]**2
    diagonal2 = enclose_w2 + enclose_h2 + eps

    # rho^2(b, b_gt): squared distance of the centres
    center_dist2 = (((target[:, 0] + target[:, 2]) -
                     (pred[:, 0] + pred[:, 2]))**2 +
                    ((target[:, 1] + target[:, 3]) -
                     (pred[:, 1] + pred[:, 3]))**2) / 4
    distance_term = center_dist2 / diagonal2

    # CIoU: aspect-ratio consistency v and its trade-off a (no gradient)
    target_angle = torch.atan(target_w / (target_h + eps))
    pred_angle = torch.atan(pred_w / (pred_h + eps))
    v = (4 / math.pi**2) * (target_angle - pred_angle)**2
    with torch.no_grad():
        a = v / (1 - ious + v + eps)
        if ciou_iou_thr is not None:
            a = a * (ious > ciou_iou_thr).float()
    loss_ciou = 1 - (ious - distance_term - a * v).clamp(min=-1.0, max=1.0)

    # EIoU: width and height differences over the enclosing box's
    width_term = (pred_w - target_w)**2 / (enclose_w2 + eps)
    height_term = (pred_h - target_h)**2 / (enclose_h2 + eps)
    loss_eiou = 1 - ious + distance_term + width_term + height_term

    loss = alpha * loss_ciou + (1 - alpha) * loss_eiou
    if gamma > 0:
        loss = ious.detach().clamp(min=0).pow(gamma) * loss
    return loss


@MODELS.register_module()
class AIoULoss(nn.Module):
    r"""AIoU loss: an adaptive mix of the CIoU and EIoU box losses.

    GSO-YOLO (Zhang et al., `GSO-YOLO: Global Stability Optimization YOLO
    for Construction Site Detection <https://arxiv.org/abs/2407.00906>`_)
    regresses boxes with an "AIoU" loss that combines CIoU and EIoU; the
    paper's weighting is not available to us, so this implements

    .. math::
        L_{AIoU} = IoU^{\gamma}\,\big(\alpha L_{CIoU}
            + (1 - \alpha) L_{EIoU}\big)

    .. math::
        L_{CIoU} = 1 - IoU + \frac{\rho^2(b, b^{gt})}{c^2} + a v, \quad
        v = \frac{4}{\pi^2}\Big(\arctan\frac{w^{gt}}{h^{gt}}
            - \arctan\frac{w}{h}\Big)^2, \quad
        a = \frac{v}{(1 - IoU) + v}

    .. math::
        L_{EIoU} = 1 - IoU + \frac{\rho^2(b, b^{gt})}{c^2}
            + \frac{\rho^2(w, w^{gt})}{C_w^2}
            + \frac{\rho^2(h, h^{gt})}{C_h^2}

    where :math:`\rho` is the Euclidean distance, :math:`c` the diagonal
    and :math:`C_w, C_h` the width and height of the smallest box enclosing
    both boxes (CIoU: Zheng et al., arXiv 2005.03572; EIoU / Focal-EIoU:
    Zhang et al., arXiv 2101.08158). :math:`a` carries no gradient and, as
    in mmdet's ``CIoULoss``, is used only where IoU > ``ciou_iou_thr``;
    ``1 - CIoU`` is clamped to [0, 2] as there. With ``alpha=1`` the loss is
    mmdet's ``CIoULoss``, with ``alpha=0`` and ``gamma=0.5`` it is
    Focal-EIoU. Unlike mmdet's ``CIoULoss`` (which returns NaN for two
    identical boxes of area above ~100 px^2 in float32), every division is
    guarded by ``eps``: zero-area and disjoint boxes give finite losses and
    gradients. mmdet's ``EIoULoss`` is a different loss (Extended-IoU).

    ``alpha`` may follow a schedule: ``dict(start=1.0, end=0.5, iters=N)``
    moves it linearly from ``start`` at iteration 0 to ``end`` at iteration
    ``N`` and keeps ``end`` afterwards (e.g. start with the
    aspect-ratio-driven CIoU, shift towards the side-length-driven EIoU).
    The iteration is read from mmengine's current ``MessageHub``
    (``'iter'``, which the Runner's ``RuntimeInfoHook`` updates before
    every training iteration); outside a Runner it is 0.

    Args:
        alpha (float | dict): Weight of the CIoU term in [0, 1], or a
            schedule ``dict(start=..., end=..., iters=...)``.
            Defaults to 0.5.
        gamma (float): Exponent of the focal weight :math:`IoU^\gamma`,
            used as a weight without gradient (its derivative is unbounded
            at IoU = 0 for gamma < 1); 0 switches it off. Defaults to 0.
        ciou_iou_thr (float, optional): See above; ``None`` applies the
            aspect term at every IoU, as YOLOv8 does. Defaults to 0.5.
        eps (float): Guards every division. Defaults to 1e-6.
        reduction (str): ``'none'``, ``'mean'`` or ``'sum'``.
            Defaults to ``'mean'``.
        loss_weight (float): Weight of the loss. Defaults to 1.0.
    """

    def __init__(self,
                 alpha: Union[float, dict] = 0.5,
                 gamma: float = 0.0,
                 ciou_iou_thr: Optional[float] = 0.5,
                 eps: float = 1e-6,
                 reduction: str = 'mean',
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        self.alpha = self._check_alpha(alpha)
        if not isinstance(gamma, Number) or gamma < 0:
            raise ValueError(f'gamma={gamma!r} must be a number >= 0')
        if ciou_iou_thr is not None and not 0 <= ciou_iou_thr <= 1:
            raise ValueError(
                f'ciou_iou_thr={ciou_iou_thr!r} must be in [0, 1] or None')
        if reduction not in ('none', 'mean', 'sum'):
            raise ValueError(f"reduction={reduction!r} must be one of "
                             "'none', 'mean', 'sum'")
        if eps <= 0:
            raise ValueError(f'eps={eps!r} must be > 0')
        self.gamma = float(gamma)
        self.ciou_iou_thr = ciou_iou_thr
        self.eps = eps
        self.reduction = reduction
        self.loss_weight = loss_weight

    @staticmethod
    def _check_alpha(alpha):
        if isinstance(alpha, Number) and not isinstance(alpha, bool):
            if not 0 <= alpha <= 1:
                raise ValueError(f'alpha={alpha!r} must be in [0, 1]')
            return float(alpha)
        if isinstance(alpha, dict):
            keys = set(alpha)
            if keys != {'start', 'end', 'iters'}:
                raise ValueError(
                    f'alpha={dict(alpha)!r}: a schedule needs exactly the '
                    f"keys 'start', 'end', 'iters' (got {sorted(keys)})")
            for key in ('start', 'end'):
                value = alpha[key]
                if not isinstance(value, Number) or not 0 <= value <= 1:
                    raise ValueError(
                        f'alpha.{key}={value!r} must be in [0, 1]')
            iters = alpha['iters']
            if not isinstance(iters, int) or iters <= 0:
                raise ValueError(
                    f'alpha.iters={iters!r} must be a positive int')
            return dict(
                start=float(alpha['start']),
                end=float(alpha['end']),
                iters=iters)
        raise ValueError(f'alpha={alpha!r} must be a float in [0, 1] or a '
                         'dict(start=..., end=..., iters=...)')

    def current_alpha(self) -> float:
        """The CIoU weight at the current training iteration."""
        if not isinstance(self.alpha, dict):
            return self.alpha
        cur_iter = MessageHub.get_current_instance().get_info('iter', 0)
        progress = min(max(cur_iter, 0) / self.alpha['iters'], 1.0)
        return self.alpha['start'] + progress * (
            self.alpha['end'] - self.alpha['start'])

    def forward(self,
                pred: Tensor,
                target: Tensor,
                weight: Optional[Tensor] = None,
                avg_factor: Optional[float] = None,
                reduction_override: Optional[str] = None,
                **kwargs) -> Tensor:
        """Forward function.

        Args:
            pred (Tensor): Predicted boxes (x1, y1, x2, y2), shape (n, 4).
            target (Tensor): Target boxes, shape (n, 4).
            weight (Tensor, optional): Weight of each box pair, shape (n, )
                or (n, 4) (then averaged over the last dim, as mmdet's IoU
                losses do). Defaults to None.
            avg_factor (float, optional): Divisor of the summed loss when
                the reduction is ``'mean'``. Defaults to None.
            reduction_override (str, optional): ``'none'``, ``'mean'`` or
                ``'sum'`` instead of ``self.reduction``. Defaults to None.

        Returns:
            Tensor: The loss.
        """
        if reduction_override not in (None, 'none', 'mean', 'sum'):
            raise ValueError(f'reduction_override={reduction_override!r} '
                             "must be None, 'none', 'mean' or 'sum'")
        reduction = reduction_override or self.reduction
        if weight is not None and not torch.any(weight > 0):
            # keep the graph connected, as mmdet's IoU losses do
            if pred.dim() == weight.dim() + 1:
                weight = weight.unsqueeze(1)
            return (pred * weight).sum()
        if weight is not None and weight.dim() > 1:
            assert weight.shape == pred.shape
            weight = weight.mean(-1)
        return self.loss_weight * aiou_loss(
            pred,
            target,
            weight,
            alpha=self.current_alpha(),
            gamma=self.gamma,
            ciou_iou_thr=self.ciou_iou_thr,
            eps=self.eps,
            reduction=reduction,
            avg_factor=avg_factor,
            **kwargs)
