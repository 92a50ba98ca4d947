"""tools/train.py and tools/test.py on real demo data and a tiny seg set."""
import json
import os.path as osp

import pytest
import torch

from conftest import REPO
from tool_server import run_tool_fast as run_tool

DET_CFG = osp.join(REPO, 'tests', 'configs', 'retinanet_tiny_demo.py')
SEG_CFG = osp.join(REPO, 'tests', 'configs', 'fcn_r18_tiny_cityscapes.py')


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _scalars(work_dir):
    """All json log lines the Runner wrote in ``work_dir``."""
    import glob
    lines = []
    for f in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')):
        with open(f) as fh:
            lines += [json.loads(line) for line in fh if line.strip()]
    return lines


@pytest.fixture(scope='module')
def det_run(demo_data_root, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('det'))
    proc = run_tool(['tools/train.py', DET_CFG, '--work-dir', work_dir,
                     '--cfg-options'] + _det_options(demo_data_root))
    return work_dir, proc


def _det_options(root):
    return [
        f'train_dataloader.dataset.data_root={root}/',
        f'val_dataloader.dataset.data_root={root}/',
        f'test_dataloader.dataset.data_root={root}/',
        f'val_evaluator.ann_file={root}/annotations/instances_val.json',
        f'test_evaluator.ann_file={root}/annotations/instances_val.json'
    ]


def test_train_detector_on_demo_data(det_run):
    work_dir, proc = det_run
    ckpt = osp.join(work_dir, 'iter_2.pth')
    assert osp.isfile(ckpt)
    state = _load(ckpt)
    assert state['meta']['iter'] == 2
    # the stock RetinaNet keys, nothing else
    assert any(k.startswith('backbone.layer1') for k in state['state_dict'])
    scalars = _scalars(work_dir)
    losses = [s['loss'] for s in scalars if 'loss' in s]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # validation ran with CocoMetric (pycocotools) and logged bbox mAP
    assert any('coco/bbox_mAP' in s for s in scalars), scalars
    assert 'bbox_mAP_50' in proc.stdout + proc.stderr
    # the PeakMemoryHook logged a positive peak
    assert all(s['peak_mem_mb'] > 0 for s in scalars if 'loss' in s)


def test_resume_restores_iteration_and_optimizer(det_run, demo_data_root):
    work_dir, _ = det_run
    before = _load(osp.join(work_dir, 'iter_2.pth'))
    proc = run_tool([
        'tools/train.py', DET_CFG, '--work-dir', work_dir, '--resume',
        '--cfg-options', 'train_cfg.max_iters=4', 'train_cfg.val_interval=4'
    ] + _det_options(demo_data_root))
    out = proc.stdout + proc.stderr
    assert 'resumed epoch: 0, iter: 2' in out, out[-3000:]
    after = _load(osp.join(work_dir, 'iter_4.pth'))
    assert after['meta']['iter'] == 4
    # AdamW's step counter continued from the restored state (2 -> 4);
    # a run that had not restored the optimizer would show 2.
    step_before = next(iter(before['optimizer']['state'].values()))['step']
    step_after = next(iter(after['optimizer']['state'].values()))['step']
    assert float(step_before) == 2 and float(step_after) == 4
    # the saved iter_2 checkpoint is still there, untouched
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))


def test_resume_from_explicit_checkpoint(det_run, demo_data_root,
                                         tmp_path):
    work_dir, _ = det_run
    proc = run_tool([
        'tools/train.py', DET_CFG, '--work-dir', str(tmp_path), '--resume',
        osp.join(work_dir, 'iter_2.pth'), '--cfg-options',
        'train_cfg.max_iters=3', 'train_cfg.val_interval=10',
        'default_hooks.checkpoint.interval=3'
    ] + _det_options(demo_data_root))
    assert 'resumed epoch: 0, iter: 2' in proc.stdout + proc.stderr
    assert _load(osp.join(tmp_path, 'iter_3.pth'))['meta']['iter'] == 3


def test_test_tool_evaluates_checkpoint(det_run, demo_data_root, tmp_path):
    work_dir, _ = det_run
    out_pkl = str(tmp_path / 'preds.pkl')
    proc = run_tool([
        'tools/test.py', DET_CFG,
        osp.join(work_dir, 'iter_2.pth'), '--work-dir',
        str(tmp_path), '--out', out_pkl, '--cfg-options'
    ] + _det_options(demo_data_root))
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    import pickle
    with open(out_pkl, 'rb') as f:
        preds = pickle.load(f)
    with open(osp.join(demo_data_root, 'annotations',
                       'instances_val.json')) as f:
        n_val = len(json.load(f)['images'])
    assert len(preds) == n_val


def test_train_segmentor_cityscapes_layout(cityscapes_tiny, tmp_path):
    root = cityscapes_tiny
    work_dir = str(tmp_path / 'seg')
    proc = run_tool([
        'tools/train.py', SEG_CFG, '--work-dir', work_dir, '--cfg-options',
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}'
    ])
    state = _load(osp.join(work_dir, 'iter_2.pth'))
    assert state['meta']['iter'] == 2
    assert any(k.startswith('decode_head.') for k in state['state_dict'])
    scalars = _scalars(work_dir)
    assert any('mIoU' in s for s in scalars), proc.stdout[-2000:]
    # resume works for the segmentor too (SGD momentum buffers restored)
    proc = run_tool([
        'tools/train.py', SEG_CFG, '--work-dir', work_dir, '--resume',
        '--cfg-options', 'train_cfg.max_iters=3', 'train_cfg.val_interval=10',
        'default_hooks.checkpoint.interval=3',
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}'
    ])
    assert 'resumed epoch: 0, iter: 2' in proc.stdout + proc.stderr
    state3 = _load(osp.join(work_dir, 'iter_3.pth'))
    assert state3['meta']['iter'] == 3
    assert state3['optimizer']['state'], 'optimizer state was not saved'


def test_missing_data_root_names_the_option(tmp_path):
    proc = run_tool([
        'tools/train.py', DET_CFG, '--work-dir',
        str(tmp_path), '--cfg-options',
        'train_dataloader.dataset.data_root=/nonexistent/demo/'
    ], check=False)
    assert proc.returncode != 0
    assert 'train_dataloader.dataset.data_root' in proc.stderr
    assert '/nonexistent/demo/' in proc.stderr


def test_unknown_type_names_it(demo_data_root, tmp_path):
    proc = run_tool([
        'tools/train.py', DET_CFG, '--work-dir',
        str(tmp_path), '--cfg-options', 'model.neck.type=NoSuchNeck'
    ] + _det_options(demo_data_root), check=False)
    assert proc.returncode != 0
    assert 'NoSuchNeck' in proc.stderr


def test_missing_config_and_checkpoint(tmp_path):
    proc = run_tool(['tools/train.py', str(tmp_path / 'nope.py')],
                    check=False)
    assert proc.returncode != 0 and 'nope.py' in proc.stderr
    proc = run_tool(['tools/test.py', DET_CFG,
                     str(tmp_path / 'missing.pth')], check=False)
    assert proc.returncode != 0 and 'missing.pth' in proc.stderr
