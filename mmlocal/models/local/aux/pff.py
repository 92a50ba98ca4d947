"""Patch Feature Fusion (HPFF): cut an auxiliary input into a P x P grid.

A patch of the feature ``h`` (stride ``S``) covers an image region; the
auxiliary loss of a patch is computed against the ground truth of that
region, so :func:`iter_patches` crops the images and the data samples with
it (detection: boxes shifted and clipped to the region; segmentation: the
label map cropped).
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary


def grid_slices(size, grid, remainder='error', what='feature map'):
    """``grid`` contiguous ``(start, end)`` ranges covering ``[0, size)``.

    Args:
        size (int): Length to cut.
        grid (int): ``P``, the number of pieces.
        remainder (str): ``'error'``: ``P`` must divide ``size``;
            ``'uneven'``: pieces differ in length by at most one (the first
            ``size % P`` are one longer), as ``torch.tensor_split`` does.
        what (str): Named in the error message.

    Raises:
        ValueError: Naming ``patch_grid`` when it does not divide ``size``
            and ``remainder='error'``, or when ``P > size``.
    """
    if grid > size:
        raise ValueError(f'patch_grid={grid} exceeds the {what} size {size}')
    if size % grid and remainder != 'uneven':
        raise ValueError(
            f"patch_grid={grid} does not divide the {what} size {size}; "
            "set patch_remainder='uneven' to allow patches that differ by "
            'one row/column')
    base, extra = divmod(size, grid)
    bounds = [0]
    for i in range(grid):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def _region_keep(tensor, x0, y0, width, height, min_size):
    """Boxes ``(n, 4)`` shifted into the region and clipped to it, and
    which of them are at least ``min_size`` wide and high."""
    t = tensor.clone()
    t[:, 0::2] = (t[:, 0::2] - x0).clamp(0, width)
    t[:, 1::2] = (t[:, 1::2] - y0).clamp(0, height)
    keep = ((t[:, 2] - t[:, 0]) >= min_size) & \
        ((t[:, 3] - t[:, 1]) >= min_size)
    return t, keep


def _crop_masks(masks, x0, y0, width, height):
    """mmdet ``BitmapMasks`` / ``PolygonMasks`` (anything with ``crop`` and
    ``pad``) of the region, padded to its size where the region passes the
    mask's extent (the batch padding)."""
    import numpy as np
    box = np.array([x0, y0, x0 + width, y0 + height], dtype=np.int64)
    out = masks.crop(box)
    if (out.height, out.width) != (height, width):
        out = out.pad((height, width))
    return out


def _crop_instances(instances, x0, y0, width, height, min_size):
    """An ``InstanceData`` of the region ``[y0:y0+height, x0:x0+width]``.

    Every per-instance field that is present is kept: with ``bboxes``, the
    instances whose clipped box is at least ``min_size`` pixels wide and
    high are selected (every field indexed alike, as ``InstanceData``
    indexing does: tensors, arrays, lists, boxes, masks) and the boxes are
    shifted and clipped into the region; without ``bboxes`` every instance
    is kept. ``masks`` (mmdet's ``BitmapMasks``/``PolygonMasks``) are
    cropped to the region. The metainfo is copied. An ``InstanceData``
    without any field (no instances) stays empty.
    """
    if 'bboxes' not in instances:
        out = instances.clone()
    else:
        boxes = instances.bboxes
        tensor = boxes if torch.is_tensor(boxes) else boxes.tensor
        t, keep = _region_keep(tensor, x0, y0, width, height, min_size)
        out = instances[keep]
        out.bboxes = t[keep] if torch.is_tensor(boxes) else \
            type(boxes)(t[keep])
    masks = out.get('masks')
    if masks is not None and hasattr(masks, 'crop'):
        out.masks = _crop_masks(masks, x0, y0, width, height)
    return out


def _crop_instances_all(instances, regions, min_size):
    """:func:`_crop_instances` for every ``(x0, y0, x1, y1)`` of
    ``regions``, the box arithmetic of all regions in one set of tensor ops
    (the same ops per element, so the same boxes)."""
    from mmengine.structures import InstanceData
    if 'bboxes' not in instances or len(regions) == 1:
        return [
            _crop_instances(instances, x0, y0, x1 - x0, y1 - y0, min_size)
            for x0, y0, x1, y1 in regions
        ]
    boxes = instances.bboxes
    tensor = boxes if torch.is_tensor(boxes) else boxes.tensor
    corners = torch.tensor(regions, dtype=tensor.dtype, device=tensor.device)
    origin = corners[:, :2].repeat(1, 2)[:, None]  # (G, 1, 4): x0 y0 x0 y0
    size = (corners[:, 2:] - corners[:, :2]).repeat(1, 2)[:, None]
    t = torch.minimum((tensor[None] - origin).clamp(min=0), size)
    keep = ((t[..., 2:] - t[..., :2]) >= min_size).all(dim=-1)  # (G, n)
    others = InstanceData(metainfo=instances.metainfo, **{
        k: v for k, v in instances.items() if k != 'bboxes'})
    outs = []
    for g, (x0, y0, x1, y1) in enumerate(regions):
        out = others[keep[g]] if len(others.keys()) else \
            InstanceData(metainfo=instances.metainfo)
        kept = t[g][keep[g]]
        out.bboxes = kept if torch.is_tensor(boxes) else type(boxes)(kept)
        masks = out.get('masks')
        if masks is not None and hasattr(masks, 'crop'):
            out.masks = _crop_masks(masks, x0, y0, x1 - x0, y1 - y0)
        outs.append(out)
    return outs


def crop_det_samples(sample, regions, min_size=2):
    """:func:`crop_det_sample` for every ``(y0, y1, x0, x1)`` of
    ``regions``, the boxes of all regions computed at once."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    outs = [
        DetDataSample(metainfo=_patch_meta(sample, y1 - y0, x1 - x0))
        for y0, y1, x0, x1 in regions
    ]
    for key, value in sample.items():
        if isinstance(value, InstanceData):
            values = _crop_instances_all(
                value, [(x0, y0, x1, y1) for y0, y1, x0, x1 in regions],
                min_size)
        else:
            values = [
                _crop_fields_value(value, sample, y0, y1, x0, x1, min_size)
                for y0, y1, x0, x1 in regions
            ]
        for out, part in zip(outs, values):
            out.set_field(part, key)
    return outs


def _crop_pixels(pixels, y0, y1, x0, x1, img_shape):
    """A ``PixelData`` cropped to the image region ``[y0:y1, x0:x1]``.

    A map at the image's resolution (padded to the batch or not) is cropped
    in pixels (a region past its extent gives a smaller map); a map coarser
    than ``img_shape`` (e.g. mmdet's ``sem_seg_output_strides``) is cropped
    at its own resolution, the region's bounds divided by the factor.
    """
    out = pixels.__class__(metainfo=pixels.metainfo)
    for name, value in pixels.items():
        h, w = value.shape[-2:]
        fy = img_shape[0] / h if 0 < h < img_shape[0] else 1
        fx = img_shape[1] / w if 0 < w < img_shape[1] else 1
        ry0, ry1 = int(y0 // fy), int(-(-y1 // fy))
        rx0, rx1 = int(x0 // fx), int(-(-x1 // fx))
        out.set_field(value[..., ry0:ry1, rx0:rx1], name)
    return out


def _crop_fields(sample, out, y0, y1, x0, x1, min_size):
    """Copy every data field of ``sample`` into ``out``: instance sets and
    pixel maps cropped to the region, anything else as it is."""
    for key, value in sample.items():
        out.set_field(
            _crop_fields_value(value, sample, y0, y1, x0, x1, min_size), key)
    return out


def _crop_fields_value(value, sample, y0, y1, x0, x1, min_size):
    """One data field of ``sample`` for the region (see
    :func:`_crop_fields`)."""
    from mmengine.structures import InstanceData, PixelData
    if isinstance(value, InstanceData):
        return _crop_instances(value, x0, y0, x1 - x0, y1 - y0, min_size)
    if isinstance(value, PixelData):
        return _crop_pixels(value, y0, y1, x0, x1,
                            sample.metainfo.get('img_shape', (0, 0)))
    return value


def _patch_meta(sample, height, width):
    meta = dict(sample.metainfo)
    meta.update(img_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width))
    return meta


def crop_det_sample(sample, y0, y1, x0, x1, min_size=2):
    """A ``DetDataSample`` for the image region ``[y0:y1, x0:x1]``.

    Every instance set (``gt_instances``, ``ignored_instances``, any other
    ``InstanceData`` field) is cropped by :func:`_crop_instances`: boxes
    shifted into the region, clipped to it and kept when at least
    ``min_size`` pixels wide and high (a patch may contain none: the head
    then learns background only), the other per-instance fields selected
    alike and masks cropped. Pixel maps (``gt_sem_seg``, ...) are cropped
    to the region (:func:`_crop_pixels`). Other fields and the metainfo are
    copied (``img_shape``/``pad_shape``/``batch_input_shape``: the
    region's).
    """
    from mmdet.structures import DetDataSample
    height, width = y1 - y0, x1 - x0
    out = DetDataSample(metainfo=_patch_meta(sample, height, width))
    return _crop_fields(sample, out, y0, y1, x0, x1, min_size)


def crop_seg_sample(sample, y0, y1, x0, x1):
    """A ``SegDataSample`` whose label map (and every other pixel map) is
    cropped to the region; other fields and the metainfo are copied."""
    from mmseg.structures import SegDataSample
    height, width = y1 - y0, x1 - x0
    out = SegDataSample(metainfo=_patch_meta(sample, height, width))
    return _crop_fields(sample, out, y0, y1, x0, x1, min_size=2)


# per batch (the preprocessed inputs, while they live): the patch layout
# of each grid geometry (cropped samples, stacked image patches), shared by
# the aux nets whose inputs have the same size and stride (e.g. HPFF's
# modules at one stride): made once, and the same image patches also share
# their reconstruction targets (BaseLocalAux.recon_inputs)
_LAYOUTS = WeakIdKeyDictionary()


def _per_batch(inputs, data_samples, key, make):
    """``make()`` once per ``inputs`` tensor, ``data_samples`` list and
    ``key``."""
    per_batch = _LAYOUTS.get(inputs)
    if per_batch is None:
        per_batch = _LAYOUTS[inputs] = {}
    key = (id(data_samples), ) + key
    if key not in per_batch:  # (data_samples kept: its id stays valid)
        per_batch[key] = (data_samples, make())
    return per_batch[key][1]


def release_patch_layouts(inputs):
    """Drop the layouts of the batch ``inputs`` (its image patches would
    otherwise live as long as ``inputs``)."""
    _LAYOUTS.pop(inputs, None)


def _grid(h, inputs, grid, stride, remainder):
    """Row and column ranges of the feature map and the image pixels
    ``(y0, y1, x0, x1)`` of every patch, row-major."""
    height, width = h.shape[-2:]
    in_h, in_w = inputs.shape[-2:]
    rows = grid_slices(height, grid, remainder, f'aux input height '
                       f'({height}x{width})')
    cols = grid_slices(width, grid, remainder, f'aux input width '
                       f'({height}x{width})')
    pixels = [(r0 * stride, min(r1 * stride, in_h), c0 * stride,
               min(c1 * stride, in_w)) for r0, r1 in rows for c0, c1 in cols]
    return rows, cols, pixels


def _crops(data_samples, pixels, task):
    """Per sample, its crops of the regions ``pixels`` (the boxes of all
    regions at once)."""
    if task == 'det':
        return [crop_det_samples(s, pixels) for s in data_samples]
    return [[crop_seg_sample(s, *p) for p in pixels] for s in data_samples]


def iter_patches(h, inputs, data_samples, grid, stride, task,
                 remainder='error'):
    """Yield ``(h_patch, inputs_patch, samples_patch)`` over a P x P grid.

    Args:
        h (Tensor): ``(N, C, H, W)`` feature of stride ``stride``.
        inputs (Tensor): ``(N, 3, H_in, W_in)`` preprocessed images.
        data_samples (list): Their data samples (GT).
        grid (int): ``P``.
        stride (int): Stride of ``h`` w.r.t. ``inputs``.
        task (str): ``'det'`` or ``'seg'``.
        remainder (str): See :func:`grid_slices`.

    The patches tile ``h`` exactly (no overlap, nothing left out); patch
    ``(i, j)`` covers pixels ``[r0 * stride, min(r1 * stride, H_in))`` and
    likewise for columns. ``h_patch`` is a view of ``h``: a backward pass
    through it accumulates into ``h.grad`` (a leaf in the cascade engine).
    The cropped samples are made once per batch and geometry (shared by
    every call with the same ``inputs``, ``data_samples`` and grid).
    """
    rows, cols, pixels = _grid(h, inputs, grid, stride, remainder)
    crops = _per_batch(
        inputs, data_samples, ('iter', tuple(pixels), task),
        lambda: _crops(data_samples, pixels, task))
    index = 0
    for r0, r1 in rows:
        for c0, c1 in cols:
            y0, y1, x0, x1 = pixels[index]
            yield (h[..., r0:r1, c0:c1], inputs[..., y0:y1, x0:x1],
                   [per_sample[index] for per_sample in crops])
            index += 1


def _even(h, inputs, grid, stride):
    """The grid divides the feature map and the input is ``stride`` times
    it: all patches have one size."""
    height, width = h.shape[-2:]
    in_h, in_w = inputs.shape[-2:]
    return not (height % grid or width % grid or in_h != height * stride
                or in_w != width * stride)


def _split(x, grid, ph, pw):
    """``(N, C, P*ph, P*pw)`` -> ``(N*P*P, C, ph, pw)``, sample-major."""
    n, c = x.shape[:2]
    x = x.reshape(n, c, grid, ph, grid, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n * grid * grid, c, ph, pw)


def _size_groups(regions, pixels, even):
    """Indices of the patches of each stack: all in one when the grid is
    even, else one stack per patch size (up to 4)."""
    if even:
        return [list(range(len(regions)))]
    by_size = {}
    for i, ((r0, r1, c0, c1), (y0, y1, x0, x1)) in enumerate(
            zip(regions, pixels)):
        by_size.setdefault((r1 - r0, c1 - c0, y1 - y0, x1 - x0),
                           []).append(i)
    return list(by_size.values())


def _stack_layout(h, inputs, data_samples, grid, stride, task, remainder):
    """What :func:`stack_patches` shares across calls: per stack, its
    feature ranges ``(r0, r1, c0, c1)``, stacked image patches and
    cropped samples (all regions of all stacks cropped at once)."""
    rows, cols, pixels = _grid(h, inputs, grid, stride, remainder)
    regions = [(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]
    crops = _crops(data_samples, pixels, task)
    even = _even(h, inputs, grid, stride)
    groups = _size_groups(regions, pixels, even)
    images = _cut_images(inputs, pixels, groups, even, grid, stride,
                         h.shape[-2] // grid, h.shape[-1] // grid)
    return [([regions[i] for i in group], inputs_b,
             [per_sample[i] for per_sample in crops for i in group])
            for group, inputs_b in zip(groups, images)]


def stack_patches(h, inputs, data_samples, grid, stride, task,
                  remainder='error'):
    """The P x P patches of :func:`iter_patches` stacked along the batch,
    one stack per patch size.

    Returns:
        list[tuple]: ``(h_b, inputs_b, samples_b, groups)`` for each
        distinct patch size: the ``groups`` patches of that size stacked
        *sample-major* (entry ``n * groups + g`` is image ``n``'s ``g``-th
        patch of that size, row-major over the grid), so group ``g`` is the
        entries ``g, g + groups, ...`` and a BN layer can normalise each
        group with its own statistics through a free view
        (:func:`grouped_batch_norm`). An even grid whose input is
        ``stride`` times the feature map gives one stack of all ``P^2``
        patches (one reshape copy each for ``h`` and ``inputs``); an uneven
        one up to four (``'uneven'``: two row and two column lengths).
        ``h_b`` is attached to ``h``: a backward through it accumulates
        into ``h.grad``. ``inputs_b`` and ``samples_b`` are made once per
        batch and geometry (shared by every call with the same
        ``inputs``, ``data_samples`` and grid).
    """
    height, width = h.shape[-2:]
    layout = _per_batch(
        inputs, data_samples,
        ('stack', height, width, grid, stride, task, remainder),
        lambda: _stack_layout(h, inputs, data_samples, grid, stride, task,
                              remainder))
    stacks = _stack_feature(h, [regions for regions, _, _ in layout], grid)
    return [(h_b, inputs_b, samples_b, len(regions))
            for h_b, (regions, inputs_b, samples_b) in zip(stacks, layout)]


def _stack_feature(h, groups, grid):
    """``h`` stacked sample-major, one stack per list of feature ranges
    in ``groups``: one reshape copy when a single group holds the whole
    even grid, else one ``stack`` per group (attached to ``h``)."""
    height, width = h.shape[-2:]
    if len(groups) == 1 and len(groups[0]) == grid * grid and \
            height % grid == 0 and width % grid == 0:
        return [_split(h, grid, height // grid, width // grid)]
    return [torch.stack([h[..., r0:r1, c0:c1] for r0, r1, c0, c1 in group],
                        1).flatten(0, 1) for group in groups]


def _cut_images(images, pixels, groups, even, grid, stride, ph, pw):
    """``images`` ``(N, C, H, W)`` (or None) cut like the feature: one
    ``(N * G_s, C, ., .)`` stack per group of same-sized regions."""
    if images is None:
        return [None] * len(groups)
    if even:
        return [_split(images, grid, ph * stride, pw * stride)]
    return [
        torch.stack([images[..., y0:y1, x0:x1]
                     for y0, y1, x0, x1 in (pixels[i] for i in group)],
                    1).flatten(0, 1) for group in groups
    ]


def image_patches(h, inputs, images, valid, grid, stride, remainder='error',
                  batch=False):
    """The PFF grid of ``h`` with the same regions of per-pixel maps only
    (no ground truth cropped): what a reconstruction decoder needs.

    Args:
        h (Tensor): ``(N, C, H, W)`` feature of stride ``stride``.
        inputs (Tensor): The batch the maps belong to (the cache key:
            the cut maps are made once per batch and geometry and dropped
            with :func:`release_patch_layouts`).
        images (Tensor): ``(N, 3, H_in, W_in)``, e.g. the image in [0, 1].
        valid (Tensor, optional): ``(N, 1, H_in, W_in)`` padding mask
            (:func:`padding_mask`), cut alike; None: no padding.
        grid, stride, remainder: As in :func:`iter_patches`.
        batch (bool): False: ``[(h_p, images_p, valid_p), ...]`` per
            patch, row-major (``h_p`` a view of ``h``); True: the stacks
            of :func:`stack_patches`, ``[(h_b, images_b, valid_b, G_s),
            ...]``, sample-major.
    """
    height, width = h.shape[-2:]

    def make():
        rows, cols, pixels = _grid(h, inputs, grid, stride, remainder)
        regions = [(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]
        if not batch:
            return regions, [(images[..., y0:y1, x0:x1],
                              None if valid is None else
                              valid[..., y0:y1, x0:x1])
                             for y0, y1, x0, x1 in pixels]
        even = _even(h, inputs, grid, stride)
        groups = _size_groups(regions, pixels, even)
        args = (pixels, groups, even, grid, stride, height // grid,
                width // grid)
        return [[regions[i] for i in group] for group in groups], list(
            zip(_cut_images(images, *args), _cut_images(valid, *args)))

    regions, maps = _per_batch(
        inputs, None, ('images', id(images), id(valid), height, width, grid,
                       stride, remainder, batch), make)
    if not batch:
        return [(h[..., r0:r1, c0:c1], *m)
                for (r0, r1, c0, c1), m in zip(regions, maps)]
    return [(h_b, *m, len(group)) for h_b, group, m in zip(
        _stack_feature(h, regions, grid), regions, maps)]


class _RepeatAffine(torch.autograd.Function):
    """``(weight, bias)`` ``(C, )`` each -> both repeated ``groups`` times,
    ``(G * C, )``, from one ``cat`` (forward) and reduced by one ``sum``
    per output (backward), instead of a ``repeat`` and its ``sum`` each
    plus autograd's bookkeeping."""

    @staticmethod
    def forward(ctx, weight, bias, groups):
        ctx.groups = groups
        both = torch.cat([weight.expand(groups, -1),
                          bias.expand(groups, -1)]).view(2, -1)
        return both[0], both[1]

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        groups = ctx.groups
        return (None if grad_weight is None else
                grad_weight.view(groups, -1).sum(0),
                None if grad_bias is None else
                grad_bias.view(groups, -1).sum(0), None)


def _group_stats_buffer(bn, size, like):
    """A ``(2, size)`` scratch buffer per layer, device and dtype: rows
    the per-group batch mean and unbiased variance that ``batch_norm``
    writes when given them as running statistics with momentum 1 (kept
    finite, so ``0 * old + new`` is exact; made once)."""
    cache = bn.__dict__.setdefault('_group_stats', {})
    key = (size, like.device, like.dtype)
    if key not in cache:
        cache[key] = torch.zeros(2, size, dtype=like.dtype,
                                 device=like.device)
    return cache[key]


class _DeferredStats:
    """The running-statistics updates of the BN layers (with a momentum)
    that ran in one :func:`grouped_batch_norm` context, applied together
    when it ends: their per-group statistics are written into slices of
    one scratch buffer, mixed by one matrix product and folded into the
    running buffers by one ``_foreach_lerp_`` per momentum (instead of a
    product and a lerp per layer)."""

    def __init__(self, module, layers, groups):
        self.module = module
        self.groups = groups
        self.layers = [m for m in layers if m.momentum is not None]
        self.ran = []
        self._scratch = None

    def scratch(self, bn):
        """``(2, G * C)`` rows of the shared buffer for ``bn`` (the buffer
        made once per module, layers, groups, device and dtype)."""
        if self._scratch is None:
            like = bn.running_mean
            cache = self.module.__dict__.setdefault('_grouped_scratch', {})
            key = (self.groups, tuple(map(id, self.layers)), like.device,
                   like.dtype)
            if key not in cache:
                sizes = [self.groups * m.running_mean.numel()
                         for m in self.layers]
                offsets = [sum(sizes[:i]) for i in range(len(sizes))]
                cache[key] = (torch.zeros(2, sum(sizes), dtype=like.dtype,
                                          device=like.device),
                              dict(zip(map(id, self.layers),
                                       zip(offsets, sizes))))
            self._scratch = cache[key]
        buffer, where = self._scratch
        offset, size = where[id(bn)]
        return buffer[:, offset:offset + size]

    def record(self, bn):
        """``bn`` is about to write its statistics: flush first if it
        already has (a layer called twice in the context)."""
        if any(m is bn for m in self.ran):
            self.flush()
        self.ran.append(bn)

    @torch.no_grad()
    def flush(self):
        if not self.ran:
            return
        buffer, where = self._scratch
        by_keep = {}
        for bn in self.ran:
            keep, _ = _running_coefs(bn, self.groups, bn.running_mean)
            by_keep.setdefault(keep, []).append(bn)
        for keep, layers in by_keep.items():
            if keep == 1.0:
                continue
            mix = self._mixer(layers, buffer)
            mixed = torch.mm(buffer, mix)
            targets, sources, col = [], [], 0
            for bn in layers:
                c = bn.running_mean.numel()
                targets += [bn.running_mean, bn.running_var]
                sources += [mixed[0, col:col + c], mixed[1, col:col + c]]
                col += c
            torch._foreach_lerp_(targets, sources, 1 - keep)
        self.ran = []

    def _mixer(self, layers, buffer):
        """``(rows of the buffer, sum of C)``: column ``c`` of layer
        ``l`` is ``w_p`` at row ``offset_l + p * C_l + c``
        (:func:`_running_coefs`); made once per set of layers."""
        cache = _MIXERS.setdefault(buffer, {})
        key = tuple(id(bn) for bn in layers) + tuple(
            bn.momentum for bn in layers)
        if key not in cache:
            _, where = self._scratch
            mix = buffer.new_zeros(
                buffer.shape[1], sum(bn.running_mean.numel()
                                     for bn in layers))
            col = 0
            for bn in layers:
                _, coef = _running_coefs(bn, self.groups, bn.running_mean)
                offset, _ = where[id(bn)]
                c = bn.running_mean.numel()
                eye = torch.eye(c, dtype=mix.dtype, device=mix.device)
                for p in range(self.groups):
                    row = offset + p * c
                    mix[row:row + c, col:col + c] = eye * coef[p]
                col += c
            cache[key] = mix
        return cache[key]


# the mixing matrices of _DeferredStats, per scratch buffer (while it
# lives)
_MIXERS = WeakIdKeyDictionary()


def _grouped_bn_forward(bn, groups, x, deferred=None):
    """``bn(x)`` with batch statistics per group of the sample-major batch
    (entries ``g, g + G, ...``): the same normalisation and running-
    statistics updates as ``bn`` called on each group in turn.

    The batch is viewed as ``(N / G, G * C, ...)`` (one channel per group
    and channel) and normalised by one ``batch_norm`` with the affine
    parameters repeated per group; its kernel also writes each group's
    mean and unbiased variance into a scratch buffer, from which the
    running statistics get the ``G`` successive momentum updates in
    closed form (:func:`_update_running_stats`, or ``deferred``: all
    layers of the context at its end, :class:`_DeferredStats`)."""
    use_batch_stats = bn.training or (bn.running_mean is None
                                      and bn.running_var is None)
    if not use_batch_stats:  # per-sample already: no grouping needed
        return type(bn).forward(bn, x)
    n, c = x.shape[0] // groups, x.shape[1]
    xg = x.reshape(n, groups * c, *x.shape[2:])
    if bn.weight is not None and bn.bias is not None:
        weight, bias = _RepeatAffine.apply(bn.weight, bn.bias, groups)
    else:
        weight = None if bn.weight is None else bn.weight.repeat(groups)
        bias = None if bn.bias is None else bn.bias.repeat(groups)
    update = bn.training and bn.track_running_stats
    defer = update and deferred is not None and bn.momentum is not None
    if defer:
        deferred.record(bn)
        stats = deferred.scratch(bn)
    elif update:
        stats = _group_stats_buffer(bn, groups * c, bn.running_mean)
    else:
        stats = None
    out = F.batch_norm(xg, None if stats is None else stats[0],
                       None if stats is None else stats[1], weight, bias,
                       True, 1.0, bn.eps)
    if update and not defer:
        _update_running_stats(bn, stats, groups)
    elif defer and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(groups)
    # back to x's shape, not as a view: the in-place ReLU that follows
    # would make autograd copy the view's slices in the backward (five
    # more kernels per layer). Safe: nothing saved for the backward holds
    # `out` (batch_norm saves its input and statistics)
    return torch.ops.aten._unsafe_view(out, x.shape)


# running-statistics coefficients of grouped_batch_norm, per (momentum,
# groups, device, dtype): made once instead of a host-to-device copy per
# layer and step
_COEFS = {}


def _running_coefs(bn, groups, like):
    """``(a, w)`` with ``r_G = a r_0 + (1 - a) sum_p w_p s_p`` for
    ``groups`` successive updates ``r <- (1 - f_p) r + f_p s_p`` (``f_p``
    the momentum, or ``1 / num_batches_tracked`` with ``momentum=None``);
    ``w`` a tensor like ``like`` (None when ``a = 1``: no update)."""
    if bn.momentum is None:
        seen = int(bn.num_batches_tracked)
        factors = [1.0 / (seen + p + 1) for p in range(groups)]
    else:
        factors = [bn.momentum] * groups
    keep = 1.0
    coefs = [0.0] * groups
    for p in reversed(range(groups)):
        coefs[p] = factors[p] * keep
        keep *= 1 - factors[p]
    if keep == 1.0:
        return keep, None
    key = (tuple(coefs), keep, like.device, like.dtype)
    coef = _COEFS.get(key)
    if coef is None:
        coef = torch.tensor([c / (1 - keep) for c in coefs],
                            dtype=like.dtype, device=like.device)
        if bn.momentum is not None:
            _COEFS[key] = coef
    return keep, coef


@torch.no_grad()
def _update_running_stats(bn, stats, groups):
    """Running statistics as ``groups`` successive BN calls leave them:
    ``r <- (1 - f_p) r + f_p s_p`` for ``p = 0..G-1`` (``f_p`` the momentum,
    or ``1 / num_batches_tracked`` with ``momentum=None``), in closed form
    ``r_G = lerp(r_0, sum_p w_p s_p, 1 - a)``: one matrix-vector product
    of the ``(2, G * C)`` per-group statistics ``stats`` (mean and
    unbiased variance) and one ``_foreach_lerp_`` for both buffers."""
    keep, coef = _running_coefs(bn, groups, bn.running_mean)
    if coef is not None:
        c = bn.running_mean.numel()
        mixed = torch.matmul(stats.view(2, groups, c).transpose(1, 2), coef)
        torch._foreach_lerp_([bn.running_mean, bn.running_var],
                             list(mixed.unbind(0)), 1 - keep)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(groups)


@contextlib.contextmanager
def grouped_batch_norm(module, groups):
    """Within the context, every BN layer of ``module`` normalises each of
    the ``groups`` interleaved groups of its batch (entries ``g, g + G,
    ...``, see :func:`stack_patches`) with the group's own statistics, as
    if the groups ran one after the other.

    Raises:
        ValueError: for a ``SyncBatchNorm`` layer in a distributed run
            (statistics across processes per group are not implemented).
    """
    patched = []
    if groups > 1:
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or \
                    'forward' in m.__dict__:
                continue
            if isinstance(m, nn.SyncBatchNorm) and \
                    torch.distributed.is_available() and \
                    torch.distributed.is_initialized() and \
                    torch.distributed.get_world_size() > 1:
                raise ValueError(
                    'patch_batch=True does not support SyncBatchNorm in '
                    'the auxiliary net of a distributed run; use '
                    'patch_batch=False or BN')
            patched.append(m)
    deferred = _DeferredStats(module, [
        m for m in patched if m.track_running_stats
        and m.running_mean is not None
    ], groups) if patched else None
    for m in patched:
        m.forward = functools.partial(_grouped_bn_forward, m, groups,
                                      deferred=deferred)
    try:
        yield
        if deferred is not None:
            deferred.flush()
    finally:
        for m in patched:
            del m.forward
