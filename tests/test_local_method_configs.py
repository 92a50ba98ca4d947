"""Configs of the MAN / MAN++ / HPFF / MLAAN / AugLocal families: every one
parses, has its hooks, and the K=4 RetinaNet ones build."""
import glob
import os.path as osp

import pytest
from mmengine.registry import MODELS, DefaultScope

from conftest import REPO
from local_utils import parsed_config
from test_configs import _offline

FAMILIES = ('man', 'manpp', 'hpff', 'mlaan', 'auglocal')
CONFIGS = sorted(
    p for f in FAMILIES
    for p in glob.glob(osp.join(REPO, 'configs', '*', f'{f}_*.py')))


def test_every_family_has_its_configs():
    names = {osp.basename(p) for p in CONFIGS}
    for family in FAMILIES:
        for rest in ('retinanet_r50_fpn_k4_8xb2-1x_coco.py',
                     'faster-rcnn_r50_fpn_k4_8xb2-1x_coco.py',
                     'deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py',
                     'deeplabv3_r50-d8_k4_4xb2-40k_cityscapes-512x1024.py'):
            assert f'{family}_{rest}' in names, (family, rest)
        assert any(n.startswith(family + '_') and n.endswith(
            'demo-trees.py') for n in names), family


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_parses(path):
    cfg = parsed_config(path)
    assert cfg.model.type == 'mmlocal.LocalLearner'
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    assert 'mmlocal.PeakMemoryHook' in hooks
    if cfg.model.aux.type in ('mmlocal.MomentumAux', 'mmlocal.MLAANAux'):
        assert 'mmlocal.MomentumAuxHook' in hooks


_BUILT = {}


def _build(path):
    """The config's model (offline); HPFF's kept for the PFF test below
    (which only reads it), the others not (an R50 K=4 is large)."""
    if path in _BUILT:
        return _BUILT[path]
    cfg = parsed_config(path)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(_offline(cfg.model))
    if 'hpff_' in osp.basename(path):
        _BUILT[path] = model
    return model


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if 'retinanet_r50_fpn_k4' in p],
    ids=osp.basename)
def test_k4_retinanet_config_builds(path):
    cfg = parsed_config(path)
    model = _build(path)
    assert model.num_modules == 4 and len(model.aux_nets) == 3
    assert type(model.aux_nets[0]).__name__ == \
        cfg.model.aux.type.split('.')[-1]


@pytest.mark.parametrize(
    'path', [p for p in CONFIGS if 'hpff_' in p and '_coco' in p],
    ids=osp.basename)
def test_pff_detection_configs_take_odd_feature_maps(path):
    """COCO images padded to a multiple of 32 give odd maps at stride 32
    (800x1344 -> 25x42): the PFF grid must not refuse them."""
    import torch
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    from mmlocal.models.local.aux.pff import release_patch_layouts
    model = _build(path)
    nets = [a for a in model.aux_nets if getattr(a, 'patch_grid', 1) > 1]
    assert nets
    for aux in nets:
        stride = aux.in_stride
        inputs = torch.zeros(1, 3, 25 * stride, 42 * stride)
        sample = DetDataSample(metainfo=dict(
            img_shape=inputs.shape[-2:], pad_shape=inputs.shape[-2:]))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[10., 10., 300., 200.]]),
            labels=torch.tensor([0]))
        h = torch.zeros(1, 2, 25, 42)
        if aux.patch_parts == 'recon':
            patches = aux.recon_patches(h, inputs, [sample])
            # each feature patch comes with its image region
            assert all(img.shape[-2:] == (p.shape[-2] * stride,
                                          p.shape[-1] * stride)
                       for p, img, _ in patches)
        else:
            patches = aux.patches(h, inputs, [sample])
        assert len(patches) == aux.patch_grid ** 2
        assert sum(p[0].shape[-2] * p[0].shape[-1]
                   for p in patches) == 25 * 42
        release_patch_layouts(inputs)
