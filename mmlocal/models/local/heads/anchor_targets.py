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

:func:`multi_anchor_targets` does this for several heads in one pass: the
anchors of all heads are concatenated, so the IoU, the assignment, the box
encoding and the padding of the ground truth run once per batch instead of
once per head. Each head keeps its own low-quality matches (a box's best
anchors are searched among that head's anchors only) and its own
``avg_factor``, so every head gets exactly the targets it would get alone.
:class:`SharedAnchorTargets` makes the auxiliary detection heads of a
``LocalLearner`` use it: the first head that needs targets in an iteration
computes them for every head of the group (predicting the others' feature
map sizes from the batch shape and checking them when they are used).

:func:`unsupported_reason` lists the head configurations this covers (every
RetinaNet-style head with the defaults of :class:`DetAuxHead`); for any other
the auxiliary head uses mmdet's own ``loss``.
"""
import collections
import math
import weakref

import torch
from mmdet.models.dense_heads import AnchorHead
from mmdet.models.task_modules.assigners import BboxOverlaps2D, MaxIoUAssigner
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmdet.models.task_modules.samplers import PseudoSampler
from mmdet.structures.bbox import get_box_tensor


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


_CACHE_SIZE = 32
# mmdet's weight_reduce_loss: loss.sum() / (avg_factor + eps)
_EPS = torch.finfo(torch.float32).eps


def _cached(cache, key, make):
    """``cache[key]``, made by ``make()`` on a miss (oldest dropped)."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _sizes_key(featmap_sizes):
    return tuple(tuple(int(v) for v in s) for s in featmap_sizes)


# configuration keys, made once per object (the configs do not change)
_GENERATOR_KEYS = weakref.WeakKeyDictionary()
_SIGNATURES = weakref.WeakKeyDictionary()


def _attrs(obj):
    return tuple(sorted((k, repr(v)) for k, v in vars(obj).items()))


def _generator_key(head):
    """Equal for heads whose prior generators make the same anchors."""
    gen = head.prior_generator
    key = _GENERATOR_KEYS.get(gen)
    if key is None:  # its settings and its base anchors (CPU tensors)
        key = _GENERATOR_KEYS[gen] = (type(gen).__name__, repr(gen), tuple(
            tuple(map(tuple, base.tolist())) for base in gen.base_anchors))
    return key


def target_signature(head):
    """Heads with equal signatures assign and encode their anchors alike
    (assigner, box coder, ``pos_weight``, classes), so one
    :func:`multi_anchor_targets` pass serves them all."""
    sig = _SIGNATURES.get(head)
    if sig is None:
        assigner, coder = head.assigner, head.bbox_coder
        sig = _SIGNATURES[head] = (
            type(assigner).__name__, _attrs(assigner), type(coder).__name__,
            _attrs(coder), head.train_cfg.get('pos_weight', -1),
            head.num_classes)
    return sig


def _anchors_and_valid(parts, img_metas, device, cache=None):
    """Anchors ``(A, 4)``, valid flags ``(B, A)``, ``valid - 1`` as long
    (:func:`assign`'s targets of an image without boxes) and the anchors'
    centres and sizes (:func:`_encode_deltas`) of the anchor sets
    ``parts`` (``(head, featmap_sizes)`` pairs) one after another. They
    depend only on the feature map sizes and the images' pad shapes, so with
    a ``cache`` (an ``OrderedDict``) they are made once per shape, not every
    step."""
    cache = collections.OrderedDict() if cache is None else cache
    device = torch.device(device)
    keys = tuple((_generator_key(h), _sizes_key(s)) for h, s in parts)

    def anchors_of():
        anchors = torch.cat([
            a for h, s in parts
            for a in h.prior_generator.grid_priors(s, device=device)
        ])
        # (cx, cy, w, h) - offset, / scale: the deltas of _encode_deltas
        # before the log of their sizes; area: the IoU's (_box_iou)
        a = anchors.float()
        lo, hi = a[:, :2], a[:, 2:]
        centre, size = (lo + hi) * 0.5, hi - lo
        return anchors, (torch.cat([centre, torch.zeros_like(centre)], 1),
                         torch.cat([size, size], 1), size[:, 0] * size[:, 1])

    def valid_of(pad):
        return lambda: torch.cat([
            v for h, s in parts
            for v in h.prior_generator.valid_flags(s, pad, device=device)
        ])

    def stacked(pads):
        def make():
            valid = torch.stack([
                _cached(cache, ('valid', keys, pad, device), valid_of(pad))
                for pad in pads
            ])
            return valid, valid.long() - 1
        return make

    anchors, terms = _cached(cache, ('anchors', keys, device), anchors_of)
    pads = tuple(tuple(int(v) for v in meta['pad_shape'][:2])
                 for meta in img_metas)
    valid, background = _cached(cache, ('batch', keys, pads, device),
                                stacked(pads))
    return anchors, valid, background, terms


def _pad_ground_truth(gt_instances, device):
    """``(B, G, 4)`` boxes (padding: an empty box at the origin), ``(B, G)``
    labels (padding: -1) and ``(B, G)`` mask of real boxes; ``G >= 1``."""
    counts = [len(g) for g in gt_instances]
    num = max(counts + [1])
    boxes, labels = [], []
    for gt, n in zip(gt_instances, counts):
        box = get_box_tensor(gt.bboxes).to(device=device, dtype=torch.float32)
        label = gt.labels.to(device=device, dtype=torch.long)
        if n < num:
            box = torch.nn.functional.pad(box.reshape(n, 4),
                                          (0, 0, 0, num - n))
            label = torch.nn.functional.pad(label, (0, num - n), value=-1)
        boxes.append(box)
        labels.append(label)
    labels = torch.stack(labels)
    return torch.stack(boxes), labels, labels >= 0


def _segment_index(segments, device, cache):
    """``(A,)`` index of the segment each anchor belongs to."""
    return _cached(
        cache, ('segments', tuple(segments), device),
        lambda: torch.repeat_interleave(
            torch.arange(len(segments), device=device),
            torch.tensor(segments, device=device)))


def assign(overlaps, gt_mask, valid, assigner, segments=None, cache=None,
           background=None, every_image_has_boxes=False):
    """``MaxIoUAssigner.assign_wrt_overlaps`` for a batch.

    Args:
        overlaps (Tensor): ``(B, G, A)`` IoU of boxes with anchors.
        gt_mask (Tensor): ``(B, G)`` real (not padding) boxes.
        valid (Tensor): ``(B, A)`` anchors mmdet assigns (inside flags).
        assigner (MaxIoUAssigner): thresholds and options.
        segments (list[int], optional): Anchors of each head, one after
            another (:func:`multi_anchor_targets`): a box's low-quality
            matches are searched per head. Default: one head.
        cache (OrderedDict, optional): keeps the segment index.
        background (Tensor, optional): ``valid.long() - 1``, if cached.
        every_image_has_boxes (bool): Known on the host (the ground truth
            counts): no image needs the all-background assignment, and
            its two kernels are skipped.

    Returns:
        Tensor: ``(B, A)`` long, as mmdet's ``gt_inds`` on valid anchors:
        -1 ignored, 0 negative, ``i + 1`` box ``i``; -1 on invalid anchors.
    """
    keep = gt_mask[:, :, None] & valid[:, None, :]
    overlaps = torch.where(keep, overlaps,
                           _constant(-1.0, overlaps.dtype, overlaps.device))
    max_ov, argmax = overlaps.max(dim=1)  # per anchor
    neg = assigner.neg_iou_thr
    low, high = neg if isinstance(neg, tuple) else (0, neg)
    device = overlaps.device
    gt_inds = torch.where((max_ov >= low) & (max_ov < high),
                          _constant(0, torch.long, device),
                          _constant(-1, torch.long, device))
    gt_inds = torch.where(max_ov >= assigner.pos_iou_thr, argmax + 1,
                          gt_inds)
    if assigner.match_low_quality:
        hit = _low_quality_hits(overlaps, gt_mask, assigner, segments,
                                cache)
        num = overlaps.size(1)
        index = _cached(
            collections.OrderedDict() if cache is None else cache,
            ('box index', num, device),
            lambda: torch.arange(1, num + 1, device=device)[None, :, None])
        last = torch.where(hit, index, _constant(0, torch.long, device))
        last = last.amax(dim=1)  # mmdet: the later box wins
        gt_inds = torch.where(last > 0, last, gt_inds)
    if every_image_has_boxes:
        return gt_inds
    # an image without boxes: every valid anchor is background
    background = valid.long() - 1 if background is None else background
    return torch.where(gt_mask.any(dim=1, keepdim=True), gt_inds,
                       background)


def _low_quality_hits(overlaps, gt_mask, assigner, segments, cache):
    """``(B, G, A)``: anchor ``a`` is a best anchor of box ``g`` (among its
    head's anchors) and that box may take it (``min_pos_iou``)."""
    if segments is None or len(segments) == 1:
        gt_max, gt_argmax = overlaps.max(dim=2)  # per box
        ok = gt_mask & (gt_max >= assigner.min_pos_iou)
        if assigner.gt_max_assign_all:
            return (overlaps == gt_max[:, :, None]) & ok[:, :, None]
        hit = torch.zeros_like(overlaps, dtype=torch.bool)
        return hit.scatter_(2, gt_argmax[:, :, None], ok[:, :, None])
    cache = collections.OrderedDict() if cache is None else cache
    best = [part.max(dim=2) for part in overlaps.split(segments, dim=2)]
    gt_max = torch.stack([b.values for b in best], dim=2)  # (B, G, heads)
    ok = gt_mask[:, :, None] & (gt_max >= assigner.min_pos_iou)
    if assigner.gt_max_assign_all:
        seg = _segment_index(segments, overlaps.device, cache)
        return (overlaps == gt_max.index_select(2, seg)) & \
            ok.index_select(2, seg)
    starts = [0]
    for size in segments[:-1]:
        starts.append(starts[-1] + size)
    gt_argmax = torch.stack(
        [b.indices + start for b, start in zip(best, starts)], dim=2)
    hit = torch.zeros_like(overlaps, dtype=torch.bool)
    return hit.scatter_(2, gt_argmax, ok)


def anchor_targets(head, featmap_sizes, gt_instances, img_metas, device,
                   cache=None, normalise=False):
    """Targets of ``head`` (an :class:`AnchorHead`) for a batch.

    ``cache`` (an ``OrderedDict`` kept by the caller) holds the anchors and
    valid flags of the last shapes seen.

    Returns:
        tuple: per-level lists of ``anchors (B, A_l, 4)``, ``labels``,
        ``label_weights``, ``bbox_targets``, ``bbox_weights``, and
        ``avg_factor`` (a 0-dim tensor: the number of positives, at least
        one per image, as mmdet's ``SamplingResult``), as the
        arguments of ``AnchorHead.loss_by_feat_single``. With
        ``normalise`` (:func:`multi_anchor_targets`) the weights are
        divided by ``avg_factor + eps`` and ``avg_factor`` is None.
    """
    return multi_anchor_targets([(head, featmap_sizes)], gt_instances,
                                img_metas, device, cache, normalise)[0]


def multi_anchor_targets(requests, gt_instances, img_metas, device,
                         cache=None, normalise=False):
    """:func:`anchor_targets` of several heads in one pass.

    Args:
        requests (list[tuple]): ``(head, featmap_sizes)`` pairs; the heads
            have equal :func:`target_signature`. Heads with the same anchor
            generator and sizes share their anchors.
        gt_instances, img_metas: Of the batch.
        device: Of the targets.
        cache (OrderedDict, optional): Kept by the caller: anchors, valid
            flags and layouts of the last shapes seen.
        normalise (bool): Divide each head's label and box weights by its
            normaliser ``avg_factor + eps`` (``eps``: mmdet's
            ``weight_reduce_loss``) and return ``avg_factor=None``: a loss
            that is linear in its weights then gives mmdet's ``mean`` with
            ``avg_factor`` as a plain weighted ``sum``, in fewer kernels
            per head and level (no addition and division of its own, in
            forward and backward). Default False.

    Returns:
        list[tuple]: One :func:`anchor_targets` result per request, equal
        to what each head gets alone.
    """
    if len({target_signature(h) for h, _ in requests}) != 1:
        raise ValueError('multi_anchor_targets: the heads assign or encode '
                         'differently (target_signature)')
    cache = collections.OrderedDict() if cache is None else cache
    device = torch.device(device)
    parts, part_of = [], []  # distinct anchor sets; the one of each request
    for head, sizes in requests:
        key = (_generator_key(head), _sizes_key(sizes))
        keys = [(_generator_key(h), _sizes_key(s)) for h, s in parts]
        if key not in keys:
            parts.append((head, sizes))
            keys.append(key)
        part_of.append(keys.index(key))
    head = requests[0][0]
    anchors, valid, background, anchor_terms = _anchors_and_valid(
        parts, img_metas, device, cache)
    segments = [sum(_level_sizes(h, s)) for h, s in parts]
    boxes, labels, gt_mask = _pad_ground_truth(gt_instances, device)
    batch, num_anchors = valid.shape
    box_terms = _box_terms(boxes)
    overlaps = _box_iou(boxes, box_terms, anchors, anchor_terms[2])
    gt_inds = assign(overlaps, gt_mask, valid, head.assigner, segments,
                     cache, background,
                     every_image_has_boxes=all(len(g) for g in gt_instances))
    del overlaps

    pos = gt_inds > 0
    matched = (gt_inds - 1).clamp(min=0)
    target_labels = torch.where(
        pos, labels.gather(1, matched),
        _constant(head.num_classes, labels.dtype, device))
    pos_weight = head.train_cfg.get('pos_weight', -1)
    # mmdet's SamplingResult counts max(num_pos, 1) per image
    if len(parts) == 1:
        avg_factors = pos.sum(dim=1).clamp(min=1).sum().float()[None]
    else:
        seg = _segment_index(segments, device, cache)
        # positives per image and head: a product with the anchors' 0/1
        # head matrix (exact: sums of 0/1 in fp32, TF32 too)
        heads = _cached(cache, ('segment matrix', tuple(segments), device),
                        lambda: torch.nn.functional.one_hot(
                            seg, len(segments)).float())
        counts = pos.float() @ heads
        avg_factors = counts.clamp(min=1).sum(dim=0)
    scale = None  # per anchor: 1 / (avg_factor + eps) of its head
    if normalise:
        scale = (avg_factors + _EPS).reciprocal()
        scale = scale if len(parts) == 1 else scale.index_select(0, seg)
    label_weights = gt_inds >= 0
    if pos_weight > 0:
        label_weights = torch.where(pos, float(pos_weight),
                                    label_weights.float())
    label_weights = label_weights.float() if scale is None else \
        label_weights * scale
    if _plain_delta_coder(head.bbox_coder):
        deltas = _encode_deltas(anchor_terms, box_terms, matched)
    else:
        matched_boxes = boxes.gather(1, matched[..., None].expand(-1, -1, 4))
        deltas = head.bbox_coder.encode(
            anchors[None].expand(batch, -1, -1).reshape(-1, 4),
            matched_boxes.reshape(-1, 4)).view(batch, num_anchors, -1)
    bbox_weights = pos.to(deltas.dtype) if scale is None else \
        (pos * scale).to(deltas.dtype)
    bbox_weights = bbox_weights[..., None].expand_as(deltas)
    bbox_targets = torch.where(pos[..., None], deltas,
                               _constant(0.0, deltas.dtype, device))
    avg_factors = [None] * len(parts) if normalise else avg_factors.unbind()

    # level blocks of every part; mmdet flattens each (B, A_l) block, so
    # they are laid out one after another (one gather per kind), not as
    # strided views of the (B, A) batch (one copy per kind and level)
    blocks = [_level_sizes(h, s) for h, s in parts]
    flat = [b for sizes in blocks for b in sizes]
    kinds = [target_labels, label_weights, bbox_targets, bbox_weights]
    if len(flat) > 1:
        order = _cached(cache, ('order', tuple(flat), batch, device),
                        lambda: _block_order(flat, batch, device))
        kinds = [
            t.reshape(batch * num_anchors, *t.shape[2:]).index_select(
                0, order) for t in kinds
        ]
    else:
        kinds = [t.reshape(batch * num_anchors, *t.shape[2:])
                 for t in kinds]
    per_image_anchors = anchors[None].expand(batch, -1, -1)
    split = [t.split([batch * b for b in flat]) for t in kinds]
    results, start = [], 0
    part_levels = []
    for sizes in blocks:
        part_levels.append(range(start, start + len(sizes)))
        start += len(sizes)
    anchor_parts = per_image_anchors.split(flat, dim=1)
    for p in part_of:
        levels = part_levels[p]
        out = [[anchor_parts[i] for i in levels]]
        for t in split:
            out.append([
                t[i].view(batch, -1, *t[i].shape[1:]) for i in levels
            ])
        results.append((*out, avg_factors[p]))
    return results


def _plain_delta_coder(coder):
    """A ``DeltaXYWHBBoxCoder`` with means 0 and stds 1 (the aux heads'):
    its ``encode`` is what :func:`_encode_deltas` computes."""
    return type(coder) is DeltaXYWHBBoxCoder and \
        tuple(coder.means) == (0., 0., 0., 0.) and \
        tuple(coder.stds) == (1., 1., 1., 1.)


def _box_terms(boxes):
    """``(B, G, 4)`` centres and sizes ``(cx, cy, w, h)`` of the boxes, as
    mmdet's box coder computes them (``(x1 + x2) * 0.5``, ``x2 - x1``)."""
    g = boxes.float()
    lo, hi = g[..., :2], g[..., 2:]
    return torch.cat([(lo + hi) * 0.5, hi - lo], dim=-1)


def _box_iou(boxes, box_terms, anchors, anchor_area):
    """mmdet's ``bbox_overlaps(boxes, anchors)`` (IoU, ``eps=1e-6``), with
    the same arithmetic, ``(B, G, A)``: the areas come from the boxes'
    sizes (:func:`_box_terms`) and the anchors' cached ones, and the
    ``eps`` floor is a clamp (mmdet: ``max`` with a tensor it makes from a
    list, a host-to-device copy on a GPU)."""
    anchors = anchors.to(boxes.dtype)
    area = box_terms[..., 2] * box_terms[..., 3]  # (B, G)
    lt = torch.max(boxes[..., :, None, :2], anchors[None, None, :, :2])
    rb = torch.min(boxes[..., :, None, 2:], anchors[None, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area[..., None] + anchor_area) - overlap
    return overlap / union.clamp(min=1e-6)


# 0-dim device constants of torch.where (a Python number there becomes a
# new device tensor per call: one fill kernel each on a GPU)
_CONSTANTS = {}


def _constant(value, dtype, device):
    key = (value, dtype, torch.device(device))
    found = _CONSTANTS.get(key)
    if found is None:
        found = _CONSTANTS[key] = torch.tensor(value, dtype=dtype,
                                               device=device)
    return found


def _encode_deltas(anchor_terms, box_terms, matched):
    """``DeltaXYWHBBoxCoder.encode`` (means 0, stds 1) of each anchor with
    its matched box, with the same arithmetic in fewer kernels: the anchor
    centres and sizes ``anchor_terms`` are made once per anchor set
    (cached with the anchors) and the boxes' once per box
    (:func:`_box_terms`), then gathered (mmdet: per anchor); ``dx, dy =
    (g - p) / p_size`` and ``dw, dh = log(g_size / p_size)`` are one
    subtraction (of 0 for the sizes), one division and one log of the
    size half. Subtracting mean 0 and dividing by std 1, which change no
    value, are left out."""
    offset, scale = anchor_terms[:2]
    g = box_terms.gather(1, matched[..., None].expand(-1, -1, 4))
    deltas = (g - offset) / scale
    deltas[..., 2:].log_()
    return deltas


def _block_order(flat, batch, device):
    """Index that lays ``(B, A)`` rows (flattened) out block by block, each
    block ``(B, A_l)`` contiguous."""
    total = sum(flat)
    index, start = [], 0
    rows = torch.arange(batch, device=device)[:, None] * total
    for size in flat:
        index.append((rows + start + torch.arange(
            size, device=device)[None]).reshape(-1))
        start += size
    return torch.cat(index)


class SharedAnchorTargets:
    """The anchor targets of several auxiliary detection heads, computed
    together once per batch (:func:`multi_anchor_targets`).

    ``LocalLearner`` calls :meth:`begin` with each iteration's data
    samples and :meth:`release` when its local modules are done. The first
    head asking for targets of that batch (:meth:`targets`) gets them
    computed for every head of the group that shares its
    :func:`target_signature`; the other heads' feature map sizes are
    predicted from the batch shape (``ceil(size / stride)``, what stride-2
    convs with ``padding=k//2`` give) and checked when each head asks: a
    head whose sizes differ, or that asks with other data samples (e.g.
    HPFF's patches), gets ``None`` and computes its own. Targets are the
    same either way; only the number of kernels changes.
    """

    def __init__(self, heads=()):
        self.heads = list(heads)  # DetAuxHead
        self.cache = collections.OrderedDict()
        self._samples = None
        self._results = {}

    def __len__(self):
        return len(self.heads)

    # a copy (of a head or of the whole learner) shares nothing: its heads
    # compute their own targets
    def __deepcopy__(self, memo):
        return SharedAnchorTargets()

    def __getstate__(self):
        return SharedAnchorTargets().__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def begin(self, data_samples):
        """A new batch: targets of ``data_samples`` are shared."""
        self._samples = data_samples if len(self.heads) > 1 else None
        self._results = {}

    def release(self):
        """Drop the batch and its targets."""
        self._samples = None
        self._results = {}

    def targets(self, aux_head, featmap_sizes, data_samples, device):
        """The targets of ``aux_head`` (a member) for ``data_samples`` and
        ``featmap_sizes``, or None when they are not shared."""
        if data_samples is not self._samples or not any(
                h is aux_head for h in self.heads):
            return None
        sizes = _sizes_key(featmap_sizes)
        key = id(aux_head)
        if key not in self._results:
            self._compute(aux_head, sizes, data_samples, device)
        found = self._results.get(key)
        if found is None or found[0] != sizes:
            return None
        return found[1]

    def _compute(self, asking, sizes, data_samples, device):
        signature = target_signature(asking.head)
        # heads that take normalised weights share only with each other
        normalise = getattr(asking, 'normalised_targets', False)
        shape = data_samples[0].metainfo.get('batch_input_shape')
        members = [asking]
        if shape is not None:
            members += [
                h for h in self.heads
                if h is not asking and h.batched_targets
                and id(h) not in self._results
                and not h._uses_ignored(data_samples)
                and target_signature(h.head) == signature
                and getattr(h, 'normalised_targets', False) == normalise
            ]
        requests = []
        for member in members:
            if member is asking:
                requests.append((member.head, sizes))
                continue
            requests.append((member.head, tuple(
                (math.ceil(shape[0] / sh), math.ceil(shape[1] / sw))
                for sw, sh in member.head.prior_generator.strides)))
        results = multi_anchor_targets(
            requests, [s.gt_instances for s in data_samples],
            [s.metainfo for s in data_samples], device, self.cache,
            normalise)
        for member, (_, member_sizes), result in zip(members, requests,
                                                     results):
            self._results[id(member)] = (_sizes_key(member_sizes), result)


def share_anchor_targets(modules):
    """A :class:`SharedAnchorTargets` of every ``DetAuxHead`` inside
    ``modules`` (e.g. a ``LocalLearner``'s aux nets), set as each head's
    ``shared_targets``."""
    from .det_head import DetAuxHead
    heads = [m for m in modules.modules() if isinstance(m, DetAuxHead)]
    group = SharedAnchorTargets(heads)
    for head in heads:
        head.shared_targets = group
    return group
