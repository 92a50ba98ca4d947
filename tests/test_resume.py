"""Resuming local-learning runs: exact on CPU, and after a kill -9."""
import glob
import json
import os
import os.path as osp
import signal
import time

from conftest import REPO
from tool_server import run_tool_fast as run_tool
from tool_server import start_tool_fast

CFG = osp.join(REPO, 'tests', 'configs', 'infopro_retinanet_tiny_demo.py')


def _options(root, iters, ckpt_interval=2):
    return [
        f'train_dataloader.dataset.data_root={root}/',
        f'val_dataloader.dataset.data_root={root}/',
        f'val_evaluator.ann_file={root}/annotations/instances_val.json',
        f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
        f'default_hooks.checkpoint.interval={ckpt_interval}',
        'randomness.deterministic=True', 'randomness.seed=0',
        'train_dataloader.dataset.filter_cfg.filter_empty_gt=True'
    ]


def _losses(work_dir):
    out = {}
    for f in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data',
                                       'scalars.json'))):
        with open(f) as fh:
            for line in fh:
                rec = json.loads(line)
                if 'loss' in rec and 'iter' in rec:
                    out[rec['iter']] = (rec['loss'], rec['loss_local0'])
    return out


def test_resumed_run_reproduces_uninterrupted_losses(demo_data_root,
                                                     tmp_path):
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    runs = [start_tool_fast(['tools/train.py', CFG, '--work-dir', work,
                             '--cfg-options'] + _options(demo_data_root, n))
            for work, n in ((full, 4), (part, 2))]  # independent: at once
    for run in runs:
        run.wait()
    proc = run_tool(['tools/train.py', CFG, '--work-dir', part, '--resume',
                     '--cfg-options'] + _options(demo_data_root, 4))
    assert 'resumed epoch: 0, iter: 2' in proc.stdout + proc.stderr
    a, b = _losses(full), _losses(part)
    assert set(a) == {1, 2, 3, 4} and set(b) >= {3, 4}
    for it in (3, 4):
        assert a[it] == b[it], (it, a[it], b[it])


def test_kill_between_checkpoints_loses_at_most_one_interval(
        demo_data_root, tmp_path):
    work = str(tmp_path / 'killed')
    proc = start_tool_fast(
        ['tools/train.py', CFG, '--work-dir', work, '--cfg-options'] +
        _options(demo_data_root, 200, ckpt_interval=2), check=False,
        env=dict(PYTHONPATH=REPO, OMP_NUM_THREADS='2'))
    deadline = time.time() + 300
    while time.time() < deadline and not osp.exists(
            osp.join(work, 'iter_4.pth')):
        time.sleep(0.5)
    time.sleep(1.0)  # somewhere between two checkpoints
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait().returncode == -signal.SIGKILL
    assert osp.exists(osp.join(work, 'iter_4.pth')), 'no checkpoint written'
    with open(osp.join(work, 'last_checkpoint')) as f:
        last = f.read().strip()
    last_iter = int(osp.basename(last)[5:-4])
    done = max(_losses(work))  # iterations that were logged before death
    assert done - last_iter < 2 + 1  # at most one interval (2) lost
    resumed = run_tool(['tools/train.py', CFG, '--work-dir', work,
                        '--resume', '--cfg-options'] +
                       _options(demo_data_root, last_iter + 2))
    assert f'resumed epoch: 0, iter: {last_iter}' in \
        resumed.stdout + resumed.stderr
    assert osp.exists(osp.join(work, f'iter_{last_iter + 2}.pth'))
