"""tools/deploy.py: training checkpoint -> stock checkpoint + stock config
that mmdet's init_detector / mmseg's init_model load without mmlocal."""
import copy
import importlib.util
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from conftest import REPO
from tool_server import run_tool_fast
from local_utils import (TINY_FCN, TINY_RETINANET, det_batch, seg_batch,
                         small_aux)
from mmlocal.registry import MODELS
from test_repl import randomize

TOOL = 'tools/deploy.py'

# mmlocal is installed in the environment (editable): this finder makes
# every import of it fail, as on a machine with only mmdet/mmseg
HIDE_MMLOCAL = """
import sys
class _HideMMLocal:
    def find_spec(self, name, path=None, target=None):
        if name == 'mmlocal' or name.startswith('mmlocal.'):
            raise ModuleNotFoundError(f'{name} is hidden in this test')
        return None
sys.meta_path.insert(0, _HideMMLocal())
"""


def _repl(backbone):
    return dict(type='mmlocal.RepLBackbone',
                backbone=dict(backbone, zero_init_residual=False),
                interval=2,
                transform=dict(type='mmlocal.RepLLowRankMix', rank=2))


def det_config():
    model = copy.deepcopy(TINY_RETINANET)
    model['backbone'] = _repl(model['backbone'])
    return dict(
        default_scope='mmdet',
        model=dict(type='mmlocal.LocalLearner', model=model, num_modules=2,
                   aux=small_aux('mmlocal.MomentumAux')),
        custom_imports=dict(imports=['mmlocal.utils.trusted_checkpoints'],
                            allow_failed_imports=False),
        custom_hooks=[dict(type='mmlocal.MomentumAuxHook'),
                      dict(type='EMAHook')],
        model_wrapper_cfg=dict(type='mmlocal.LocalDistributedDataParallel'),
        test_dataloader=dict(batch_size=1, dataset=dict(
            type='mmlocal.SODADataset', data_root='data/soda/',
            pipeline=[dict(type='LoadImageFromFile')])))


def seg_config():
    model = copy.deepcopy(TINY_FCN)
    model['backbone'] = _repl(model['backbone'])
    return dict(
        default_scope='mmseg',
        model=dict(type='mmlocal.LocalLearner', model=model, num_modules=3,
                   aux=small_aux('mmlocal.DGLAux')),
        custom_hooks=[dict(type='mmlocal.PeakMemoryHook', interval=1)])


def train_and_save(tmp_path, cfg_dict, batch):
    """Build the training model of a config, train one step, save an
    mmengine-style checkpoint (optimizer, message hub, numpy meta)."""
    cfg = Config(cfg_dict)
    cfg_path = tmp_path / 'train_cfg.py'
    cfg.dump(str(cfg_path))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        torch.manual_seed(0)
        learner = MODELS.build(ConfigDict(copy.deepcopy(cfg.model)))
    learner.init_weights()
    learner.aux_nets.apply(lambda m: setattr(m, 'ema_driven', True))
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01,
                                      momentum=0.9))
    learner.train_step(batch, ow)
    randomize(learner)
    hub = MessageHub.get_instance('test_deploy_hub')
    hub.update_scalar('train/loss', 1.0)
    ckpt = dict(
        meta=dict(iter=1, seed=np.int64(3), cfg=cfg.pretty_text,
                  dataset_meta=dict(classes=('a', 'b', 'c'))),
        state_dict=learner.state_dict(),
        optimizer=ow.state_dict(),
        message_hub=hub.state_dict(),
        ema_state_dict={'steps': torch.tensor(1)})
    ckpt_path = tmp_path / 'iter_1.pth'
    torch.save(ckpt, ckpt_path)
    return learner, str(cfg_path), str(ckpt_path)


def deploy(*args):
    return run_tool_fast([TOOL, *map(str, args)], check=False)


def tool():
    """tools/deploy.py as a module (in-process runs of ``main``)."""
    spec = importlib.util.spec_from_file_location(
        'mmlocal_deploy_tool', osp.join(REPO, TOOL))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_in_stock_process(tmp_path, learner, scope, out_dir, name):
    """Load the deployed files with mmdet/mmseg's own API in a process where
    mmlocal cannot be imported; compare its raw outputs with the trained
    model's."""
    root = learner.model.eval()
    batch = (det_batch(n=2, size=64, seed=5) if scope == 'mmdet' else
             seg_batch(n=2, size=64, seed=5))
    with torch.no_grad():
        inputs = root.data_preprocessor(batch, False)['inputs']
        out = root(inputs, mode='tensor')
    flat = out if torch.is_tensor(out) else [t for level in out
                                             for t in level]
    ref = tmp_path / 'reference.pt'
    torch.save(dict(inputs=inputs, outputs=list(
        flat if isinstance(flat, list) else [flat])), ref)
    init = ('from mmdet.apis import init_detector as init'
            if scope == 'mmdet' else 'from mmseg.apis import init_model as '
            'init')
    code = HIDE_MMLOCAL + f"""
import torch
from mmengine.config import Config
from mmengine.runner import load_checkpoint
{init}
cfg_path, ckpt_path = {str(out_dir / (name + '.py'))!r}, \
    {str(out_dir / (name + '.pth'))!r}
cfg = Config.fromfile(cfg_path)
assert 'mmlocal' not in cfg.pretty_text
assert cfg.default_scope == {scope!r} and cfg.model._scope_ == {scope!r}
model = init(cfg_path, ckpt_path, device='cpu')
load_checkpoint(model, ckpt_path, map_location='cpu', strict=True)
sd = torch.load(ckpt_path, weights_only=True)
assert set(sd) == {{'meta', 'state_dict'}}, set(sd)
assert model.dataset_meta['classes'] == ('a', 'b', 'c'), model.dataset_meta
ref = torch.load({str(ref)!r}, weights_only=True)
with torch.no_grad():
    out = model(ref['inputs'], mode='tensor')
flat = [out] if torch.is_tensor(out) else [t for lvl in out for t in lvl]
assert len(flat) == len(ref['outputs'])
diff = max((a - b).abs().max().item() for a, b in zip(flat, ref['outputs']))
scale = max(b.abs().max().item() for b in ref['outputs'])
assert diff <= 1e-5 + 1e-5 * scale, (diff, scale)  # deploy.py's tolerance
assert not any(m == 'mmlocal' or m.startswith('mmlocal.')
               for m in sys.modules)
try:
    import mmlocal  # noqa: F401
except ModuleNotFoundError:
    print('HIDDEN')
print('DIFF', diff, 'TYPE', type(model).__name__)
"""
    # the tool server's process never imported mmlocal (tool_server.py)
    proc = run_tool_fast(['-c', code], cwd='/', check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert 'HIDDEN' in proc.stdout
    return proc.stdout


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_deploy_local_learner_with_repl(tmp_path, task):
    if task == 'det':
        cfg_dict, batch, scope = det_config(), det_batch(), 'mmdet'
    else:
        cfg_dict, batch, scope = seg_config(), seg_batch(), 'mmseg'
    learner, cfg_path, ckpt_path = train_and_save(tmp_path, cfg_dict, batch)
    out_dir = tmp_path / 'deploy'
    proc = deploy(cfg_path, ckpt_path, out_dir, '--name', 'stock')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert 'max output difference' in proc.stdout

    stock = Config.fromfile(str(out_dir / 'stock.py'))
    text = stock.pretty_text
    assert 'mmlocal' not in text and 'RepLBackbone' not in text
    assert 'model_wrapper_cfg' not in stock and 'custom_imports' not in stock
    assert stock.model.type in ('RetinaNet', 'EncoderDecoder')
    assert stock.model.backbone.type in ('ResNet', 'ResNetV1c')
    if task == 'det':
        assert [h['type'] for h in stock.custom_hooks] == ['EMAHook']
        assert stock.test_dataloader.dataset.type == 'XMLDataset'
    ckpt = torch.load(out_dir / 'stock.pth', weights_only=True)
    keys = set(ckpt['state_dict'])
    assert not any(k.startswith(('aux_nets.', 'model.')) or
                   'replacements' in k for k in keys)
    # the replaced blocks got materialised weights
    replaced = learner.model.backbone.replaced_blocks
    assert replaced and all(f'backbone.{b}.conv1.weight' in keys
                            for b in replaced)
    assert ckpt['meta']['iter'] == 1 and ckpt['meta']['seed'] == 3
    assert 'mmlocal' not in ckpt['meta']['cfg']

    out = check_in_stock_process(tmp_path, learner, scope, out_dir, 'stock')
    assert ('RetinaNet' if task == 'det' else 'EncoderDecoder') in out

    # existing outputs are never overwritten silently (either file)
    pth, py = out_dir / 'stock.pth', out_dir / 'stock.py'
    before = pth.read_bytes()
    deployer = tool()
    pth.rename(tmp_path / 'saved.pth')
    py.write_text('# user notes\n')  # only the config exists
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        deployer.deploy(cfg_path, ckpt_path, str(out_dir), name='stock')
    assert not pth.exists() and py.read_text() == '# user notes\n'
    (tmp_path / 'saved.pth').rename(pth)
    py.unlink()  # only the checkpoint exists
    assert deployer.main([cfg_path, ckpt_path, str(out_dir), '--name',
                          'stock']) == 1
    assert pth.read_bytes() == before and not py.exists()
    if task == 'det':
        assert deployer.main([cfg_path, ckpt_path, str(out_dir), '--name',
                              'stock', '--force']) == 0
        assert 'mmlocal' not in (out_dir / 'stock.py').read_text()


def test_deploy_plain_and_mismatched_checkpoints(tmp_path):
    """A plain RepL detector (no LocalLearner) deploys; a checkpoint of
    another model is refused with the file named; nothing is written."""
    model = copy.deepcopy(TINY_RETINANET)
    model['backbone'] = _repl(model['backbone'])
    cfg = Config(dict(default_scope='mmdet', model=model))
    cfg_path = tmp_path / 'repl_cfg.py'
    cfg.dump(str(cfg_path))
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        net = MODELS.build(ConfigDict(copy.deepcopy(model)))
    randomize(net)
    ckpt_path = tmp_path / 'repl.pth'
    torch.save(dict(meta=dict(), state_dict=net.state_dict()), ckpt_path)
    deployer = tool()
    result = deployer.deploy(str(cfg_path), str(ckpt_path),
                             str(tmp_path / 'out'))
    assert result['diff'] <= 1e-5 and result['scope'] == 'mmdet'
    assert (tmp_path / 'out' / 'repl_cfg.pth').is_file()

    other = tmp_path / 'fcn.pth'
    with DefaultScope.overwrite_default_scope('mmseg'):
        fcn = MODELS.build(ConfigDict(copy.deepcopy(TINY_FCN)))
    torch.save(dict(state_dict=fcn.state_dict()), other)
    with pytest.raises(deployer.DeployError,
                       match=r"fcn\.pth' does not match the model of config"):
        deployer.deploy(str(cfg_path), str(other), str(tmp_path / 'bad'))
    assert not (tmp_path / 'bad').exists()
