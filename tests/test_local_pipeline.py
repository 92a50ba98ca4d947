"""Pipeline-parallel local learning on CPU (gloo; 2 and 4 processes)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO

WORKER = os.path.join(REPO, 'tests', 'dist_scripts',
                      'local_pipeline_worker.py')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


DIST_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE',
            'MASTER_ADDR', 'MASTER_PORT')


def _run(args):
    # the worker runs as one process unless torchrun sets RANK
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run([sys.executable] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _torchrun(nproc, out, mode):
    return _run(['-m', 'torch.distributed.run', '--nproc_per_node',
                 str(nproc), '--master_port', str(_free_port()), WORKER,
                 str(out), mode])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The worker as one process (every run), under torchrun with 2
    processes (pipeline runs, refusals, faults) and with 4 (2 stages x 2
    replicas); ``load(name)`` reads what it saved."""
    out = tmp_path_factory.mktemp('local_pipeline')
    _run([WORKER, str(out)])
    _torchrun(2, out, 'pp')
    _torchrun(4, out, 'dp')

    def load(name):
        return torch.load(out / f'{name}.pt', weights_only=False)

    return load


def _assert_equal_states(got, want, atol=1e-6, rtol=1e-6):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol,
                                   rtol=rtol, msg=key)


def test_sync_equals_one_process_through_skip_clip_and_resume(runs):
    """sync, K=3 as stages [[0, 1], [2]], clip_grad (global norm) and
    nan_guard='skip' (module 0's NaN at iteration 1 drops it on both
    stages), then checkpoint -> fresh model and wrapper -> one more
    iteration: parameters, buffers and the optimizer's momentum equal one
    process's to 1e-6."""
    pipe, single = runs('rank0_sync'), runs('single_sync')
    _assert_equal_states(pipe['model'], single['model'])
    assert pipe['optim'].keys() == single['optim'].keys()
    for idx in single['optim']:
        _assert_equal_states(pipe['optim'][idx], single['optim'][idx])
    for tag in ('rank0', 'rank1', 'single'):
        info = runs(f'{tag}_sync_info')
        assert info['skipped'] == 1, tag
        assert info['logs'][1] == {}, tag  # the dropped iteration


def test_each_process_holds_only_its_stage(runs):
    r0, r1 = runs('rank0_sync_info'), runs('rank1_sync_info')
    everything = set(runs('single_sync')['model'])
    last, first = set(r0['held']), set(r1['held'])
    shared = {k for k in last & first if 'data_preprocessor' in k}
    assert (last & first) == shared
    assert (last | first) >= everything
    # rank 1 is stage 0 (modules 0, 1: stem, layer1-3, both aux nets);
    # rank 0 the last stage (module 2: layer4, decode and auxiliary heads)
    assert any(k.startswith('aux_nets.1.') for k in first)
    assert not any(k.startswith('aux_nets.') for k in last)
    assert any(k.startswith('model.decode_head.') for k in last)
    assert any(k.startswith('model.backbone.layer4.') for k in last)
    assert not any(k.startswith('model.backbone.layer4.') for k in first)
    assert any(k.startswith('model.backbone.stem.') for k in first)
    # optimizer state: each stage's own parameters, together all of them
    ids0, ids1 = set(r0['optim_state_ids']), set(r1['optim_state_ids'])
    assert ids0 and ids1 and not ids0 & ids1
    assert ids0 | ids1 == set(runs('single_sync')['optim'])
    assert r0['released_after_ckpt'] and r1['released_after_ckpt']
    # validation gathers the whole model on every process
    assert r0['held_after_val'] == r1['held_after_val'] >= len(everything)


def test_rank0_logs_every_stage(runs):
    """Rank 0 (the last stage) logs every stage's losses and peak memory;
    its ``loss`` is the single process's."""
    logs, single = runs('rank0_sync_info')['logs'], runs(
        'single_sync_info')['logs']
    for it in (0, 2, 3):
        log = logs[it]
        for key in ('loss_local0', 'loss_local1', 'loss_stage0',
                    'loss_stage1', 'stage0.peak_mem_mb',
                    'stage1.peak_mem_mb', 'decode.loss_ce'):
            assert key in log, (it, key)
        assert log['stage0.peak_mem_mb'] > 10
        torch.testing.assert_close(log['loss'], single[it]['loss'],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            log['loss_stage0'], log['loss_local0'] + log['loss_local1'])


def test_val_step_runs_the_whole_model(runs):
    single = runs('single_sync_info')['seg_logits']
    for tag in ('rank0', 'rank1'):
        torch.testing.assert_close(runs(f'{tag}_sync_info')['seg_logits'],
                                   single, atol=1e-5, rtol=1e-5)


def test_async_equals_one_process_without_clipping(runs):
    """async (no cross-stage collective), K=3 with the default stages
    (measured on the first batch): without clip_grad each stage's updates
    are still the single process's (so the measuring step changed nothing
    either); module 0's NaN (stage 0) drops the iteration there and, sent
    forward, on the last stage."""
    _assert_equal_states(runs('rank0_async'), runs('single_async'))
    r0, r1 = runs('rank0_async_info'), runs('rank1_async_info')
    assert r0['stages'] == r1['stages']
    assert r0['stages'] in ([[0], [1, 2]], [[0, 1], [2]])
    assert r0['skipped'] == r1['skipped'] == 1


def test_pipeline_times_data_parallel_four_processes(runs):
    """2 stages x 2 replicas: each stage's replicas average their
    gradients; equal to one process over the whole batch (GroupNorm;
    clip_grad with the global norm of the averaged gradients)."""
    layout = {r: (runs(f'rank{r}_dp_info')['stage'],
                  runs(f'rank{r}_dp_info')['replica']) for r in range(4)}
    assert layout == {0: (1, 0), 1: (0, 0), 2: (1, 1), 3: (0, 1)}
    assert runs('rank0_dp_info')['held'] == runs('rank2_dp_info')['held']
    _assert_equal_states(runs('rank0_dp'), runs('single_dp'), atol=1e-5,
                         rtol=1e-4)


def test_bad_input_names_the_option(runs):
    errors = runs('rank0_refuse')
    expected = {
        'too_many_stages': 'num_modules=1',
        'stage_count': r'stages=\[\[0\], \[1\], \[2\]\] has 3 stages',
        'not_contiguous': 'not contiguous',
        'not_covering': 'must cover',
        'replicas': 'num_replicas=3',
        'schedule': "schedule='gpipe'",
        'man_ema': 'EMA copy',
        'cascade': 'cascade',
        'attach': 'attach_stages=',
        'module_check': "nan_guard_check='module'",
    }
    import re
    for name, pattern in expected.items():
        assert errors[name] is not None, name
        assert re.search(pattern, errors[name]), (name, errors[name])


@pytest.mark.parametrize('stages,match', [
    ([[2], [0, 1]], 'in order'),
    ([[0, 1], [1, 2]], 'must cover'),
    ([[0], []], 'non-empty'),
    ('01', 'list of lists'),
    ([[0], [1, 2, 3]], r'\[3\] are not module indices'),
])
def test_check_stages_rejects(stages, match):
    from mmlocal.engine.model_wrappers.local_pipeline import check_stages
    with pytest.raises(ValueError, match=match):
        check_stages(stages, 3, 2)
    assert check_stages([[0, 1], [2]], 3, 2) == [[0, 1], [2]]


def test_balanced_default_stages():
    from mmlocal.engine.model_wrappers.local_pipeline import (
        balanced_stages, balanced_stages_by_peak)
    assert balanced_stages([1, 1, 1, 5], 2) == [[0, 1, 2], [3]]
    assert balanced_stages([4, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    # activations of a stage's modules do not add up, what they keep does
    assert balanced_stages_by_peak([100, 50, 10, 10], [1] * 4, 2) == [
        [0], [1, 2, 3]]
    assert balanced_stages_by_peak([10, 5, 5, 1], [1, 1, 1, 20], 2) == [
        [0, 1, 2], [3]]
    assert balanced_stages_by_peak([60, 50, 40, 30], [1] * 4, 3) == [
        [0], [1], [2, 3]]


def test_failed_or_vanished_process_stops_the_others(runs):
    """async: the last stage (rank 0) raises; rank 1 stops with an error
    naming rank 0 and the cause. sync: rank 1 vanishes; rank 0 names it
    (well within its timeout_s=20)."""
    r0, r1 = runs('rank0_fault'), runs('rank1_fault')
    assert r0['raised'][:2] == ('own', 0)
    kind, rank, msg = r1['raised']
    assert (kind, rank) == ('peer', 0), r1['raised']
    assert 'injected failure' in msg and 'rank 0' in msg
    assert r1['seconds'] < 30
    rank, msg = r0['died']
    assert rank == 1 and 'rank 1' in msg, r0['died']
    assert r0['died_seconds'] < 25


def test_setup_launcher_adds_the_pipeline_hook():
    from mmengine.config import Config

    from mmlocal.utils.setup_env import _add_pipeline_hook
    cfg = Config(dict(model_wrapper_cfg=dict(
        type='mmlocal.LocalPipelineParallel'),
        custom_hooks=[dict(type='mmlocal.PeakMemoryHook')]))
    _add_pipeline_hook(cfg)
    _add_pipeline_hook(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == [
        'mmlocal.PeakMemoryHook', 'mmlocal.LocalPipelineHook']
    cfg = Config(dict(model_wrapper_cfg=dict(
        type='mmlocal.LocalDistributedDataParallel')))
    _add_pipeline_hook(cfg)
    assert not cfg.get('custom_hooks')


def _scalars(work_dir):
    """``{iter: {name: value}}`` from mmengine's vis_data/scalars.json."""
    import glob
    import json
    path, = glob.glob(os.path.join(str(work_dir), '*', 'vis_data',
                                   'scalars.json'))
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row.get('step'), {}).update(row)
    return out


def test_runner_sync_pipeline_equals_one_process(demo_data_root, tmp_path):
    """tools/dist_train.sh, 2 CPU processes, the tiny demo RetinaNet (BN,
    InfoPro, K=2) with the sync pipeline vs tools/train.py as one process:
    same losses every iteration, the same ordinary checkpoint (every key,
    values to 1e-5, optimizer state of every parameter) and the same
    validation mAP; rank 0's log has both stages' losses and memory.
    (Resuming from the gathered checkpoint: the worker's sync test.)"""
    root = demo_data_root
    data = [f'train_dataloader.dataset.data_root={root}/',
            f'val_dataloader.dataset.data_root={root}/',
            f'test_dataloader.dataset.data_root={root}/',
            f'val_evaluator.ann_file={root}/annotations/instances_val.json']
    config = 'tests/configs/infopro_retinanet_tiny_demo.py'
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(_free_port()),
               PATH=os.path.dirname(sys.executable) + ':' +
               os.environ.get('PATH', ''))
    pipe_dir, single_dir = tmp_path / 'pipe', tmp_path / 'single'
    wrapper = ['model_wrapper_cfg.type=mmlocal.LocalPipelineParallel']

    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh', config, '2', '--work-dir',
         str(pipe_dir), '--cfg-options', *data, *wrapper],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert 'LocalPipelineParallel: stages [[0], [1]]' in out
    _run(['tools/train.py', config, '--work-dir', str(single_dir),
          '--cfg-options', *data])
    pipe, single = _scalars(pipe_dir), _scalars(single_dir)
    for it in (1, 2):
        for key in ('loss', 'loss_cls', 'loss_bbox', 'loss_local0',
                    'grad_norm'):
            assert abs(pipe[it][key] - single[it][key]) <= 1e-5 * max(
                1., abs(single[it][key])), (it, key)
        for key in ('loss_stage0', 'loss_stage1', 'stage0.peak_mem_mb',
                    'stage1.peak_mem_mb'):
            assert key in pipe[it], (it, key)
    # the validation after iteration 2 (logged at step 0)
    metrics = [k for k in single[0] if k.startswith('coco/')]
    assert metrics and all(pipe[0][k] == single[0][k] for k in metrics)

    ckpt = torch.load(pipe_dir / 'iter_2.pth', map_location='cpu',
                      weights_only=False)
    ref = torch.load(single_dir / 'iter_2.pth', map_location='cpu',
                     weights_only=False)
    _assert_equal_states(ckpt['state_dict'], ref['state_dict'], atol=1e-5,
                         rtol=1e-4)
    assert ckpt['optimizer']['state'].keys() == \
        ref['optimizer']['state'].keys()


def test_stages_balanced_by_time_then_memory():
    """balance='time': the least largest stage time; groupings within 5 %
    of it are equally fast and the least largest memory decides;
    'memory' balances memory only."""
    from mmlocal.engine.model_wrappers.local_pipeline import (
        balanced_stages_by_time, choose_stages)
    assert balanced_stages_by_time([4, 1, 1, 1, 1], 2) == [[0],
                                                           [1, 2, 3, 4]]
    assert balanced_stages_by_time([1, 1, 1, 1, 1, 1], 3) == [
        [0, 1], [2, 3], [4, 5]]
    peaks, state = [10] * 4, [5, 5, 5, 40]
    # [0, 1] | [2, 3]: 2.0 s, memory [55, 20]; [0, 1, 2] | [3]: 2.06 s
    # (within 5 %), memory [50, 25]: less memory, chosen
    close = [1.0, 1.0, 0.06, 1.0]
    assert choose_stages(2, 'time', close, peaks, state) == [[0, 1, 2],
                                                             [3]]
    # 2.2 s is not within 5 % of 2.0 s: time wins
    far = [1.0, 1.0, 0.2, 1.0]
    assert choose_stages(2, 'time', far, peaks, state) == [[0, 1], [2, 3]]
    # memory only: [0, 1, 2] | [3]
    assert choose_stages(2, 'memory', far, peaks, state) == [[0, 1, 2],
                                                             [3]]
    # given per-module figures, no measurement: times / summed costs
    assert choose_stages(2, 'time', times=far, costs=[1, 1, 1, 9]) == [
        [0, 1], [2, 3]]
    assert choose_stages(2, 'memory', times=far, costs=[1, 1, 1, 9]) == [
        [0, 1, 2], [3]]


def _tiny_learner(num_modules=4):
    from mmengine.registry import init_default_scope

    from local_utils import TINY_RETINANET, small_aux
    from mmlocal.models.local.learner import LocalLearner
    init_default_scope('mmdet')
    torch.manual_seed(0)
    return LocalLearner(TINY_RETINANET, num_modules=num_modules,
                        aux=small_aux())


def test_measure_modules_times_every_module_and_changes_nothing():
    from local_utils import det_batch
    from mmlocal.engine.model_wrappers.local_pipeline import (
        LocalPipelineParallel, measure_modules)
    learner = _tiny_learner(3)
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    m = measure_modules(learner, det_batch(seed=1), time_repeats=1)
    assert len(m['times']) == len(m['peaks']) == len(m['state']) == 3
    assert all(t > 0 for t in m['times']) and all(p > 0 for p in m['peaks'])
    assert all(p.grad is None for p in learner.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    # bad options are named before a process group is needed
    for kwargs, match in ((dict(balance='speed'), "balance='speed'"),
                          (dict(module_times=[1, 2]), 'module_times=')):
        with pytest.raises(ValueError, match=match):
            LocalPipelineParallel(learner, **kwargs)


def test_train_stage_shares_the_stage_aux_targets(monkeypatch):
    """train_stage computes the anchor targets of its own modules' aux
    heads in one pass (as train_step): losses and gradients equal one pass
    per head; cut into stages (0, 1) and (1, 3), each stage serves only its
    own heads and the gradients are the same."""
    import mmlocal.models.local.heads.anchor_targets as at
    from local_utils import (KeepGradsOptimWrapper, assert_same_step,
                             det_batch, grads, spy_anchor_target_passes)
    calls = spy_anchor_target_passes(monkeypatch)

    def run(stages, share=True):
        learner = _tiny_learner(4)
        if not share:
            learner._shared_targets = at.SharedAnchorTargets()
        ow = KeepGradsOptimWrapper(
            torch.optim.SGD(learner.parameters(), lr=0.))
        data = learner.data_preprocessor(det_batch(seed=3), True)
        sent, logs, per_stage = dict(x=None, outs=None), {}, []
        for modules in stages:
            calls.clear()
            logs.update(learner.train_stage(dict(
                modules=modules, inputs=data['inputs'],
                data_samples=data['data_samples'], x=sent['x'],
                outs=sent['outs'],
                send=lambda x, outs, _: sent.update(x=x, outs=outs)), ow))
            per_stage.append(list(calls))
        return logs, grads(learner), per_stage

    shared, alone = run([(0, 3)]), run([(0, 3)], share=False)
    assert shared[2] == [[3]] and alone[2] == [[1, 1, 1]]
    assert_same_step(shared[0], shared[1], alone[0], alone[1], rtol=0,
                     atol=0)
    cut = run([(0, 1), (1, 3)])
    assert cut[2] == [[1], [2]]
    for name, g in shared[1].items():
        torch.testing.assert_close(cut[1][name], g, rtol=0, atol=0,
                                   msg=name)
