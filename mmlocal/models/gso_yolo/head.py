import copy
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.structures.bbox import get_box_tensor
from mmdet.utils import (ConfigType, InstanceList, OptConfigType,
                         OptInstanceList, OptMultiConfig, reduce_mean)
from mmengine.config import ConfigDict
from mmengine.dist import get_world_size
from mmengine.structures import InstanceData
from torch import Tensor

from mmlocal.registry import MODELS, TASK_UTILS
from .utils import check_factor, reset_conv_parameters, scale_channels


@MODELS.register_module()
class YOLOv8Head(BaseDenseHead):
    r"""The decoupled, anchor-free head of YOLOv8 with Distribution Focal
    Loss box regression.

    Every level has its own two branches of two 3x3 convs: the regression
    branch predicts ``4 * reg_max`` logits, a discrete distribution over
    the distances ``0 .. reg_max - 1`` (in units of the level's stride) from
    the prior point to each box side; the classification branch predicts
    ``num_classes`` sigmoid logits. A box side is the distribution's
    expectation times the stride (DFL, Li et al., arXiv 2006.04388),

    .. math::
        d = s \sum_{i=0}^{R-1} i \cdot \mathrm{softmax}(z)_i, \quad
        b = (p_x - d_l,\ p_y - d_t,\ p_x + d_r,\ p_y + d_b)

    with prior points at cell centres (``MlvlPointGenerator(offset=0.5)``).

    Training assigns priors with mmdet's ``TaskAlignedAssigner`` (TOOD, Feng
    et al., arXiv 2108.07755) on the alignment metric
    :math:`t = s^{\alpha} u^{\beta}` (``alpha=0.5, beta=6, topk=10``); the
    target of a positive is its metric normalised per object,
    :math:`\hat t = t / \max t \cdot \max u`, which is the soft BCE target
    of its class and the weight of its box and DFL losses. All three losses
    are divided by the (all-reduced) sum of :math:`\hat t`:

    .. math::
        L = \frac{1}{\sum \hat t}\Big(\lambda_{cls} \sum \mathrm{BCE}(c,
            \hat t) + \lambda_{box} \sum_{pos} \hat t\, L_{IoU}
            + \lambda_{dfl} \sum_{pos} \hat t\, \tfrac14 \sum_{side}
            \mathrm{DFL}\Big)

    with :math:`\lambda = 0.5, 7.5, 1.5` as in YOLOv8. With
    ``loss_batch_scale=True`` every loss is further multiplied by the global
    batch size, as YOLOv8 does, so that its SGD recipe (lr 0.01) applies.

    Written from the YOLOv8 architecture description; the assigner, point
    generator, coder, DFL, BCE and IoU losses are mmdet's, built in mmdet's
    scope unless their config sets ``_scope_``. Post-processing (score
    threshold, multi-label top-k, NMS) is mmdet's ``BaseDenseHead``'s.

    Args:
        num_classes (int): Number of object classes.
        in_channels (Sequence[int]): Channels of the input levels before
            widening. Defaults to (256, 512, 1024).
        widen_factor (float): Width multiplier of ``in_channels``.
            Defaults to 1.0.
        reg_max (int): Number of distance bins. Defaults to 16.
        prior_generator (dict): Point generator config. Defaults to
            ``mmdet.MlvlPointGenerator`` with offset 0.5, strides 8, 16, 32.
        bbox_coder (dict): ``mmdet.DistancePointBBoxCoder``.
        loss_cls (dict): Classification loss, a sigmoid BCE taking soft
            targets. Defaults to ``mmdet.CrossEntropyLoss(use_sigmoid=True,
            loss_weight=0.5)``.
        loss_bbox (dict): IoU-type box loss on decoded (x1, y1, x2, y2)
            boxes. Defaults to ``mmdet.CIoULoss(loss_weight=7.5)``.
        loss_dfl (dict): Distribution focal loss. Defaults to
            ``mmdet.DistributionFocalLoss(loss_weight=1.5)``.
        loss_batch_scale (bool): Multiply the losses by the global batch
            size (YOLOv8 convention). Defaults to False.
        norm_cfg (dict): Norm of the branch convs. Defaults to
            BN(momentum=0.03, eps=0.001).
        act_cfg (dict): Activation of the branch convs. Defaults to SiLU.
        train_cfg (dict, optional): ``assigner`` config and the ``alpha``,
            ``beta`` of its metric.
        test_cfg (dict, optional): Post-processing: ``nms_pre``,
            ``score_thr``, ``nms``, ``max_per_img``, ``min_bbox_size``.
        init_cfg (dict or list[dict], optional): Initialization config.
            Defaults to None: the convs get PyTorch's default
            initialisation, as in YOLOv8.
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: Sequence[int] = (256, 512, 1024),
                 widen_factor: float = 1.0,
                 reg_max: int = 16,
                 prior_generator: ConfigType = dict(
                     type='mmdet.MlvlPointGenerator',
                     offset=0.5,
                     strides=[8, 16, 32]),
                 bbox_coder: ConfigType = dict(
                     type='mmdet.DistancePointBBoxCoder'),
                 loss_cls: ConfigType = dict(
                     type='mmdet.CrossEntropyLoss',
                     use_sigmoid=True,
                     reduction='mean',
                     loss_weight=0.5),
                 loss_bbox: ConfigType = dict(
                     type='mmdet.CIoULoss', reduction='mean', loss_weight=7.5),
                 loss_dfl: ConfigType = dict(
                     type='mmdet.DistributionFocalLoss',
                     reduction='mean',
                     loss_weight=1.5),
                 loss_batch_scale: bool = False,
                 norm_cfg: ConfigType = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: ConfigType = dict(type='SiLU', inplace=True),
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'num_classes={num_classes!r} must be >= 1')
        if not isinstance(reg_max, int) or reg_max < 2:
            raise ValueError(f'reg_max={reg_max!r} must be an int >= 2')
        widen_factor = check_factor('widen_factor', widen_factor)
        self.num_classes = num_classes
        self.cls_out_channels = num_classes
        self.use_sigmoid_cls = True
        self.reg_max = reg_max
        self.in_channels = [
            scale_channels(c, widen_factor) for c in in_channels
        ]
        self.loss_batch_scale = loss_batch_scale
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        # attribute access (cfg.nms) also for plain dicts
        self.train_cfg = ConfigDict(train_cfg) if train_cfg else train_cfg
        self.test_cfg = ConfigDict(test_cfg) if test_cfg else test_cfg

        self.prior_generator = self._build(TASK_UTILS, prior_generator)
        if self.prior_generator.num_levels != len(self.in_channels):
            raise ValueError(
                f'prior_generator has {self.prior_generator.num_levels} '
                f'strides but in_channels={list(in_channels)} lists '
                f'{len(self.in_channels)} levels')
        self.bbox_coder = self._build(TASK_UTILS, bbox_coder)
        self.loss_cls = self._build(MODELS, loss_cls)
        self.loss_bbox = self._build(MODELS, loss_bbox)
        self.loss_dfl = self._build(MODELS, loss_dfl)
        if self.train_cfg:
            if 'assigner' not in self.train_cfg:
                raise ValueError('train_cfg needs an assigner, e.g. '
                                 "dict(type='mmdet.TaskAlignedAssigner', "
                                 'topk=10)')
            self.assigner = self._build(TASK_UTILS, self.train_cfg['assigner'])
            self.assign_kwargs = {
                k: self.train_cfg[k]
                for k in ('alpha', 'beta') if k in self.train_cfg
            }
        self.register_buffer(
            'proj', torch.arange(reg_max, dtype=torch.float), persistent=False)
        self._init_layers()

    @staticmethod
    def _build(registry, cfg: ConfigType):
        """Build a part in mmdet's scope (unless its config sets
        ``_scope_``): mmdet's parts build their own parts by unscoped names
        (``TaskAlignedAssigner`` its ``BboxOverlaps2D``), which must resolve
        also when the caller's scope is another one."""
        cfg = copy.deepcopy(cfg)
        cfg.setdefault('_scope_', 'mmdet')
        return registry.build(cfg)

    def _init_layers(self) -> None:
        # branch widths of YOLOv8, set by the finest level
        reg_channels = max(16, self.in_channels[0] // 4, 4 * self.reg_max)
        cls_channels = max(self.in_channels[0], min(self.num_classes, 100))
        self.reg_convs = nn.ModuleList()
        self.cls_convs = nn.ModuleList()
        self.reg_preds = nn.ModuleList()
        self.cls_preds = nn.ModuleList()
        for in_ch in self.in_channels:
            self.reg_convs.append(self._branch(in_ch, reg_channels))
            self.cls_convs.append(self._branch(in_ch, cls_channels))
            self.reg_preds.append(nn.Conv2d(reg_channels, 4 * self.reg_max, 1))
            self.cls_preds.append(nn.Conv2d(cls_channels, self.num_classes, 1))

    def _branch(self, in_channels: int, channels: int) -> nn.Sequential:
        return nn.Sequential(*[
            ConvModule(
                in_channels if i == 0 else channels,
                channels,
                3,
                padding=1,
                norm_cfg=self.norm_cfg,
                act_cfg=self.act_cfg) for i in range(2)
        ])

    def init_weights(self) -> None:
        """YOLOv8's initialisation: PyTorch's default for the convs (unless
        ``init_cfg`` asks for another), prediction biases 1.0 for the
        distance logits and a prior of about 5 objects per 640x640 image
        for the class logits."""
        first_call = not self._is_init
        super().init_weights()
        if self.init_cfg is None and first_call:
            reset_conv_parameters(self)
        for reg_pred, cls_pred, stride in zip(self.reg_preds, self.cls_preds,
                                              self.prior_generator.strides):
            nn.init.constant_(reg_pred.bias, 1.0)
            nn.init.constant_(
                cls_pred.bias,
                math.log(5 / self.num_classes / (640 / stride[0])**2))

    def forward(self, x: Tuple[Tensor, ...]) -> Tuple[List[Tensor], ...]:
        """Forward features of all levels.

        Args:
            x (tuple[Tensor]): Features of the levels, (B, C_l, H_l, W_l).

        Returns:
            tuple[list[Tensor], list[Tensor]]: Class logits
            (B, num_classes, H_l, W_l) and distance logits
            (B, 4 * reg_max, H_l, W_l) of every level.
        """
        if len(x) != len(self.in_channels):
            raise ValueError(f'{type(self).__name__} expects '
                             f'{len(self.in_channels)} levels, got {len(x)}')
        cls_scores, bbox_dist_preds = [], []
        for i, feat in enumerate(x):
            cls_scores.append(self.cls_preds[i](self.cls_convs[i](feat)))
            bbox_dist_preds.append(self.reg_preds[i](self.reg_convs[i](feat)))
        return cls_scores, bbox_dist_preds

    def _dist_expectation(self, dist_logits: Tensor) -> Tensor:
        """Expected distance (in strides) of logits (..., 4, reg_max)."""
        return dist_logits.softmax(-1) @ self.proj.to(dist_logits)

    def predict_by_feat(self,
                        cls_scores: List[Tensor],
                        bbox_dist_preds: List[Tensor],
                        score_factors: Optional[List[Tensor]] = None,
                        batch_img_metas: Optional[List[dict]] = None,
                        cfg: OptConfigType = None,
                        rescale: bool = False,
                        with_nms: bool = True) -> InstanceList:
        """Decode the distance distributions into distances in pixels, then
        post-process as every mmdet dense head does
        (``BaseDenseHead.predict_by_feat``: score threshold, top-k, NMS)."""
        bbox_preds = []
        for dist, stride in zip(bbox_dist_preds, self.prior_generator.strides):
            b, _, h, w = dist.shape
            dist = dist.reshape(b, 4, self.reg_max, h,
                                w).permute(0, 1, 3, 4, 2)
            scale = dist.new_tensor([stride[0], stride[1]] * 2)
            bbox_preds.append(
                self._dist_expectation(dist) * scale.view(1, 4, 1, 1))
        return super().predict_by_feat(
            cls_scores,
            bbox_preds,
            score_factors=None,
            batch_img_metas=batch_img_metas,
            cfg=cfg,
            rescale=rescale,
            with_nms=with_nms)

    def loss_by_feat(
            self,
            cls_scores: List[Tensor],
            bbox_dist_preds: List[Tensor],
            batch_gt_instances: InstanceList,
            batch_img_metas: List[dict],
            batch_gt_instances_ignore: OptInstanceList = None) -> dict:
        """Classification (BCE), box (IoU-type) and DFL losses.

        Args:
            cls_scores (list[Tensor]): Class logits of every level,
                (B, num_classes, H, W).
            bbox_dist_preds (list[Tensor]): Distance logits of every level,
                (B, 4 * reg_max, H, W).
            batch_gt_instances (list[:obj:`InstanceData`]): ``bboxes`` and
                ``labels`` of every image.
            batch_img_metas (list[dict]): Meta information of every image.
            batch_gt_instances_ignore (list[:obj:`InstanceData`], optional):
                Not used (the assigner has no ignore regions).

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_bbox``, ``loss_dfl``.
        """
        if not self.train_cfg:
            raise ValueError(f'{type(self).__name__} needs a train_cfg with '
                             'an assigner to compute losses')
        num_imgs = len(batch_img_metas)
        all_labels = torch.cat([gt.labels for gt in batch_gt_instances])
        if all_labels.numel() and int(all_labels.max()) >= self.num_classes:
            raise ValueError(
                f'a ground-truth label is {int(all_labels.max())} but '
                f'num_classes={self.num_classes}: set '
                "model.bbox_head.num_classes to the dataset's class count")
        featmap_sizes = [score.shape[-2:] for score in cls_scores]
        priors = torch.cat(
            self.prior_generator.grid_priors(
                featmap_sizes,
                dtype=cls_scores[0].dtype,
                device=cls_scores[0].device,
                with_stride=True))
        points, strides = priors[:, :2], priors[:, [2, 3, 2, 3]]

        flat_cls_scores = torch.cat([
            score.permute(0, 2, 3, 1).reshape(num_imgs, -1, self.num_classes)
            for score in cls_scores
        ], 1)
        flat_dist_preds = torch.cat([
            dist.permute(0, 2, 3, 1).reshape(num_imgs, -1, 4, self.reg_max)
            for dist in bbox_dist_preds
        ], 1)
        flat_bboxes = self.bbox_coder.decode(
            points.expand(num_imgs, -1, -1),
            self._dist_expectation(flat_dist_preds) * strides)

        if batch_gt_instances_ignore is None:
            batch_gt_instances_ignore = [None] * num_imgs
        labels, bbox_targets, target_weights = [], [], []
        for i in range(num_imgs):
            targets = self._get_targets_single(
                flat_cls_scores[i].detach().sigmoid(), flat_bboxes[i].detach(),
                points, batch_gt_instances[i], batch_gt_instances_ignore[i])
            labels.append(targets[0])
            bbox_targets.append(targets[1])
            target_weights.append(targets[2])
        labels = torch.cat(labels)
        bbox_targets = torch.cat(bbox_targets)
        target_weights = torch.cat(target_weights)
        avg_factor = reduce_mean(target_weights.sum()).clamp_(min=1).item()

        # soft one-hot class targets: the normalised alignment metric
        pos_mask = labels < self.num_classes
        cls_targets = flat_cls_scores.new_zeros(
            (labels.numel(), self.num_classes))
        cls_targets[pos_mask, labels[pos_mask]] = target_weights[pos_mask]
        loss_cls = self.loss_cls(
            flat_cls_scores.reshape(-1, self.num_classes),
            cls_targets,
            avg_factor=avg_factor)

        flat_bboxes = flat_bboxes.reshape(-1, 4)
        flat_dist_preds = flat_dist_preds.reshape(-1, 4, self.reg_max)
        if pos_mask.any():
            pos_weights = target_weights[pos_mask]
            loss_bbox = self.loss_bbox(
                flat_bboxes[pos_mask],
                bbox_targets[pos_mask],
                weight=pos_weights,
                avg_factor=avg_factor)
            # DFL targets: distances in strides, just below the last bin
            pos_strides = strides.repeat(num_imgs, 1)[pos_mask]
            pos_points = points.repeat(num_imgs, 1)[pos_mask]
            dist_targets = self.bbox_coder.encode(
                pos_points / pos_strides[:, :2],
                bbox_targets[pos_mask] / pos_strides,
                max_dis=self.reg_max - 1,
                eps=0.01)
            loss_dfl = self.loss_dfl(
                flat_dist_preds[pos_mask].reshape(-1, self.reg_max),
                dist_targets.reshape(-1),
                weight=pos_weights[:, None].expand(-1, 4).reshape(-1),
                avg_factor=4 * avg_factor)
        else:
            loss_bbox = flat_bboxes.sum() * 0
            loss_dfl = flat_dist_preds.sum() * 0

        losses = dict(
            loss_cls=loss_cls, loss_bbox=loss_bbox, loss_dfl=loss_dfl)
        if self.loss_batch_scale:
            batch_size = num_imgs * get_world_size()
            losses = {k: v * batch_size for k, v in losses.items()}
        return losses

    def _get_targets_single(
        self,
        scores: Tensor,
        bboxes: Tensor,
        points: Tensor,
        gt_instances: InstanceData,
        gt_instances_ignore: Optional[InstanceData] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Assign the priors of one image.

        Args:
            scores (Tensor): Class probabilities, (N, num_classes).
            bboxes (Tensor): Decoded boxes, (N, 4).
            points (Tensor): Prior points, (N, 2).
            gt_instances (:obj:`InstanceData`): ``bboxes``, ``labels``.
            gt_instances_ignore (:obj:`InstanceData`, optional): Passed to
                the assigner.

        Returns:
            tuple[Tensor]: ``labels`` (N, ) with ``num_classes`` for the
            background, ``bbox_targets`` (N, 4) and the normalised alignment
            metric ``target_weights`` (N, ), 0 for the background.
        """
        gt_bboxes = get_box_tensor(gt_instances.bboxes)
        gt_labels = gt_instances.labels
        num_priors = points.size(0)
        # the assigner takes priors as boxes and tests their centres
        pred_instances = InstanceData(
            priors=torch.cat([points, points], dim=1),
            bboxes=bboxes,
            scores=scores)
        assign_result = self.assigner.assign(
            pred_instances, InstanceData(bboxes=gt_bboxes, labels=gt_labels),
            gt_instances_ignore, **self.assign_kwargs)

        labels = points.new_full((num_priors, ),
                                 self.num_classes,
                                 dtype=torch.long)
        bbox_targets = bboxes.new_zeros((num_priors, 4))
        target_weights = bboxes.new_zeros((num_priors, ))
        pos_inds = (assign_result.gt_inds > 0).nonzero(as_tuple=True)[0]
        if pos_inds.numel() == 0:
            return labels, bbox_targets, target_weights

        pos_gt_inds = assign_result.gt_inds[pos_inds] - 1
        labels[pos_inds] = gt_labels[pos_gt_inds]
        bbox_targets[pos_inds] = gt_bboxes[pos_gt_inds]
        # t / max(t) * max(iou), both maxima over the positives of each gt
        metrics = assign_result.assign_metrics[pos_inds]
        ious = assign_result.max_overlaps[pos_inds]
        num_gts = gt_bboxes.size(0)
        max_metrics = metrics.new_zeros(num_gts).scatter_reduce(
            0, pos_gt_inds, metrics, reduce='amax', include_self=False)
        max_ious = ious.new_zeros(num_gts).scatter_reduce(
            0, pos_gt_inds, ious, reduce='amax', include_self=False)
        target_weights[pos_inds] = (
            metrics / (max_metrics[pos_gt_inds] + 1e-9) *
            max_ious[pos_gt_inds])
        return labels, bbox_targets, target_weights
