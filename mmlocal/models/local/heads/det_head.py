import collections
import copy

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmdet.models.dense_heads import AnchorHead
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.losses import FocalLoss
from mmdet.models.utils import unpack_gt_instances
from mmengine.model import BaseModule, ModuleList, Sequential

from mmlocal.models.losses.sync_free_losses import (FusedFocalLoss,
                                                    SyncFreeL1Loss,
                                                    SyncFreeSmoothL1Loss,
                                                    sync_free_loss)
from mmlocal.registry import MODELS
from mmlocal.utils.compile import CompiledMethods, check_compile_option
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

# the auxiliary RetinaNet head of each style (DetAuxHead's table)
_FOCAL = dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
              alpha=0.25, loss_weight=1.0)
_CODER = dict(type='mmdet.DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
              target_stds=[1.0, 1.0, 1.0, 1.0])
_STYLES = dict(
    mmlocal=dict(
        feat_channels=128,
        num_levels=1,
        norm_cfg=dict(type='BN'),
        relu_first=False,
        init_std=None,
        train_cfg=_DEFAULT_TRAIN_CFG,
        head=dict(
            type='mmdet.RetinaHead',
            stacked_convs=2,
            anchor_generator=dict(
                type='mmdet.AnchorGenerator',
                octave_base_scale=4,
                scales_per_octave=1,
                ratios=[0.5, 1.0, 2.0]),
            bbox_coder=_CODER,
            loss_cls=_FOCAL,
            loss_bbox=dict(type='mmdet.L1Loss', loss_weight=1.0))),
    # MAN_PlusPlus Exp_on_COCO/networks/retinanet.py: AuxiliaryDetectionHead
    # (projection, extra levels, 2-conv subnets), Anchors (9 per location,
    # size 4 x stride, centred), FocalLoss (IoU >= 0.5 / < 0.4, no
    # low-quality matches, smooth L1)
    reference=dict(
        feat_channels=256,
        num_levels={32: 3},
        norm_cfg=None,
        relu_first=True,
        init_std=0.01,
        train_cfg=dict(_DEFAULT_TRAIN_CFG, assigner=dict(
            _DEFAULT_TRAIN_CFG['assigner'], match_low_quality=False)),
        head=dict(
            type='mmdet.RetinaHead',
            stacked_convs=2,
            anchor_generator=dict(
                type='mmdet.AnchorGenerator',
                octave_base_scale=4,
                scales_per_octave=3,
                ratios=[0.5, 1.0, 2.0],
                center_offset=0.5),
            bbox_coder=_CODER,
            loss_cls=_FOCAL,
            loss_bbox=dict(type='mmdet.SmoothL1Loss', beta=1.0,
                           loss_weight=1.0))))


class _Unset:
    """An argument left to the ``style`` preset."""

    def __repr__(self):
        return '<style default>'


_UNSET = _Unset()


def _levels_at(num_levels, first_stride):
    """Levels of a head whose first level has ``first_stride``."""
    if isinstance(num_levels, dict):
        bad = {k: v for k, v in num_levels.items()
               if not (str(k).isdigit() and isinstance(v, int) and v >= 1)}
        if bad:
            raise ValueError(f'num_levels={num_levels!r}: keys must be '
                             f'strides and values ints >= 1 (bad: {bad})')
        return {int(k): v for k, v in num_levels.items()}.get(first_stride, 1)
    if not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f'num_levels={num_levels!r} must be an int >= 1 or '
                         'a dict {stride: levels}')
    return num_levels


def _sum(values):
    """``sum(values)`` without adding a first 0 (one kernel fewer)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


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


def _sums_weighted_terms(head):
    """``head``'s level losses are mmdet's ``loss_by_feat_single`` with a
    focal loss and an L1 / smooth L1 box loss (the twins of
    :func:`sync_free_loss`): each is ``sum(term * weight) / (avg_factor +
    eps)``, so with weights already divided by ``avg_factor + eps`` it
    is their ``'sum'`` (:meth:`DetAuxHead._level_losses`)."""
    return (type(head).loss_by_feat_single is
            AnchorHead.loss_by_feat_single
            and type(getattr(head, 'loss_cls', None)) in (FocalLoss,
                                                          FusedFocalLoss)
            and type(getattr(head, 'loss_bbox', None)) in (
                SyncFreeL1Loss, SyncFreeSmoothL1Loss)
            and head.loss_cls.reduction == 'mean'
            and head.loss_bbox.reduction == 'mean')


@MODELS.register_module()
class DetAuxHead(BaseModule):
    """A light dense detection head that trains one local module.

    Follows the auxiliary detection head of MAN++'s COCO RetinaNet
    (Su et al., TPAMI 2026; ``Exp_on_COCO/networks/retinanet.py``,
    ``AuxiliaryDetectionHead``): a 1x1 projection of the module's feature
    ``y``, stride-2 3x3 convs for further pyramid levels, and a RetinaNet
    head with 2 stacked convs (the main head has 4), its own anchors, focal
    loss and box regression, assigned with mmdet's ``MaxIoUAssigner``.

    Level ``l`` has stride ``max(stride, min_stride) * 2**l``; a feature finer
    than ``min_stride`` is first brought there by stride-2 convs (anchors at
    stride 4 would multiply the head's cost for little signal).

    Two presets (``style``) fill every argument left unset:

    ========================  ====================  ======================
    argument                  ``'mmlocal'``         ``'reference'``
    ========================  ====================  ======================
    ``feat_channels``         128                   256
    ``norm_cfg``              BN                    None (conv bias)
    ``num_levels``            1                     ``{32: 3}``: P5-P7 for
                                                    a stride-32 feature,
                                                    else 1
    anchors per location      3 (scale 4, 3         9 (3 scales per
                              ratios), centre at    octave), centre at
                              the cell's corner     the cell's centre
    box loss                  L1                    smooth L1 (beta 1)
    low-quality matches       yes (mmdet RetinaNet  no
                              default)
    ``relu_first``            False (conv-BN-ReLU)  True (ReLU, conv)
    ``init_std``              None (kaiming)        0.01
    ========================  ====================  ======================

    ``'reference'`` is the reference's head; what still differs from it is
    listed in ``docs/methods/man.md`` ("DetAuxHead vs MAN++ reference
    head"). ``'mmlocal'`` (default) is lighter (128 channels, 3 anchors).

    Args:
        in_channels (int): Channels of ``y``.
        stride (int): Stride of ``y`` w.r.t. the input image.
        num_classes (int): Number of object classes.
        feat_channels (int): Width of the projection and head.
        num_levels (int | dict): Pyramid levels the head predicts on, or a
            dict ``{first level stride: levels}`` (strides not in it: 1).
        min_stride (int): Finest stride used. Default 8.
        head (dict): Config of the mmdet dense head; ``in_channels``,
            ``feat_channels``, ``num_classes`` and the anchor strides are
            filled in. Default: the style's ``mmdet.RetinaHead`` with 2
            stacked convs.
        train_cfg (dict): Assigner/sampler config of the head.
        norm_cfg (dict | None): Norm of the projection convs.
        relu_first (bool): The stride-2 convs are ``ReLU -> conv`` (the
            reference's; the level fed to the head is not rectified)
            instead of ``conv -> norm -> ReLU``.
        init_std (float | None): Normal init (std, zero bias) of the
            projection and stride-2 convs instead of mmcv's kaiming init.
        style (str): ``'mmlocal'`` or ``'reference'``: the defaults above.
        compile (bool | dict): Run :meth:`predict` (projection, levels,
            head convs; static shapes) under ``torch.compile``
            (:mod:`mmlocal.utils.compile`; not with CUDA graphs). Targets
            and losses stay eager. Default False.
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
                 feat_channels=_UNSET,
                 num_levels=_UNSET,
                 min_stride=8,
                 head=_UNSET,
                 train_cfg=_UNSET,
                 norm_cfg=_UNSET,
                 batched_targets=True,
                 relu_first=_UNSET,
                 init_std=_UNSET,
                 style='mmlocal',
                 compile=False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        # the convolutional part (predict) under torch.compile
        self.compiled = CompiledMethods(
            check_compile_option(compile, cudagraphs=False))
        if style not in _STYLES:
            raise ValueError(f'style={style!r} must be one of '
                             f'{sorted(_STYLES)}')
        given = dict(feat_channels=feat_channels, num_levels=num_levels,
                     head=head, train_cfg=train_cfg, norm_cfg=norm_cfg,
                     relu_first=relu_first, init_std=init_std)
        cfg = {k: copy.deepcopy(_STYLES[style][k] if v is _UNSET else v)
               for k, v in given.items()}
        if cfg['head'] is None:  # as before presets: None = the default
            cfg['head'] = copy.deepcopy(_STYLES[style]['head'])
        if cfg['train_cfg'] is None:
            cfg['train_cfg'] = copy.deepcopy(_STYLES[style]['train_cfg'])
        feat_channels, norm_cfg = cfg['feat_channels'], cfg['norm_cfg']
        self.style = style
        self.in_channels = in_channels
        self.stride = stride
        self.num_classes = num_classes
        self.init_std = cfg['init_std']

        self.input_proj = ConvModule(
            in_channels, feat_channels, 1, norm_cfg=norm_cfg)
        down = dict(kernel_size=3, stride=2, padding=1, norm_cfg=norm_cfg)
        if cfg['relu_first']:
            # ReLU -> conv; not in place: the level before is a head input
            down.update(order=('act', 'conv', 'norm'),
                        act_cfg=dict(type='ReLU', inplace=False))
        downs = []
        first_stride = stride
        while first_stride < min_stride:
            downs.append(ConvModule(feat_channels, feat_channels, **down))
            first_stride *= 2
        num_levels = _levels_at(cfg['num_levels'], first_stride)
        self.to_first_level = Sequential(*downs)
        self.level_convs = ModuleList([
            ConvModule(feat_channels, feat_channels, **down)
            for _ in range(num_levels - 1)
        ])
        self.strides = [first_stride * 2**i for i in range(num_levels)]
        self._init_projection()

        head = cfg['head']
        head.update(
            num_classes=num_classes,
            in_channels=feat_channels,
            feat_channels=feat_channels,
            train_cfg=cfg['train_cfg'])
        if 'anchor_generator' in head:
            head['anchor_generator']['strides'] = list(self.strides)
        elif 'prior_generator' in head:
            head['prior_generator']['strides'] = list(self.strides)
        # nested builds (anchors, coder, losses, assigner) run in mmdet scope
        head.setdefault('_scope_', 'mmdet')
        self.head = MODELS.build(head)
        # mmdet's L1/smooth L1 read `any(weight > 0)` on the host per level;
        # the focal loss: FusedFocalLoss (fewer kernels, same values)
        for name in ('loss_cls', 'loss_bbox'):
            if isinstance(getattr(self.head, name, None), nn.Module):
                setattr(self.head, name,
                        sync_free_loss(getattr(self.head, name)))
        self.batched_targets_unsupported = unsupported_reason(self.head)
        self.batched_targets = bool(batched_targets) and \
            self.batched_targets_unsupported is None
        # batched targets with weights divided by the normaliser, summed
        # by the losses (_loss_batched)
        self.normalised_targets = self.batched_targets and \
            _sums_weighted_terms(self.head)
        self._anchor_cache = collections.OrderedDict()  # not state
        # set by share_anchor_targets (LocalLearner): targets of every aux
        # head computed in one pass per batch
        self.shared_targets = None

    def _init_projection(self):
        """``init_std``: normal init of the projection and stride-2 convs
        (the reference's); after mmcv's own init of ``ConvModule``."""
        if self.init_std is None:
            return
        for module in (self.input_proj, self.to_first_level,
                       self.level_convs):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0, self.init_std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def init_weights(self):
        super().init_weights()
        self._init_projection()

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
        if groups == 1 and not self.batched_targets and \
                type(self.head).loss is not BaseDenseHead.loss:
            # a head with its own loss(): mmdet's path as it is
            losses = self.head.loss(self(y), data_samples)
        else:
            outs = self.compiled(self, 'predict', y)
            if self.batched_targets and \
                    not self._uses_ignored(data_samples):
                losses = self._loss_batched(outs, data_samples, groups)
            elif groups > 1:
                losses = self._loss_per_group(outs, data_samples, groups)
            else:  # BaseDenseHead.loss on outs
                gt, ignored, metas = unpack_gt_instances(data_samples)
                losses = self.head.loss_by_feat(*outs, gt, metas, ignored)
        # mmdet returns per-level lists; sum them to one term per kind
        return {
            name: _sum(value) if isinstance(value, (list, tuple)) else value
            for name, value in losses.items()
        }

    def predict(self, y):
        """``(cls_scores, bbox_preds)``: the convolutional part (run under
        ``torch.compile`` with ``compile``)."""
        return self.head(self(y))

    def _uses_ignored(self, data_samples):
        """mmdet's assigner uses ignored boxes (``ignore_iof_thr > 0``)."""
        return self.head.assigner.ignore_iof_thr > 0 and any(
            'ignored_instances' in s and len(s.ignored_instances)
            for s in data_samples)

    def _loss_per_group(self, outs, data_samples, groups):
        """mmdet's ``loss_by_feat`` per group of one batched forward."""
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

    def _loss_batched(self, outs, data_samples, groups=1):
        """``head.loss`` with the targets of :func:`anchor_targets`."""
        cls_scores, bbox_preds = outs
        gt_instances = [s.gt_instances for s in data_samples]
        img_metas = [s.metainfo for s in data_samples]
        sizes = [c.shape[-2:] for c in cls_scores]
        shared = None
        normalise = self.normalised_targets and groups == 1
        if groups == 1 and self.shared_targets is not None:
            # computed once per batch for every aux head of the learner
            shared = self.shared_targets.targets(
                self, sizes, data_samples, cls_scores[0].device)
        *targets, avg_factor = shared or anchor_targets(
            self.head, sizes, gt_instances, img_metas, cls_scores[0].device,
            cache=self._anchor_cache, normalise=normalise)
        if groups > 1:
            targets, avg_factor = _per_group_weights(targets, groups)
        loss_cls, loss_bbox = [], []
        for level in zip(cls_scores, bbox_preds, *targets):
            if avg_factor is None:  # weights divided by the normaliser
                cls, box = self._level_losses(*level)
            else:
                cls, box = self.head.loss_by_feat_single(
                    *level, avg_factor=avg_factor)
            loss_cls.append(cls)
            loss_bbox.append(box)
        return dict(loss_cls=loss_cls, loss_bbox=loss_bbox)

    def _level_losses(self, cls_score, bbox_pred, anchors, labels,
                      label_weights, bbox_targets, bbox_weights):
        """``AnchorHead.loss_by_feat_single`` for weights already divided
        by ``avg_factor + eps`` (``normalise`` of :func:`anchor_targets`):
        the same terms as a weighted ``'sum'``, which the focal loss runs
        as :class:`~mmlocal.models.losses.sync_free_losses.WeightedFocalSum`
        on a GPU."""
        head = self.head
        cls_score = cls_score.permute(0, 2, 3, 1).reshape(
            -1, head.cls_out_channels)
        loss_cls = head.loss_cls(
            cls_score, labels.reshape(-1), label_weights.reshape(-1),
            reduction_override='sum')
        dim = bbox_targets.size(-1)
        bbox_pred = bbox_pred.permute(0, 2, 3, 1).reshape(
            -1, head.bbox_coder.encode_size)
        loss_bbox = head.loss_bbox(
            bbox_pred, bbox_targets.reshape(-1, dim),
            bbox_weights.reshape(-1, dim), reduction_override='sum')
        return loss_cls, loss_bbox
