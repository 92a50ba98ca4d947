"""Anchor targets of a whole batch at once, equal to mmdet's per-image path.

mmdet's ``AnchorHead.get_targets`` assigns every image separately
(``MaxIoUAssigner`` + ``PseudoSampler``), with a Python loop over the ground
truth boxes for the low-quality matches; on a GPU each loop step and each
``nonzero`` waits for the device. A local learner runs one auxiliary
detection head per module, so it would pay this K times per iteration. This
module computes the same targets for all images with a fixed number of
tensor ops and no host synchronisation:

- IoU of the padded ground truth ``(B, G, 4)`` with the anchors ``(A, 4)``
  (mmdet's ``bbox_overlaps``), padded boxes and invalid anchors at -1;
- ``MaxIoUAssigner.assign_wrt_overlaps`` vectorised: negatives, positives,
  then the low-quality matches, where a later box overwrites an earlier one
  as mmdet's loop does (the largest matching box index wins);
- labels, label weights, box deltas (the head's own ``bbox_coder``) and
  weights as ``AnchorHead._get_targets_single`` builds them, and
  ``avg_factor`` (positives, at least one per image) as a tensor.

:func:`unsupported_reason` lists the head configurations this covers (every
RetinaNet-style head with the defaults of :class:`DetAuxHead`); for any other
the auxiliary head uses mmdet's own ``loss``.
"""
import collections

import torch
from mmdet.models.dense_heads import AnchorHead
from mmdet.models.task_modules.assigners import BboxOverlaps2D, MaxIoUAssigner
from mmdet.models.task_modules.samplers import PseudoSampler
from mmdet.structures.bbox import bbox_overlaps, get_box_tensor


def unsupported_reason(head):
    """Why ``head`` needs mmdet's per-image targets (None when it does
    not)."""
    if not isinstance(head, AnchorHead):
        return f'{type(head).__name__} is not an AnchorHead'
    for name in ('loss_by_feat', 'get_targets', '_get_targets_single',
                 'get_anchors'):
        if getattr(type(head), name) is not getattr(AnchorHead, name):
            return f'{type(head).__name__} overrides {name}'
    assigner, sampler = getattr(head, 'assigner', None), getattr(
        head, 'sampler', None)
    if type(assigner) is not MaxIoUAssigner:
        return f'assigner {type(assigner).__name__} is not MaxIoUAssigner'
    if type(sampler) is not PseudoSampler:
        return f'sampler {type(sampler).__name__} is not PseudoSampler'
    calc = assigner.iou_calculator
    if type(calc) is not BboxOverlaps2D or calc.dtype is not None:
        return 'the assigner IoU is not a plain fp32 BboxOverlaps2D'
    if assigner.perm_repeat_gt_cfg is not None:
        return 'perm_repeat_gt_cfg is set'
    if head.reg_decoded_bbox:
        return 'reg_decoded_bbox=True'
    if head.train_cfg.get('allowed_border', -1) >= 0:
        return 'allowed_border >= 0'
    return None


def _level_sizes(head, featmap_sizes):
    gen = head.prior_generator
    return [
        int(h) * int(w) * n
        for (h, w), n in zip(featmap_sizes, gen.num_base_anchors)
    ]


_CACHE_SIZE = 16


def _cached(cache, key, make):
    """``cache[key]``, made by ``make()`` on a miss (oldest dropped)."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _anchors_and_valid(head, featmap_sizes, img_metas, device, cache=None):
    """Anchors ``(A, 4)`` and valid flags ``(B, A)``; they depend only on
    the feature map sizes and the images' pad shapes, so with a ``cache``
    (an ``OrderedDict``) they are made once per shape, not every step."""
    gen = head.prior_generator
    cache = collections.OrderedDict() if cache is None else cache
    sizes = tuple(tuple(int(v) for v in s) for s in featmap_sizes)
    device = torch.device(device)
    anchors = _cached(
        cache, ('anchors', sizes, device),
        lambda: torch.cat(gen.grid_priors(sizes, device=device)))
    valid = []
    for meta in img_metas:
        pad = tuple(int(v) for v in meta['pad_shape'][:2])
        valid.append(_cached(
            cache, ('valid', sizes, pad, device),
            lambda: torch.cat(gen.valid_flags(sizes, pad, device=device))))
    return anchors, torch.stack(valid)


def _pad_ground_truth(gt_instances, device):
    """``(B, G, 4)`` boxes (padding: a unit box), ``(B, G)`` labels and
    ``(B, G)`` mask of real boxes; ``G >= 1``."""
    num = max([len(g) for g in gt_instances] + [1])
    batch = len(gt_instances)
    boxes = torch.zeros(batch, num, 4, device=device)
    boxes[..., 2:] = 1.0
    labels = torch.zeros(batch, num, dtype=torch.long, device=device)
    mask = torch.zeros(batch, num, dtype=torch.bool, device=device)
    for i, gt in enumerate(gt_instances):
        n = len(gt)
        if n:
            boxes[i, :n] = get_box_tensor(gt.bboxes).to(boxes)
            labels[i, :n] = gt.labels.to(device)
            mask[i, :n] = True
    return boxes, labels, mask


def assign(overlaps, gt_mask, valid, assigner):
    """``MaxIoUAssigner.assign_wrt_overlaps`` for a batch.

    Args:
        overlaps (Tensor): ``(B, G, A)`` IoU of boxes with anchors.
        gt_mask (Tensor): ``(B, G)`` real (not padding) boxes.
        valid (Tensor): ``(B, A)`` anchors mmdet assigns (inside flags).
        assigner (MaxIoUAssigner): thresholds and options.

    Returns:
        Tensor: ``(B, A)`` long, as mmdet's ``gt_inds`` on valid anchors:
        -1 ignored, 0 negative, ``i + 1`` box ``i``.
    """
    overlaps = overlaps.masked_fill(~gt_mask[:, :, None], -1.0)
    overlaps = overlaps.masked_fill(~valid[:, None, :], -1.0)
    max_ov, argmax = overlaps.max(dim=1)  # per anchor
    gt_max, gt_argmax = overlaps.max(dim=2)  # per box
    gt_inds = torch.full_like(argmax, -1)
    neg = assigner.neg_iou_thr
    if isinstance(neg, tuple):
        gt_inds[(max_ov >= neg[0]) & (max_ov < neg[1])] = 0
    else:
        gt_inds[(max_ov >= 0) & (max_ov < neg)] = 0
    pos = max_ov >= assigner.pos_iou_thr
    gt_inds = torch.where(pos, argmax + 1, gt_inds)
    if assigner.match_low_quality:
        ok = gt_mask & (gt_max >= assigner.min_pos_iou)
        if assigner.gt_max_assign_all:
            hit = overlaps == gt_max[:, :, None]
        else:
            hit = torch.zeros_like(overlaps, dtype=torch.bool)
            hit.scatter_(2, gt_argmax[:, :, None], True)
        hit &= ok[:, :, None]
        index = torch.arange(
            1, overlaps.size(1) + 1, device=overlaps.device)[None, :, None]
        last = torch.where(hit, index, 0).amax(dim=1)  # mmdet: later wins
        gt_inds = torch.where(last > 0, last, gt_inds)
    # an image without boxes: every anchor is background
    return torch.where(gt_mask.any(dim=1, keepdim=True), gt_inds,
                       torch.zeros_like(gt_inds))


def anchor_targets(head, featmap_sizes, gt_instances, img_metas, device,
                   cache=None):
    """Targets of ``head`` (an :class:`AnchorHead`) for a batch.

    ``cache`` (an ``OrderedDict`` kept by the caller) holds the anchors and
    valid flags of the last shapes seen.

    Returns:
        tuple: per-level lists of ``anchors (B, A_l, 4)``, ``labels``,
        ``label_weights``, ``bbox_targets``, ``bbox_weights``, and
        ``avg_factor`` (a 0-dim tensor: the number of positives, at least
        one per image, as mmdet's ``SamplingResult``), as the
        arguments of ``AnchorHead.loss_by_feat_single``.
    """
    anchors, valid = _anchors_and_valid(head, featmap_sizes, img_metas,
                                        device, cache)
    boxes, labels, gt_mask = _pad_ground_truth(gt_instances, device)
    batch, num_anchors = valid.shape
    overlaps = bbox_overlaps(
        boxes, anchors[None].expand(batch, -1, -1).to(boxes.dtype))
    gt_inds = assign(overlaps, gt_mask, valid, head.assigner)
    del overlaps

    pos = (gt_inds > 0) & valid
    counted = (gt_inds >= 0) & valid
    matched = (gt_inds - 1).clamp(min=0)
    target_labels = torch.where(pos, labels.gather(1, matched),
                                head.num_classes)
    pos_weight = head.train_cfg.get('pos_weight', -1)
    label_weights = counted.float()
    if pos_weight > 0:
        label_weights = torch.where(pos, float(pos_weight), label_weights)
    matched_boxes = boxes.gather(1, matched[..., None].expand(-1, -1, 4))
    deltas = head.bbox_coder.encode(
        anchors[None].expand(batch, -1, -1).reshape(-1, 4),
        matched_boxes.reshape(-1, 4)).view(batch, num_anchors, -1)
    bbox_weights = pos[..., None].expand_as(deltas).to(deltas.dtype)
    bbox_targets = torch.where(pos[..., None], deltas, 0.0)
    # mmdet's SamplingResult counts max(num_pos, 1) per image
    avg_factor = pos.sum(dim=1).clamp(min=1).sum().float()

    sizes = _level_sizes(head, featmap_sizes)
    per_image_anchors = anchors[None].expand(batch, -1, -1)
    out = [
        t.split(sizes, dim=1)
        for t in (per_image_anchors, target_labels, label_weights,
                  bbox_targets, bbox_weights)
    ]
    return (*out, avg_factor)
