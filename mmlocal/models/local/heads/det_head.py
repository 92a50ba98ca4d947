import collections
import copy

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule, ModuleList, Sequential

from mmlocal.models.losses.sync_free_losses import sync_free_loss
from mmlocal.registry import MODELS
from .anchor_targets import anchor_targets, unsupported_reason

# RetinaNet's assignment, as MAN++'s COCO auxiliary head uses it.
_DEFAULT_TRAIN_CFG = dict(
    assigner=dict(
        type='MaxIoUAssigner',
        pos_iou_thr=0.5,
        neg_iou_thr=0.4,
        min_pos_iou=0,
        ignore_iof_thr=-1),
    sampler=dict(type='PseudoSampler'),
    allowed_border=-1,
    pos_weight=-1,
    debug=False)


def _per_group_weights(targets, groups):
    """Targets whose weights normalise each of ``groups`` interleaved image
    groups by its own ``avg_factor`` and average the groups: weights of
    group ``g`` times ``1 / (groups * avg_g)``, then ``avg_factor=1``."""
    anchors, labels, label_weights, bbox_targets, bbox_weights = targets
    # a positive anchor's box weights are 1: positives per image, at least
    # one per image (mmdet's SamplingResult)
    pos = sum(w[..., 0].sum(dim=1) for w in bbox_weights).clamp(min=1)
    per_group = pos.view(-1, groups).sum(dim=0)
    scale = (1.0 / (groups * per_group)).repeat(pos.numel() // groups)
    label_weights = [w * scale[:, None] for w in label_weights]
    bbox_weights = [w * scale[:, None, None] for w in bbox_weights]
    return [anchors, labels, label_weights, bbox_targets, bbox_weights], 1.0


@MODELS.register_module()
class DetAuxHead(BaseModule):
    """A light dense detection head that trains one local module.

    Follows the auxiliary detection head of MAN++'s COCO RetinaNet
    (Su et al., TPAMI 2026): a 1x1 projection of the module's feature ``y``,
    stride-2 3x3 convs for further pyramid levels, and a RetinaNet head with
    2 stacked convs (the main head has 4), its own anchors, focal loss and
    box regression, assigned with mmdet's ``MaxIoUAssigner``.

    Level ``l`` has stride ``max(stride, min_stride) * 2**l``; a feature finer
    than ``min_stride`` is first brought there by stride-2 convs (anchors at
    stride 4 would multiply the head's cost for little signal).

    Args:
        in_channels (int): Channels of ``y``.
        stride (int): Stride of ``y`` w.r.t. the input image.
        num_classes (int): Number of object classes.
        feat_channels (int): Width of the projection and head. Default 128.
        num_levels (int): Pyramid levels the head predicts on. Default 1
            (MAN++ maps early modules to one level).
        min_stride (int): Finest stride used. Default 8.
        head (dict): Config of the mmdet dense head; ``in_channels``,
            ``feat_channels``, ``num_classes`` and the anchor strides are
            filled in. Default: ``mmdet.RetinaHead`` with 2 stacked convs.
        train_cfg (dict): Assigner/sampler config of the head.
        norm_cfg (dict): Norm of the projection convs. Default BN.
        batched_targets (bool): Compute the anchor targets of all images at
            once (:mod:`.anchor_targets`: same targets as mmdet's per-image
            ``get_targets``, no host synchronisation) when the head allows
            it (``batched_targets_unsupported`` says why not otherwise).
            ``False``: always mmdet's ``head.loss``. Default True.

    A stock ``mmdet.L1Loss``/``SmoothL1Loss`` box loss of ``head`` is used
    as :class:`~mmlocal.models.losses.SyncFreeL1Loss` (same settings, value
    and gradient, without mmdet's host read per pyramid level).
    """

    def __init__(self,
                 in_channels,
                 stride,
                 num_classes,
                 feat_channels=128,
                 num_levels=1,
                 min_stride=8,
                 head=None,
                 train_cfg=None,
                 norm_cfg=dict(type='BN'),
                 batched_targets=True,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if num_levels < 1:
            raise ValueError(f'num_levels={num_levels} must be >= 1')
        self.in_channels = in_channels
        self.stride = stride
        self.num_classes = num_classes

        self.input_proj = ConvModule(
            in_channels, feat_channels, 1, norm_cfg=norm_cfg)
        downs = []
        first_stride = stride
        while first_stride < min_stride:
            downs.append(
                ConvModule(feat_channels, feat_channels, 3, stride=2,
                           padding=1, norm_cfg=norm_cfg))
            first_stride *= 2
        self.to_first_level = Sequential(*downs)
        self.level_convs = ModuleList([
            ConvModule(feat_channels, feat_channels, 3, stride=2, padding=1,
                       norm_cfg=norm_cfg) for _ in range(num_levels - 1)
        ])
        self.strides = [first_stride * 2**i for i in range(num_levels)]

        head = copy.deepcopy(head) if head is not None else dict(
            type='mmdet.RetinaHead',
            stacked_convs=2,
            anchor_generator=dict(
                type='mmdet.AnchorGenerator',
                octave_base_scale=4,
                scales_per_octave=1,
                ratios=[0.5, 1.0, 2.0]),
            bbox_coder=dict(
                type='mmdet.DeltaXYWHBBoxCoder',
                target_means=[.0, .0, .0, .0],
                target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(
                type='mmdet.FocalLoss',
                use_sigmoid=True,
                gamma=2.0,
                alpha=0.25,
                loss_weight=1.0),
            loss_bbox=dict(type='mmdet.L1Loss', loss_weight=1.0))
        head.update(
            num_classes=num_classes,
            in_channels=feat_channels,
            feat_channels=feat_channels,
            train_cfg=copy.deepcopy(train_cfg or _DEFAULT_TRAIN_CFG))
        if 'anchor_generator' in head:
            head['anchor_generator']['strides'] = list(self.strides)
        elif 'prior_generator' in head:
            head['prior_generator']['strides'] = list(self.strides)
        # nested builds (anchors, coder, losses, assigner) run in mmdet scope
        head.setdefault('_scope_', 'mmdet')
        self.head = MODELS.build(head)
        # mmdet's L1/smooth L1 read `any(weight > 0)` on the host per level
        if isinstance(getattr(self.head, 'loss_bbox', None), nn.Module):
            self.head.loss_bbox = sync_free_loss(self.head.loss_bbox)
        self.batched_targets_unsupported = unsupported_reason(self.head)
        self.batched_targets = bool(batched_targets) and \
            self.batched_targets_unsupported is None
        self._anchor_cache = collections.OrderedDict()  # not state

    def forward(self, y):
        """Return the pyramid the dense head predicts on."""
        x = self.to_first_level(self.input_proj(y))
        feats = [x]
        for conv in self.level_convs:
            feats.append(conv(feats[-1]))
        return tuple(feats)

    def loss(self, y, inputs, data_samples, groups=1):
        """Detection losses of ``y`` against the GT instances.

        ``groups > 1``: the batch holds ``groups`` interleaved groups
        (image ``i`` in group ``i % groups``: HPFF's stacked patches); each
        term is the mean over the groups of the loss each group would get
        alone (normalised by its own positives).
        """
        if self.batched_targets and not self._uses_ignored(data_samples):
            losses = self._loss_batched(self(y), data_samples, groups)
        elif groups > 1:
            losses = self._loss_per_group(self(y), data_samples, groups)
        else:
            losses = self.head.loss(self(y), data_samples)
        # mmdet returns per-level lists; sum them to one term per kind
        return {
            name: sum(value) if isinstance(value, (list, tuple)) else value
            for name, value in losses.items()
        }

    def _uses_ignored(self, data_samples):
        """mmdet's assigner uses ignored boxes (``ignore_iof_thr > 0``)."""
        return self.head.assigner.ignore_iof_thr > 0 and any(
            'ignored_instances' in s and len(s.ignored_instances)
            for s in data_samples)

    def _loss_per_group(self, feats, data_samples, groups):
        """mmdet's ``loss_by_feat`` per group of one batched forward."""
        from mmdet.models.utils import unpack_gt_instances
        outs = self.head(feats)
        losses = {}
        for g in range(groups):
            gt, ignored, metas = unpack_gt_instances(
                data_samples[g::groups])
            part = [[o[g::groups] for o in out] for out in outs]
            for name, value in self.head.loss_by_feat(
                    *part, gt, metas, ignored).items():
                if isinstance(value, (list, tuple)):
                    value = sum(value)
                losses[name] = losses.get(name, 0.) + value / groups
        return losses

    def _loss_batched(self, feats, data_samples, groups=1):
        """``head.loss`` with the targets of :func:`anchor_targets`."""
        cls_scores, bbox_preds = self.head(feats)
        gt_instances = [s.gt_instances for s in data_samples]
        img_metas = [s.metainfo for s in data_samples]
        *targets, avg_factor = anchor_targets(
            self.head, [c.shape[-2:] for c in cls_scores], gt_instances,
            img_metas, cls_scores[0].device, cache=self._anchor_cache)
        if groups > 1:
            targets, avg_factor = _per_group_weights(targets, groups)
        loss_cls, loss_bbox = [], []
        for level in zip(cls_scores, bbox_preds, *targets):
            cls, box = self.head.loss_by_feat_single(
                *level, avg_factor=avg_factor)
            loss_cls.append(cls)
            loss_bbox.append(box)
        return dict(loss_cls=loss_cls, loss_bbox=loss_bbox)
