"""Patch Feature Fusion (HPFF): cut an auxiliary input into a P x P grid.

A patch of the feature ``h`` (stride ``S``) covers an image region; the
auxiliary loss of a patch is computed against the ground truth of that
region, so :func:`iter_patches` crops the images and the data samples with
it (detection: boxes shifted and clipped to the region; segmentation: the
label map cropped).
"""
import torch


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


def _crop_instances(instances, x0, y0, width, height, min_size):
    from mmengine.structures import InstanceData
    boxes = instances.bboxes
    tensor = boxes if torch.is_tensor(boxes) else boxes.tensor
    t = tensor.clone()
    t[:, 0::2] = (t[:, 0::2] - x0).clamp(0, width)
    t[:, 1::2] = (t[:, 1::2] - y0).clamp(0, height)
    keep = ((t[:, 2] - t[:, 0]) >= min_size) & \
        ((t[:, 3] - t[:, 1]) >= min_size)
    t = t[keep]
    cropped = InstanceData(
        bboxes=t if torch.is_tensor(boxes) else type(boxes)(t),
        labels=instances.labels[keep])
    return cropped


def crop_det_sample(sample, y0, y1, x0, x1, min_size=2):
    """A ``DetDataSample`` for the image region ``[y0:y1, x0:x1]``.

    Boxes are shifted into the region, clipped to it and kept when at least
    ``min_size`` pixels wide and high (a patch may contain none: the head
    then learns background only).
    """
    from mmdet.structures import DetDataSample
    height, width = y1 - y0, x1 - x0
    meta = dict(sample.metainfo)
    meta.update(img_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width))
    out = DetDataSample(metainfo=meta)
    for key in ('gt_instances', 'ignored_instances'):
        if key in sample:
            out.set_field(
                _crop_instances(sample.get(key), x0, y0, width, height,
                                min_size), key)
    return out


def crop_seg_sample(sample, y0, y1, x0, x1):
    """A ``SegDataSample`` whose label map is cropped to the region."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    height, width = y1 - y0, x1 - x0
    meta = dict(sample.metainfo)
    meta.update(img_shape=(height, width), pad_shape=(height, width))
    out = SegDataSample(metainfo=meta)
    out.gt_sem_seg = PixelData(data=sample.gt_sem_seg.data[..., y0:y1,
                                                           x0:x1])
    return out


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
    """
    height, width = h.shape[-2:]
    in_h, in_w = inputs.shape[-2:]
    rows = grid_slices(height, grid, remainder, f'aux input height '
                       f'({height}x{width})')
    cols = grid_slices(width, grid, remainder, f'aux input width '
                       f'({height}x{width})')
    crop = crop_det_sample if task == 'det' else crop_seg_sample
    for r0, r1 in rows:
        y0, y1 = r0 * stride, min(r1 * stride, in_h)
        for c0, c1 in cols:
            x0, x1 = c0 * stride, min(c1 * stride, in_w)
            samples = [crop(s, y0, y1, x0, x1) for s in data_samples]
            yield (h[..., r0:r1, c0:c1], inputs[..., y0:y1, x0:x1],
                   samples)
