"""Local learning on mmdet's own test inputs (``mmdet.testing``): detectors
of several families, every auxiliary family, and samples with or without
the optional fields (``ignored_instances`` with boxes only, none at all, an
image without objects, masks, box types, a semantic map).

Kept fast: tiny ResNet-18 detectors (32-channel necks and heads) on 64x64
images, one training step each; not the full cross product: every aux
family runs on RetinaNet, every other detector (GFL, FCOS, Mask R-CNN) with
HPFF (whose PFF crops the samples) and DGL, and the sample variants with
HPFF on Mask R-CNN (masks in the samples).
"""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

from local_utils import parsed_config, small_aux
from mmlocal.registry import MODELS

mmdet_testing = pytest.importorskip('mmdet.testing')

DETECTORS = {
    'retinanet': 'retinanet/retinanet_r18_fpn_1x_coco.py',
    'gfl': 'gfl/gfl_r50_fpn_1x_coco.py',
    'fcos': 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    'mask_rcnn': 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
}
WIDTH = 32


def detector_cfg(fname):
    """``mmdet.testing.get_detector_cfg``, which needs a source checkout of
    mmdet; from an installed mmdet, the same file of its packaged configs
    (``.mim/configs``)."""
    try:
        return mmdet_testing.get_detector_cfg(fname)
    except Exception:  # mmdet raises a bare Exception without a checkout
        import mmdet
        path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', fname)
        return parsed_config(path).model  # parsed once, a copy each time


def tiny_detector(name):
    """mmdet's config of ``name`` with a random-init ResNet-18 and 32-wide
    neck and heads."""
    cfg = ConfigDict(detector_cfg(DETECTORS[name]))
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.update(in_channels=[64, 128, 256, 512], out_channels=WIDTH)
    if 'bbox_head' in cfg:  # one-stage
        cfg.bbox_head.update(in_channels=WIDTH, feat_channels=WIDTH,
                             stacked_convs=1)
    else:  # Mask R-CNN
        cfg.rpn_head.update(in_channels=WIDTH, feat_channels=WIDTH)
        roi = cfg.roi_head
        roi.bbox_roi_extractor.out_channels = WIDTH
        roi.bbox_head.update(in_channels=WIDTH, fc_out_channels=64)
        roi.mask_roi_extractor.out_channels = WIDTH
        roi.mask_head.update(in_channels=WIDTH, conv_out_channels=WIDTH,
                             num_convs=1)
        cfg.train_cfg.rpn.sampler.num = 64
        cfg.train_cfg.rcnn.sampler.num = 64
    return cfg


def aux_cfg(family):
    kind = dict(
        dgl='mmlocal.DGLAux', infopro='mmlocal.InfoProAux',
        man='mmlocal.MomentumAux', manpp='mmlocal.MomentumAux',
        hpff='mmlocal.HPFFAux', hpff_recon='mmlocal.HPFFAux',
        mlaan='mmlocal.MLAANAux',
        auglocal='mmlocal.AugLocalAux')[family]
    cfg = small_aux(kind)
    if family == 'manpp':
        cfg['learnable_scale'] = True
    if family in ('hpff', 'hpff_recon', 'mlaan'):
        cfg.update(independent_det_head=dict(feat_channels=16))
    if family == 'hpff':
        # the ground-truth crops are what these tests exercise
        cfg.update(patch_grid=2, patch_parts='all')
    if family == 'hpff_recon':
        cfg.update(patch_grid=2, patch_parts='recon')
    return cfg


def build_learner(detector, family, num_modules=4):
    cfg = dict(type='mmlocal.LocalLearner', model=tiny_detector(detector),
               num_modules=num_modules, aux=aux_cfg(family))
    with DefaultScope.overwrite_default_scope('mmdet'):
        learner = MODELS.build(cfg)
    torch.manual_seed(0)
    learner.init_weights()
    # EMA copies are driven by MomentumAuxHook in a runner; not here
    learner.aux_nets.apply(lambda m: setattr(m, 'ema_driven', True))
    return learner


def demo_batch(detector, variant='demo', size=64):
    """``demo_mm_inputs`` as mmdet's own tests use it, optionally changed."""
    masks = detector == 'mask_rcnn'
    num_items = [0, 3] if variant == 'empty_gt' else None
    batch = mmdet_testing.demo_mm_inputs(
        2, [(3, size, size)] * 2, num_items=num_items, with_mask=masks,
        use_box_type=variant == 'box_type_semantic',
        with_semantic=variant == 'box_type_semantic')
    for sample in batch['data_samples']:
        if variant == 'no_ignored':
            del sample.ignored_instances
        if variant == 'empty_ignored':
            sample.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4))
        if variant == 'polygons' and masks:
            sample.gt_instances.masks = sample.gt_instances.masks.to_polygon(
                ) if hasattr(sample.gt_instances.masks, 'to_polygon') else \
                _bitmap_to_polygons(sample.gt_instances.masks)
    return batch


def _bitmap_to_polygons(masks):
    from mmdet.structures.mask import PolygonMasks
    polys = []
    for m in masks.masks:
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            x0 = y0 = 0.
            x1 = y1 = 1.
        else:
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        polys.append([np.array([x0, y0, x1, y0, x1, y1, x0, y1],
                               dtype=np.float64)])
    return PolygonMasks(polys, masks.height, masks.width)


def one_step(learner, batch):
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01))
    out = learner.train_step(batch, ow)
    assert out, 'no losses logged'
    for name, value in out.items():
        assert torch.isfinite(value).all(), (name, value)
    # the local losses of every module with an aux net were computed
    assert {f'loss_local{k}' for k in range(learner.num_modules - 1)} <= \
        set(out)
    return out


FAMILIES = ['dgl', 'infopro', 'man', 'manpp', 'hpff', 'hpff_recon', 'mlaan',
            'auglocal']


@pytest.mark.parametrize('family', FAMILIES)
def test_every_family_on_demo_inputs(family):
    """The issue's repro (RetinaNet R18, K=4, ``demo_mm_inputs``: ignored
    instances with boxes only) for every family."""
    one_step(build_learner('retinanet', family), demo_batch('retinanet'))


@pytest.mark.parametrize('family', ['hpff', 'dgl'])
@pytest.mark.parametrize('detector', ['gfl', 'fcos', 'mask_rcnn'])
def test_other_detector_families(detector, family):
    one_step(build_learner(detector, family), demo_batch(detector))


@pytest.mark.parametrize('variant', [
    'no_ignored', 'empty_ignored', 'empty_gt', 'box_type_semantic',
    'polygons'
])
def test_optional_fields_with_pff(variant):
    """HPFF crops every sample per patch: each variant trains (Mask R-CNN:
    masks in every sample)."""
    one_step(build_learner('mask_rcnn', 'hpff'),
             demo_batch('mask_rcnn', variant))


# -- the crop itself ---------------------------------------------------------
def _demo_sample(**kwargs):
    batch = mmdet_testing.demo_mm_inputs(1, [(3, 64, 64)], **kwargs)
    return batch['data_samples'][0]


def test_crop_keeps_every_instance_field_in_step():
    from mmlocal.models.local.aux.pff import crop_det_sample
    sample = _demo_sample(num_items=[6], with_mask=True)
    gt = sample.gt_instances
    gt.scores = torch.arange(6.)  # any other per-instance field
    gt.names = [f'obj{i}' for i in range(6)]
    out = crop_det_sample(sample, 0, 32, 16, 64)
    assert out.img_shape == (32, 48) and out.pad_shape == (32, 48)
    crop = out.gt_instances
    # boxes: shifted into the region, clipped, the kept ones >= 2 px
    boxes = gt.bboxes.clone()
    boxes[:, 0::2] = (boxes[:, 0::2] - 16).clamp(0, 48)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, 32)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 2) & \
        ((boxes[:, 3] - boxes[:, 1]) >= 2)
    assert 0 < int(keep.sum()) < 6, 'the demo should lose a box here'
    torch.testing.assert_close(crop.bboxes, boxes[keep])
    torch.testing.assert_close(crop.labels, gt.labels[keep])
    torch.testing.assert_close(crop.scores, gt.scores[keep])
    assert crop.names == [n for n, k in zip(gt.names, keep) if k]
    # masks: the region of the kept ones
    want = gt.masks.masks[keep.numpy()][:, 0:32, 16:64]
    assert crop.masks.masks.shape == (int(keep.sum()), 32, 48)
    np.testing.assert_array_equal(crop.masks.masks, want)
    # ignored instances with boxes only
    assert set(out.ignored_instances.keys()) == {'bboxes'}
    assert out.ignored_instances.bboxes[:, 0::2].max() <= 48


def test_crop_edge_cases():
    from mmlocal.models.local.aux.pff import crop_det_sample
    from mmdet.structures.bbox import HorizontalBoxes
    sample = _demo_sample(num_items=[0], with_mask=True, with_semantic=True)
    sample.ignored_instances = InstanceData()  # no field at all
    # a region past the image (the batch padding): masks padded to it
    out = crop_det_sample(sample, 32, 80, 32, 80)
    assert len(out.gt_instances) == 0 and len(out.ignored_instances) == 0
    assert out.gt_instances.masks.masks.shape == (0, 48, 48)
    # a semantic map at the image size: cropped in pixels, up to its edge
    assert out.gt_sem_seg.sem_seg.shape[-2:] == (32, 32)
    # box type kept
    sample = _demo_sample(num_items=[3], use_box_type=True)
    out = crop_det_sample(sample, 0, 64, 0, 32)
    assert isinstance(out.gt_instances.bboxes, HorizontalBoxes)
    assert len(out.gt_instances.labels) == len(out.gt_instances.bboxes)


def test_crop_of_all_patches_at_once_equals_one_by_one():
    from mmlocal.models.local.aux.pff import crop_det_sample, crop_det_samples
    sample = _demo_sample(num_items=[7], with_mask=True, use_box_type=True)
    sample.gt_instances.scores = torch.rand(7)
    regions = [(0, 32, 0, 32), (0, 32, 32, 64), (32, 64, 0, 32),
               (32, 64, 32, 64)]
    together = crop_det_samples(sample, regions)
    for (y0, y1, x0, x1), got in zip(regions, together):
        want = crop_det_sample(sample, y0, y1, x0, x1)
        assert got.img_shape == want.img_shape == (y1 - y0, x1 - x0)
        for key in ('gt_instances', 'ignored_instances'):
            a, b = got.get(key), want.get(key)
            assert set(a.keys()) == set(b.keys())
            assert torch.equal(a.bboxes.tensor, b.bboxes.tensor)
        a, b = got.gt_instances, want.gt_instances
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.masks.masks, b.masks.masks)
