"""Pretrained blocks into a split backbone; stock checkpoints out."""
import copy

import torch
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.registry import DefaultScope

from conftest import REPO
from tool_server import run_tool_fast
from local_utils import TINY_RETINANET, det_batch, small_aux
from mmlocal.registry import MODELS


def _learner(model_cfg, **kwargs):
    cfg = dict(type='mmlocal.LocalLearner', model=ConfigDict(model_cfg),
               num_modules=4, aux=small_aux(), **kwargs)
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg)


def test_pretrained_backbone_loads_after_split(tmp_path):
    """init_cfg=Pretrained on the wrapped backbone: same keys, same values."""
    with DefaultScope.overwrite_default_scope('mmdet'):
        source = MODELS.build(ConfigDict(TINY_RETINANET['backbone'],
                                         _scope_='mmdet'))
    for p in source.parameters():
        torch.nn.init.normal_(p)
    ckpt = tmp_path / 'resnet18_imagenet.pth'
    torch.save({'state_dict': source.state_dict()}, ckpt)

    model_cfg = copy.deepcopy(TINY_RETINANET)
    model_cfg['backbone']['init_cfg'] = dict(type='Pretrained',
                                             checkpoint=str(ckpt))
    learner = _learner(model_cfg)
    learner.init_weights()
    loaded = learner.model.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    # the split view runs exactly those weights
    x = torch.randn(1, 3, 64, 64)
    learner.eval()
    source.eval()
    for a, b in zip(learner._seq.forward(x), source(x)):
        torch.testing.assert_close(a, b)


def test_strip_aux_output_loads_into_stock_model(tmp_path):
    learner = _learner(TINY_RETINANET)
    learner.init_weights()
    learner.train_step(det_batch(), OptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.01)))
    src = tmp_path / 'iter_1.pth'
    torch.save({'meta': {'iter': 1}, 'state_dict': learner.state_dict(),
                'optimizer': {}}, src)
    dst = tmp_path / 'deploy.pth'
    proc = run_tool_fast(
        ['tools/model_converters/strip_aux.py', str(src), str(dst)],
        check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'training-only tensors dropped' in proc.stdout

    # load into the stock mmdet model in a process that never imports mmlocal
    code = f"""
import sys, torch
from mmengine.config import ConfigDict
from mmengine.registry import MODELS, init_default_scope
sys.path.insert(0, {str(REPO + '/tests')!r})
from local_utils import TINY_RETINANET
init_default_scope('mmdet')
model = MODELS.build(ConfigDict(TINY_RETINANET))
ckpt = torch.load({str(dst)!r}, map_location='cpu', weights_only=True)
missing, unexpected = model.load_state_dict(ckpt['state_dict'], strict=True)
assert 'mmlocal' not in sys.modules
print('LOADED', len(ckpt['state_dict']))
"""
    # the tool server's process never imported mmlocal (tool_server.py)
    proc = run_tool_fast(['-c', code], cwd='/', check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'LOADED' in proc.stdout
    stripped = torch.load(dst, map_location='cpu', weights_only=True)
    for key, value in learner.model.state_dict().items():
        assert torch.equal(stripped['state_dict'][key], value), key
    assert not any(k.startswith('aux_nets') for k in stripped['state_dict'])

    # never overwrites what a user saved
    proc = run_tool_fast(
        ['tools/model_converters/strip_aux.py', str(src), str(dst)],
        check=False, timeout=300)
    assert proc.returncode != 0 and 'refusing to overwrite' in proc.stderr


def test_paramwise_custom_keys_reach_aux_parameters():
    learner = _learner(TINY_RETINANET)
    ow = build_optim_wrapper(learner, dict(
        type='OptimWrapper',
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
        paramwise_cfg=dict(custom_keys={'aux_nets': dict(lr_mult=0.5)})))
    aux_ids = {id(p) for p in learner.aux_nets.parameters()}
    lrs = {}
    for group in ow.optimizer.param_groups:
        for p in group['params']:
            lrs[id(p)] = group['lr']
    assert aux_ids and all(lrs[i] == 0.05 for i in aux_ids)
    others = [lrs[id(p)] for p in learner.model.parameters()]
    assert others and all(lr == 0.1 for lr in others)
    out = learner.train_step(det_batch(), ow)
    assert torch.isfinite(out['loss'])
