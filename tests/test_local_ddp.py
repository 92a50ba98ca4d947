"""Data-parallel local learning on CPU (gloo, 2 processes)."""
import os
import socket
import subprocess
import sys

import torch

from conftest import REPO

WORKER = os.path.join(REPO, 'tests', 'dist_scripts', 'local_ddp_worker.py')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(args, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    proc = subprocess.run([sys.executable] + args, cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_ranks_equal_single_process_on_the_combined_batch(tmp_path):
    _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2',
          '--master_port', str(_free_port()), WORKER, str(tmp_path)])
    _run([WORKER, str(tmp_path)])
    r0 = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    r1 = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    single = torch.load(tmp_path / 'single.pt', weights_only=True)
    assert r0.keys() == single.keys()
    assert not any(k.startswith('module.') for k in r0)
    moved = 0
    for key in single:
        assert torch.equal(r0[key], r1[key]), key  # ranks identical
        torch.testing.assert_close(r0[key], single[key], atol=1e-5,
                                   rtol=1e-4, msg=key)
        moved += 1
    assert moved > 50


def test_setup_launcher_picks_local_wrapper():
    from mmengine.config import Config
    from mmlocal.utils.setup_env import setup_launcher
    import torch.distributed as dist
    cfg = Config(dict(model=dict(type='mmlocal.LocalLearner')))
    owned = not dist.is_initialized()
    if owned:
        os.environ.update(MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=str(_free_port()), RANK='0',
                          WORLD_SIZE='1', LOCAL_RANK='0')
    setup_launcher(cfg, 'pytorch')
    assert cfg.model_wrapper_cfg.type == 'mmlocal.LocalDistributedDataParallel'
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    cfg = Config(dict(model=dict(type='RetinaNet')))
    setup_launcher(cfg, 'pytorch')
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert cfg.model_wrapper_cfg.device_ids is None
    if owned:  # leave no process group behind for other tests
        dist.destroy_process_group()


def test_dist_train_script_two_cpu_processes(demo_data_root, tmp_path):
    """tools/dist_train.sh: torchrun, gloo on CPU, LocalLearner wrapper."""
    root = demo_data_root
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(_free_port()),
               PATH=os.path.dirname(sys.executable) + ':' +
               os.environ.get('PATH', ''))
    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh',
         'tests/configs/infopro_retinanet_tiny_demo.py', '2', '--work-dir',
         str(tmp_path), '--cfg-options',
         f'train_dataloader.dataset.data_root={root}/',
         f'val_dataloader.dataset.data_root={root}/',
         f'test_dataloader.dataset.data_root={root}/',
         f'val_evaluator.ann_file={root}/annotations/instances_val.json'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert 'Distributed training: True' in out, out[-3000:]
    assert "type='mmlocal.LocalDistributedDataParallel'" in out
    state = torch.load(tmp_path / 'iter_2.pth', map_location='cpu',
                       weights_only=False)['state_dict']
    assert any(k.startswith('model.backbone.') for k in state)
    assert any(k.startswith('aux_nets.0.') for k in state)
    assert not any(k.startswith('module.') for k in state)
