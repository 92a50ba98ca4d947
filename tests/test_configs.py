"""Every shipped config parses; local-learning configs build their model."""
import glob
import os.path as osp

import pytest
from mmengine.registry import MODELS, DefaultScope

from conftest import REPO
from local_utils import parsed_config

ALL = sorted(glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                       recursive=True))
ALL = [p for p in ALL if '/_base_/' not in p]
LOCAL = sorted(glob.glob(osp.join(REPO, 'configs', 'local', '*.py')))


def _demo_default_config():
    """The config ``bash tools/demo.sh`` trains when given none."""
    import re
    with open(osp.join(REPO, 'tools', 'demo.sh')) as f:
        path, = re.findall(r'CONFIG="\$\{1:-([^}]+)\}"', f.read())
    return osp.join(REPO, path)


def _offline(model_cfg):
    """No downloads, no SyncBN: what a single CPU process can build."""
    if isinstance(model_cfg, dict):
        if model_cfg.get('type') == 'SyncBN':
            model_cfg['type'] = 'BN'
        if 'init_cfg' in model_cfg and isinstance(
                model_cfg['init_cfg'], dict) and model_cfg['init_cfg'].get(
                    'type') == 'Pretrained':
            model_cfg['init_cfg'] = None
        if model_cfg.get('pretrained'):
            model_cfg['pretrained'] = None
        for value in model_cfg.values():
            _offline(value)
    elif isinstance(model_cfg, (list, tuple)):
        for value in model_cfg:
            _offline(value)
    return model_cfg


@pytest.mark.parametrize('path', ALL, ids=lambda p: osp.relpath(p, REPO))
def test_config_parses(path):
    cfg = parsed_config(path)
    assert 'model' in cfg, path
    assert cfg.get('default_scope') in ('mmdet', 'mmseg'), path


@pytest.mark.parametrize(
    'path', [p for p in LOCAL if '_k4_' in p and 'infopro' in p] +
    [p for p in LOCAL if '_k2_' in p and 'dgl' in p] +
    [_demo_default_config()],
    ids=lambda p: osp.basename(p))
def test_local_config_builds(path):
    cfg = parsed_config(path)
    assert cfg.model.type == 'mmlocal.LocalLearner'
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(_offline(cfg.model))
    k = cfg.model.get('num_modules') or \
        len(cfg.model.get('split_points')) + 1
    assert model.num_modules == k and len(model.aux_nets) == k - 1
    # the K in the file name
    assert f'_k{k}_' in osp.basename(path)
    if cfg.model.get('split_points') is not None:
        assert [s for s, _ in model.module_ranges[1:]] == \
            list(cfg.model.split_points)
    assert type(model.aux_nets[0]).__name__ == \
        cfg.model.aux.type.split('.')[-1]


@pytest.mark.parametrize('path', [p for p in LOCAL if '-cp_' in p],
                         ids=lambda p: osp.basename(p))
def test_checkpointing_configs_build(path):
    """The low-memory variants checkpoint the blocks their comments name
    (not the last block of a module, which saved nothing measurable)."""
    cfg = parsed_config(path)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(_offline(cfg.model))
    assert all(aux.with_cp for aux in model.aux_nets)
    blocks = model.checkpoint_blocks
    assert blocks and model._seq.checkpointed == frozenset(blocks)
    last_blocks = {end - 1 for _, end in model.module_ranges}
    assert not set(blocks) & last_blocks
