"""GSO-YOLO: the GOM/SCM blocks, the YOLOv8 model at every size, loss and
predict on a random batch, training on the real demo data, the configs."""
import copy
import functools
import glob
import json
import os.path as osp

import pytest
import torch
from mmengine.registry import DefaultScope

from conftest import REPO
from tool_server import run_tool_fast as run_tool
from local_utils import det_batch, parsed_config

CONFIG_DIR = osp.join(REPO, 'configs', 'gso_yolo')
GSO_MODEL = osp.join(REPO, 'configs', '_base_', 'models', 'gso_yolo_s.py')
TINY_CFG = osp.join(REPO, 'tests', 'configs', 'gso_yolo_tiny_demo.py')

# (deepen, widen, last stage channels, parameters of Ultralytics' YOLOv8
# with 80 classes, which include the 16 of its frozen DFL conv)
SIZES = {
    'n': (0.33, 0.25, 1024, 3157200),
    's': (0.33, 0.50, 1024, 11166560),
    'm': (0.67, 0.75, 768, 25902640),
    'l': (1.00, 1.00, 512, 43691520),
    'x': (1.00, 1.25, 512, 68229648),
}


@pytest.fixture(autouse=True)
def mmdet_scope():
    import mmdet.registry  # noqa: F401
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread; on a busy machine a second
    one stalls every parallel region (10-100x slower, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(cfg):
    from mmdet.registry import MODELS
    return MODELS.build(copy.deepcopy(cfg))


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _sized(model_cfg, size):
    deepen, widen, last, _ = SIZES[size]
    cfg = copy.deepcopy(model_cfg)
    cfg.backbone.update(
        deepen_factor=deepen, widen_factor=widen, last_stage_out_channels=last)
    cfg.neck.update(
        deepen_factor=deepen,
        widen_factor=widen,
        in_channels=[256, 512, last],
        out_channels=[256, 512, last])
    cfg.bbox_head.update(widen_factor=widen, in_channels=[256, 512, last])
    return cfg


@pytest.fixture(scope='module')
def tiny_model_cfg():
    cfg = parsed_config(TINY_CFG).model
    cfg.bbox_head.num_classes = 2
    return cfg


# ----------------------------------------------------------- GOM and SCM
@pytest.mark.parametrize('block', [
    dict(type='mmlocal.GAMAttention', channels=32),
    dict(type='mmlocal.GAMAttention', channels=32, groups=4),
    dict(type='mmlocal.EMAttention', channels=32, groups=8),
])
def test_gom_scm_keep_shape_and_are_differentiable(block):
    module = _build(block)
    x = torch.randn(2, 32, 9, 7, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize('cfg, option', [
    (dict(type='mmlocal.EMAttention', channels=30, groups=8), 'groups'),
    (dict(type='mmlocal.GAMAttention', channels=8, reduction=16), 'reduction'),
    (dict(type='mmlocal.GAMAttention', channels=16, groups=3), 'groups'),
    (dict(type='mmlocal.YOLOv8CSPDarknet', gom='GAM'), 'gom'),
    (dict(type='mmlocal.YOLOv8CSPDarknet', widen_factor=0), 'widen_factor'),
    (dict(type='mmlocal.YOLOv8CSPDarknet', out_indices=(5, )), 'out_indices'),
    (dict(
        type='mmlocal.YOLOv8PAFPN', in_channels=[64, 128],
        out_channels=[64]), 'out_channels'),
    (dict(type='mmlocal.YOLOv8Head', num_classes=0), 'num_classes'),
    (dict(type='mmlocal.YOLOv8Head', num_classes=2,
          in_channels=[8, 16]), 'prior_generator'),
])
def test_bad_arguments_name_the_option(cfg, option):
    with pytest.raises(ValueError, match=option):
        _build(cfg)


# ------------------------------------------------------ the model, n to x
def test_every_size_builds_and_matches_yolov8():
    """GSO-YOLO builds at n/s/m/l/x; without GOM and SCM it has exactly
    YOLOv8's parameters (our DFL has no frozen conv: 16 fewer)."""
    model_cfg = parsed_config(GSO_MODEL).model
    for size in SIZES:
        model = _build(_sized(model_cfg, size))
        stage4 = model.backbone.stage4
        assert [type(m).__name__ for m in stage4] == [
            'ConvModule', 'C2f', 'GAMAttention', 'SPPF', 'EMAttention'
        ], size
        gom_scm = _numel(stage4[2]) + _numel(stage4[4])
        assert _numel(model) - gom_scm == SIZES[size][3] - 16, size
        if size == 'n':
            model.eval()
            with torch.no_grad():
                cls_scores, dists = model(torch.rand(1, 3, 64, 64))
            assert [tuple(c.shape) for c in cls_scores] == [(1, 80, 8, 8),
                                                            (1, 80, 4, 4),
                                                            (1, 80, 2, 2)]
            assert [tuple(d.shape) for d in dists] == [(1, 64, 8, 8),
                                                       (1, 64, 4, 4),
                                                       (1, 64, 2, 2)]


def test_loss_and_predict_on_random_batch(tiny_model_cfg):
    model = _build(tiny_model_cfg)
    model.init_weights()
    data = model.data_preprocessor(det_batch(2, 64), True)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert set(losses) == {'loss_cls', 'loss_bbox', 'loss_dfl'}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)

    # YOLOv8's scaling by the batch size is exactly a factor 2 here
    model.bbox_head.loss_batch_scale = True
    with torch.no_grad():
        scaled = model.loss(data['inputs'], data['data_samples'])
    for key in losses:
        torch.testing.assert_close(scaled[key], 2 * losses[key])

    model.eval()
    data = model.data_preprocessor(det_batch(2, 64, seed=1), False)
    with torch.no_grad():
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 2
    for res in results:
        pred = res.pred_instances
        assert len(pred) > 0
        assert pred.bboxes.min() >= 0 and pred.bboxes.max() <= 64
        assert ((pred.scores >= 0) & (pred.scores <= 1)).all()
        assert ((pred.labels >= 0) & (pred.labels < 2)).all()


def test_empty_ground_truth_and_bad_labels(tiny_model_cfg):
    model = _build(tiny_model_cfg)
    model.init_weights()
    batch = det_batch(2, 64)
    for sample in batch['data_samples']:
        sample.gt_instances = sample.gt_instances[:0]
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert losses['loss_cls'] > 0 and torch.isfinite(losses['loss_cls'])
    assert losses['loss_bbox'] == 0 and losses['loss_dfl'] == 0
    sum(losses.values()).backward()

    data = model.data_preprocessor(det_batch(2, 64), True)
    data['data_samples'][0].gt_instances.labels[0] = 5
    with pytest.raises(ValueError, match='num_classes=2'):
        model.loss(data['inputs'], data['data_samples'])


# ------------------------------------------------- training on real data
def test_train_and_validate_on_demo_data(demo_data_root, tmp_path):
    root = demo_data_root
    ann_file = f'{root}/annotations/instances_val.json'
    args = [
        'tools/train.py', TINY_CFG, '--work-dir',
        str(tmp_path), '--cfg-options',
        f'train_dataloader.dataset.data_root={root}/',
        f'val_dataloader.dataset.data_root={root}/',
        f'test_dataloader.dataset.data_root={root}/',
        f'val_evaluator.ann_file={ann_file}',
        f'test_evaluator.ann_file={ann_file}'
    ]
    # one thread: see `one_thread`
    run_tool(args, env=dict(OMP_NUM_THREADS='1'))
    state = torch.load(
        osp.join(tmp_path, 'iter_2.pth'),
        map_location='cpu',
        weights_only=False)
    assert state['meta']['iter'] == 2
    # GOM and SCM are in the checkpoint, and the EMA weights beside them
    keys = state['state_dict']
    assert any(k.startswith('backbone.stage4.2.channel_mlp') for k in keys)
    assert any(k.startswith('backbone.stage4.4.conv3x3') for k in keys)
    assert 'ema_state_dict' in state
    scalars = []
    for f in glob.glob(osp.join(tmp_path, '*', 'vis_data', 'scalars.json')):
        with open(f) as fh:
            scalars += [json.loads(line) for line in fh if line.strip()]
    train = [s for s in scalars if 'loss' in s]
    assert len(train) == 2
    for s in train:
        for key in ('loss', 'loss_cls', 'loss_bbox', 'loss_dfl'):
            assert torch.isfinite(torch.tensor(s[key])), s
    # validation predicted on real demo tiles and CocoMetric scored them
    assert any('coco/bbox_mAP' in s for s in scalars), scalars


# ---------------------------------------------------------------- configs
@pytest.fixture
def cached_external_cfg_lookup(monkeypatch):
    """mmengine looks every ``mmdet::`` base up in all of mmdet's ~100
    metafiles before falling back to the path (0.5 s a time); remember the
    outcome per name while parsing many configs. Results are unchanged."""
    import mmengine.config.config as config_module
    lookup = config_module._get_external_cfg_path

    @functools.lru_cache(maxsize=None)
    def outcome(package_path, cfg_file):
        try:
            return lookup(package_path, cfg_file)
        except ValueError as e:
            return e

    def cached(package_path, cfg_file):
        result = outcome(package_path, cfg_file)
        if isinstance(result, ValueError):
            raise result
        return result

    monkeypatch.setattr(config_module, '_get_external_cfg_path', cached)


def test_every_config_parses_and_differs_as_named(cached_external_cfg_lookup):
    files = sorted(glob.glob(osp.join(CONFIG_DIR, '*.py')))
    assert len(files) >= 20
    for path in files:
        name = osp.basename(path)
        model = parsed_config(path).model
        size = name.split('_')[1]
        assert (model.backbone.deepen_factor,
                model.backbone.widen_factor) == SIZES[size][:2], name
        gom = model.backbone.get('gom')
        scm = model.backbone.get('scm')
        loss = model.bbox_head.loss_bbox.type
        if name.startswith('yolov8_'):
            # additive ablations: yolov8_s_{gom,scm,aiou}_...
            assert (gom is not None) == ('_gom_' in name), name
            assert (scm is not None) == ('_scm_' in name), name
            assert loss == ('mmlocal.AIoULoss'
                            if '_aiou_' in name else 'CIoULoss'), name
        else:
            assert name.startswith('gso-yolo_'), name
            assert (gom is None) == ('wo-gom' in name), name
            assert (scm is None) == ('wo-scm' in name), name
            assert loss == ('CIoULoss'
                            if '_ciou_' in name else 'mmlocal.AIoULoss'), name
        if name.endswith('_soda.py'):
            assert model.bbox_head.num_classes == 15, name
        elif name.endswith('_mocs.py'):
            assert model.bbox_head.num_classes == 13, name


@pytest.mark.parametrize('part', ['gom', 'scm', 'aiou'])
def test_additive_ablation_adds_gso_yolos_component(part):
    """``yolov8_s_{part}_...`` is YOLOv8-s with exactly one of GSO-YOLO-s's
    components, configured as in GSO-YOLO-s, and it builds."""
    from mmengine.registry import MODELS

    def model_of(name):
        cfg = parsed_config(osp.join(CONFIG_DIR, name))
        return cfg, cfg.model.to_dict()

    _, base = model_of('yolov8_s_8xb16-300e_soda.py')
    _, gso = model_of('gso-yolo_s_8xb16-300e_soda.py')
    cfg, model = model_of(f'yolov8_s_{part}_8xb16-300e_soda.py')
    expected = copy.deepcopy(base)
    if part == 'aiou':
        expected['bbox_head']['loss_bbox'] = gso['bbox_head']['loss_bbox']
    else:
        expected['backbone'][part] = gso['backbone'][part]
    assert model == expected
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        detector = MODELS.build(cfg.model)
    last = [type(m).__name__ for m in detector.backbone.stage4]
    assert last[2:] == {'gom': ['GAMAttention', 'SPPF'],
                        'scm': ['SPPF', 'EMAttention'],
                        'aiou': ['SPPF']}[part]
    assert type(detector.bbox_head.loss_bbox).__name__ == \
        ('AIoULoss' if part == 'aiou' else 'CIoULoss')
