"""tools/analysis/benchmark_memory.py on tiny detection/segmentation models."""
import importlib.util
import json
import math
import os.path as osp
import sys

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS

from conftest import REPO
from tool_server import run_tool_fast as run_tool

# the tool imports its sibling cuda_like_focal_loss.py (its own folder is on
# sys.path when it runs as a script): run alone, this file needs it too
if osp.join(REPO, 'tools', 'analysis') not in sys.path:
    sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
_spec = importlib.util.spec_from_file_location(
    'benchmark_memory',
    osp.join(REPO, 'tools', 'analysis', 'benchmark_memory.py'))
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)

# Narrow ResNet-18s, so that activations and not parameter gradients make
# the peak, as in real training at real resolutions. (Even so, at 128x128
# the tiny RetinaNet's peak is the stem's backward -- im2col buffer plus all
# gradients -- where checkpointing cannot help: it runs at 256x256.)
# The upstream bases keep SyncBN (FCN) and pretrained weights: the tool
# must replace/drop them.
RETINANET_TINY = """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(depth=18, base_channels=16, frozen_stages=-1),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32,
                   stacked_convs=1))
"""
FCN_TINY = """
_base_ = ['mmseg::_base_/models/fcn_r50-d8.py',
          'mmseg::_base_/default_runtime.py']
crop_size = (64, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(depth=18, stem_channels=8, base_channels=8),
    decode_head=dict(in_channels=64, channels=16, num_convs=1,
                     num_classes=5),
    auxiliary_head=dict(in_channels=32, channels=8, num_classes=5))
"""
# a stand-in for mmlocal.LocalLearner: wraps a model, calls phase_callback
FAKE_LOCAL = """
_base_ = './fcn_tiny.py'
model = dict(_delete_=True, type='BenchTestFakeLocalLearner',
             model={{_base_.model}})
"""


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine
    OpenMP barriers (spinning threads waiting for descheduled ones) make
    them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@MODELS.register_module(name='BenchTestFakeLocalLearner', force=True)
class FakeLocalLearner(BaseModel):

    def __init__(self, model):
        super().__init__()
        self.model = MODELS.build(model)
        self.data_preprocessor = self.model.data_preprocessor
        self.phase_callback = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train_step(self, data, optim_wrapper):
        data = self.data_preprocessor(data, True)
        x = self.model.extract_feat(data['inputs'])
        # "module 0": the backbone with a dummy local loss on its features
        optim_wrapper.backward(sum(f.mean() for f in x) * 0)
        if self.phase_callback is not None:
            self.phase_callback('module0')
        losses = self.model.loss(data['inputs'], data['data_samples'])
        loss, log_vars = self.model.parse_losses(losses)
        optim_wrapper.backward(loss)
        if self.phase_callback is not None:
            self.phase_callback('module1')
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        return log_vars


@pytest.fixture(scope='module')
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp('bm_configs')
    paths = {}
    for name, text in (('retinanet', RETINANET_TINY), ('fcn', FCN_TINY),
                       ('fake_local', FAKE_LOCAL)):
        paths[name] = str(root / f'{name}_tiny.py')
        with open(paths[name], 'w') as f:
            f.write(text)
    return paths


def _check_modes(report, out_dir):
    e2e, cp = report['modes']['e2e'], report['modes']['checkpoint']
    for r in (e2e, cp):
        assert r['available'], r
        assert r['peak_bytes'] > 0 and math.isfinite(r['peak_bytes'])
        assert r['time_s'] > 0 and len(r['times_s']) == report['iters']
        assert r['loss'] is not None and math.isfinite(r['loss'])
        assert r['params_trainable'] > 0
    assert cp['peak_bytes'] < e2e['peak_bytes']
    assert cp['params_total'] == e2e['params_total']
    assert cp['params_trainable'] == e2e['params_trainable']
    assert cp['param_bytes'] == e2e['param_bytes']
    assert e2e['mem_ratio'] == 1.0
    assert cp['mem_ratio'] == pytest.approx(
        cp['peak_bytes'] / e2e['peak_bytes'])
    local = report['modes']['local']
    assert not local['available'] and not local.get('error')
    assert 'not a LocalLearner' in local['reason']
    table = bm.format_table(report)
    assert 'checkpoint' in table and report['method'] in table
    assert 'local: unavailable' in table

    json_file = out_dir / 'report.json'
    bm.save_json(report, str(json_file))
    loaded = json.loads(json_file.read_text())
    assert loaded['modes']['e2e']['peak_bytes'] == e2e['peak_bytes']
    png = out_dir / 'report.png'
    bm.save_plot(report, str(png))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_retinanet_e2e_vs_checkpoint(configs, tmp_path):
    report = bm.run_benchmark(
        configs['retinanet'], modes=['e2e', 'checkpoint', 'local'],
        input_shape=(1, 3, 256, 256), iters=1, warmup=1, device='cpu')
    assert report['task'] == 'det' and report['num_classes'] == 3
    assert report['method'] == 'torch_profiler_memory_events'
    _check_modes(report, tmp_path)


def test_fcn_e2e_vs_checkpoint(configs, tmp_path):
    cfg = bm.load_config(configs['fcn'])
    # the upstream base uses SyncBN and pretrained weights: both removed
    assert cfg.model.backbone.norm_cfg.type == 'SyncBN'
    model_cfg = bm.mode_model_cfg(cfg, 'checkpoint')
    assert model_cfg.backbone.norm_cfg.type == 'BN'
    assert model_cfg.decode_head.norm_cfg.type == 'BN'
    assert model_cfg.pretrained is None and model_cfg.backbone.with_cp
    report = bm.run_benchmark(
        cfg, modes=['e2e', 'checkpoint', 'local'],
        input_shape=(1, 3, 64, 128), iters=1, warmup=1, device='cpu')
    assert report['task'] == 'seg' and report['num_classes'] == 5
    _check_modes(report, tmp_path)


def test_random_batches_are_valid():
    det = bm.make_random_batch((2, 3, 96, 160), 'det', num_classes=7,
                               seed=3)
    assert len(det['inputs']) == 2
    assert det['inputs'][0].dtype == torch.uint8
    assert det['inputs'][0].shape == (3, 96, 160)
    for sample in det['data_samples']:
        boxes = sample.gt_instances.bboxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 96).all()
        assert (boxes[:, 2] - boxes[:, 0] >= 8).all()
        assert (boxes[:, 3] - boxes[:, 1] >= 8).all()
        labels = sample.gt_instances.labels
        assert labels.dtype == torch.long
        assert ((labels >= 0) & (labels < 7)).all()
        assert sample.img_shape == (96, 160)
    again = bm.make_random_batch((2, 3, 96, 160), 'det', 7, seed=3)
    assert torch.equal(again['inputs'][1], det['inputs'][1])

    seg = bm.make_random_batch((1, 3, 32, 48), 'seg', num_classes=4)
    label = seg['data_samples'][0].gt_sem_seg.data
    assert label.shape == (1, 32, 48) and label.dtype == torch.long
    valid = label[label != 255]
    assert ((valid >= 0) & (valid < 4)).all()
    assert (label == 255).any() and valid.numel() > 0.8 * label.numel()
    with pytest.raises(ValueError, match='input-shape'):
        bm.make_random_batch((3, 32), 'seg', 4)


def test_local_mode_reports_phases(configs):
    report = bm.run_benchmark(
        configs['fake_local'], modes=['local', 'e2e'],
        input_shape=(1, 3, 64, 128), iters=1, warmup=1, device='cpu')
    local, e2e = report['modes']['local'], report['modes']['e2e']
    assert local['available'], local
    assert list(local['phases']) == ['module0', 'module1', bm.REST_PHASE]
    assert max(local['phases'].values()) == local['peak_bytes']
    # the plain model of a LocalLearner config is its inner model
    assert e2e['params_total'] == local['params_total']
    assert not e2e['phases']


def test_cli_smoke(configs, tmp_path):
    out_json = tmp_path / 'out.json'
    out_png = tmp_path / 'out.png'
    proc = run_tool([
        'tools/analysis/benchmark_memory.py', configs['retinanet'],
        '--modes', 'e2e', 'local', '--input-shape', '1', '3', '128', '128',
        '--iters', '1', '--warmup', '0', '--device', 'cpu', '--json',
        str(out_json), '--plot', str(out_png), '--cfg-options',
        'model.bbox_head.feat_channels=16'
    ], env={'OMP_NUM_THREADS': '1'})
    assert 'torch_profiler_memory_events' in proc.stdout
    assert 'local: unavailable' in proc.stdout
    report = json.loads(out_json.read_text())
    assert report['modes']['e2e']['peak_bytes'] > 0
    assert report['input_shape'] == [1, 3, 128, 128]
    assert report['warmup'] == 0
    assert out_png.stat().st_size > 0
    # a missing config fails with a message naming it
    with pytest.raises(FileNotFoundError, match='nope.py'):
        bm.main(['nope.py'])
    with pytest.raises(FileNotFoundError, match='mmdet::nope/nope.py'):
        bm.main(['mmdet::nope/nope.py'])


def test_models_are_initialised_like_the_runner(configs):
    """The benchmarks call ``init_weights()`` as the Runner does: without
    it RetinaNet's classifier starts at bias 0 instead of the focal-loss
    prior, the loss starts ~1000x too high and a LocalLearner's aux heads
    diverged to NaN after two SGD steps at the configs' learning rate."""
    from mmengine.registry import init_default_scope
    cfg = bm.load_config(configs['retinanet'])
    init_default_scope('mmdet')
    model = bm.build_train_model(bm.mode_model_cfg(cfg, 'e2e'))
    assert model.training
    prior = -math.log((1 - 0.01) / 0.01)
    bias = model.bbox_head.retina_cls.bias
    assert torch.allclose(bias, torch.full_like(bias, prior))
    result = bm.run_mode(cfg, 'e2e', (1, 3, 64, 64), iters=1, warmup=0)
    # focal loss of an untrained, prior-initialised head: about 1.1
    assert result['loss'] is not None and result['loss'] < 10


@pytest.mark.parametrize('task, pre, shape, seen', [
    # mmseg pads to the crop size: a smaller --input-shape is measured at it
    ('seg', dict(type='mmseg.SegDataPreProcessor', size=(64, 96)),
     (2, 3, 32, 48), (2, 3, 64, 96)),
    ('seg', dict(type='mmseg.SegDataPreProcessor', size_divisor=32),
     (1, 3, 40, 70), (1, 3, 64, 96)),
    ('det', dict(type='mmdet.DetDataPreprocessor', pad_size_divisor=32),
     (2, 3, 80, 133), (2, 3, 96, 160)),
    ('det', dict(type='mmdet.DetDataPreprocessor'), (1, 3, 80, 133),
     (1, 3, 80, 133)),
])
def test_model_input_shape_is_what_the_preprocessor_makes(
        task, pre, shape, seen):
    """The tools report the shape the model computes on (the padded one),
    the one the config's own data preprocessor produces."""
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg' if task == 'seg' else 'mmdet')
    cfg = dict(data_preprocessor=pre)
    assert bm.model_input_shape(cfg, shape) == seen
    preprocessor = MODELS.build(pre)
    batch = bm.make_random_batch(shape, task, num_classes=3)
    assert tuple(preprocessor(batch, True)['inputs'].shape) == seen
    text = bm.describe_input(cfg, shape)
    assert text.startswith('x'.join(map(str, shape)))
    assert ('padded to' in text) == (seen != shape)
