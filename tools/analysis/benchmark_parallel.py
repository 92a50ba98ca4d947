"""Local learning on one process vs P processes: images/s and per-process
peak memory of every way mmlocal trains on several devices, in one run.

Rows (every row runs in fresh processes started by this tool; on the CPU
with gloo, every P-process row runs one thread per process):

- ``single``: ``LocalLearner`` in one process with P threads (the same
  total threads as the P-process rows; ``--single-threads`` changes it);
- ``single_1t``: the same with one thread (what one process of the other
  rows has: P processes can be at most P times as fast as this);
- ``pipe_sync`` / ``pipe_async``: ``mmlocal.LocalPipelineParallel``
  (one pipeline stage per process, default grouping, ``balance`` as
  ``--balance``, ``schedule='sync'`` / ``'async'``, ``max_in_flight=2``);
- ``dp_local``: ``mmlocal.LocalDistributedDataParallel`` with
  ``overlap_grad_reduce=False`` (gradients averaged in one block before the
  step);
- ``dp_local_overlap``: the same with ``overlap_grad_reduce=True`` (each
  module's all-reduce starts after its local backward);
- ``dp_e2e``: the plain model (``cfg.model.model``) under mmengine's
  ``MMDistributedDataParallel`` (end-to-end backprop, torch DDP).

Every process of every row trains on random batches of ``--input-shape``
(the config's per-device batch): data-parallel processes each on their own
batch (so P times the images per iteration), pipeline stages on the same
batch (it passes through all of them). ``images/s`` is the images of
``--iters`` iterations over the wall time between two barriers (after
``--warmup`` iterations). Memory, per process, is measured on one more
iteration as in ``benchmark_memory.py``: ``peak`` is the peak of live tensor
bytes above the level before it (:class:`mmlocal.utils.memory.
PeakMemoryMeter`), ``static`` the parameters, buffers and optimizer state
the process holds; the table gives the largest process's ``static + peak``
and its ratio to the single process's. Speed-ups are given against both
one-process rows (``x single``: P threads, ``x 1t``: one thread).

``--plan`` runs no row: in one process (``--single-threads``, default 1:
the threads of a stage) it measures every module's time and memory on one
batch as the pipeline's default grouping does
(:func:`~mmlocal.engine.model_wrappers.local_pipeline.measure_modules`)
and prints the stages that ``balance='time'`` and ``'memory'`` choose for
``--procs`` stages, with each stage's time and memory estimate and the
async pipeline's bound ``sum(module times) / largest stage time`` (before
communication). Relative times measured inside one process hold on a busy
machine better than throughput across processes.

Examples (docs/local_learning.md, "Benchmark: one device vs several")::

    python tools/analysis/benchmark_parallel.py \\
        configs/demo/dgl_retinanet_r50_fpn_k5_1xb2-300i_demo-trees.py \\
        --procs 2 --iters 10 --warmup 3 --json work_dirs/parallel.json \\
        --plot work_dirs/parallel.png
    python tools/analysis/benchmark_parallel.py \\
        configs/demo/dgl_retinanet_r50_fpn_k5_1xb2-300i_demo-trees.py --plan
"""
import argparse
import copy
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import benchmark_memory as bm  # noqa: E402
from mmlocal.utils.memory import format_bytes  # noqa: E402

ROWS = ('single', 'single_1t', 'pipe_sync', 'pipe_async', 'dp_local',
        'dp_local_overlap', 'dp_e2e')
SINGLE_ROWS = ('single', 'single_1t')
ROW_TITLES = dict(
    single='LocalLearner, 1 process',
    single_1t='LocalLearner, 1 process, 1 thread',
    pipe_sync='pipeline, sync',
    pipe_async='pipeline, async',
    dp_local='data parallel local (one block)',
    dp_local_overlap='data parallel local (overlapped)',
    dp_e2e='data parallel end-to-end (DDP)')
PIPELINE = 'mmlocal.LocalPipelineParallel'
BALANCES = ('time', 'memory')


def pipeline_available():
    """``None`` if ``mmlocal.LocalPipelineParallel`` can be built, else the
    reason."""
    try:
        import mmlocal.engine  # noqa: F401
        from mmlocal.registry import MODEL_WRAPPERS
        if MODEL_WRAPPERS.get(PIPELINE) is None:
            return f'{PIPELINE} is not registered'
    except Exception as exc:  # an import error of the wrapper module
        return f'{PIPELINE} cannot be imported ({type(exc).__name__}: ' \
               f'{exc})'
    return None


def default_input_shape(cfg):
    """``(batch_size, 3, H, W)`` of the config's training data (its first
    ``Resize`` scale), else benchmark_memory's default for the task."""
    try:
        loader = cfg.train_dataloader
        pipeline = loader.dataset.get('pipeline', None) or []
        scale = next(t['scale'] for t in pipeline
                     if str(t.get('type', '')).endswith('Resize')
                     and 'scale' in t)
        w, h = (scale, scale) if isinstance(scale, int) else scale
        return (int(loader.batch_size), 3, int(h), int(w))
    except Exception:
        plain = bm.plain_model_cfg(cfg)
        return bm.default_input_shape(bm.detect_task(cfg, plain), plain)


# ------------------------------------------------------------- one process
def _wrap(row, model, cfg, spec):
    from mmengine.model import MMDistributedDataParallel

    from mmlocal.engine.model_wrappers import LocalDistributedDataParallel
    from mmlocal.registry import MODEL_WRAPPERS
    if row in SINGLE_ROWS:
        return model
    if row in ('dp_local', 'dp_local_overlap'):
        return LocalDistributedDataParallel(
            model, overlap_grad_reduce=row == 'dp_local_overlap')
    if row == 'dp_e2e':
        return MMDistributedDataParallel(
            module=model, device_ids=None, broadcast_buffers=False,
            find_unused_parameters=bool(
                cfg.get('find_unused_parameters', False)))
    wrapper = dict(type=PIPELINE, stages=None, num_replicas=1,
                   max_in_flight=2, balance=spec.get('balance', 'time'),
                   schedule='sync' if row == 'pipe_sync' else 'async')
    return MODEL_WRAPPERS.build(wrapper, default_args=dict(module=model))


def worker(spec):
    """Run one row's process (``RANK``/``WORLD_SIZE`` in the environment
    when P > 1); returns its measurements."""
    import warnings

    import torch
    import torch.distributed as dist
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    from mmlocal.utils.memory import PeakMemoryMeter
    row, world = spec['row'], int(os.environ.get('WORLD_SIZE', '1'))
    # no Runner: LocalPipelineParallel's warning about its hook (checkpoints,
    # data shards) does not apply to random batches
    warnings.filterwarnings('ignore', message='LocalPipelineParallel runs')
    torch.set_num_threads(spec['threads'])
    rank = 0
    if world > 1:
        import datetime
        dist.init_process_group('gloo', timeout=datetime.timedelta(
            seconds=spec['timeout']))
        rank = dist.get_rank()
    cfg = bm.load_config(spec['config'], spec['cfg_options'])
    plain = bm.plain_model_cfg(cfg)
    task = bm.detect_task(cfg, plain)
    num_classes = bm.find_num_classes(plain, task)
    init_default_scope(bm.default_scope(cfg, task))
    torch.manual_seed(spec['seed'])
    model = bm.build_train_model(
        bm.mode_model_cfg(cfg, 'e2e' if row == 'dp_e2e' else 'local'))
    wrapped = _wrap(row, model, cfg, spec)
    optim_cfg = cfg.get('optim_wrapper', None) or bm.FALLBACK_OPTIM_WRAPPER
    optim_wrapper = build_optim_wrapper(wrapped, copy.deepcopy(optim_cfg))
    total = spec['warmup'] + spec['iters'] + 1
    optim_wrapper.initialize_count_status(wrapped, 0, total)
    # data parallel: every process its own batch; pipeline: the same batch
    seed = spec['seed'] + (rank if row.startswith('dp_') else 0)
    shape = spec['input_shape']
    batches = [bm.make_random_batch(shape, task, num_classes, seed=seed + i)
               for i in range(total)]

    def barrier():
        if world > 1:
            dist.barrier()

    def flush():  # an async pipeline's batches still in flight
        for name in ('wait_in_flight', 'flush'):
            if callable(getattr(wrapped, name, None)):
                getattr(wrapped, name)()
                return

    for _ in range(spec['warmup']):
        wrapped.train_step(batches.pop(0), optim_wrapper)
    flush()
    barrier()
    start = time.perf_counter()
    for _ in range(spec['iters']):
        wrapped.train_step(batches.pop(0), optim_wrapper)
    flush()
    barrier()
    elapsed = time.perf_counter() - start
    meter = PeakMemoryMeter('cpu')
    with meter:
        wrapped.train_step(batches.pop(0), optim_wrapper)
        flush()
    static = bm._static_bytes(getattr(wrapped, 'module', wrapped),
                              optim_wrapper)
    images = shape[0] * spec['iters']
    if row.startswith('dp_'):
        images *= world  # every process trained on its own images
    result = dict(rank=rank, time_s=elapsed, images=images,
                  peak_bytes=int(meter.peak_bytes),
                  static_bytes=static['param_bytes'] +
                  static['optim_state_bytes'])
    if row.startswith('pipe_'):
        result['stages'] = wrapped.stages
        result['measured'] = wrapped.measured  # on the measuring process
    barrier()
    if world > 1:
        dist.destroy_process_group()
    return result


# ------------------------------------------------------------------ driver
def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_row(row, spec, procs, timeout=1800, single_threads=None):
    """Start the row's processes, wait, combine their results."""
    world = 1 if row in SINGLE_ROWS else procs
    threads = (single_threads or procs) if row == 'single' else 1
    spec = dict(spec, row=row, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = osp.join(tmp, 'spec.json')
        with open(spec_file, 'w') as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec['threads']),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(world))
        started = []
        for rank in range(world):
            out = osp.join(tmp, f'rank{rank}.json')
            log = open(osp.join(tmp, f'rank{rank}.log'), 'w')
            started.append((subprocess.Popen(
                [sys.executable, osp.abspath(__file__), '--worker',
                 spec_file, out],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=log, stderr=subprocess.STDOUT), log, out))
        deadline = time.monotonic() + timeout
        try:
            for proc, _, _ in started:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for proc, log, _ in started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        failed = [r for r, (p, _, _) in enumerate(started) if p.returncode]
        if failed:
            with open(osp.join(tmp, f'rank{failed[0]}.log')) as f:
                tail = f.read()[-3000:]
            return dict(available=False, error=True,
                        reason=f'rank {failed[0]} failed '
                        f'(exit {started[failed[0]][0].returncode}):\n'
                        f'{tail}')
        ranks = []
        for _, _, out in started:
            with open(out) as f:
                ranks.append(json.load(f))
    time_s = max(r['time_s'] for r in ranks)
    images = ranks[0]['images']
    worst = max(ranks, key=lambda r: r['static_bytes'] + r['peak_bytes'])
    result = dict(
        available=True, procs=world, threads=threads * world,
        images=images, time_s=time_s, images_per_s=images / time_s,
        peak_bytes=worst['peak_bytes'], static_bytes=worst['static_bytes'],
        total_bytes=worst['static_bytes'] + worst['peak_bytes'],
        ranks=ranks)
    stages = [r['stages'] for r in ranks if r.get('stages')]
    if stages:
        result['stages'] = stages[0]
    return result


def run(config, rows=ROWS, procs=2, input_shape=None, iters=10, warmup=2,
        seed=0, cfg_options=None, timeout=1800, single_threads=None,
        balance='time', verbose=True):
    """Measure ``rows``; returns the report (see :func:`format_table`)."""
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f'rows={list(rows)}: {bad} are not rows; choose '
                         f'from {ROWS}')
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 2:
        raise ValueError(f'procs={procs!r} must be an int >= 2')
    if iters < 1 or warmup < 0:
        raise ValueError(f'need iters >= 1 and warmup >= 0, got '
                         f'iters={iters} warmup={warmup}')
    if single_threads is not None and (
            isinstance(single_threads, bool)
            or not isinstance(single_threads, int) or single_threads < 1):
        raise ValueError(f'single_threads={single_threads!r} must be an '
                         'int >= 1')
    if balance not in BALANCES:
        raise ValueError(f'balance={balance!r} must be one of {BALANCES}')
    cfg = bm.load_config(config, cfg_options)
    if not bm.is_local_learner(cfg.model):
        raise ValueError(f'{config}: cfg.model is not a LocalLearner')
    shape = bm._check_shape(input_shape or default_input_shape(cfg))
    spec = dict(config=osp.abspath(config) if osp.isfile(str(config))
                else str(config), cfg_options=cfg_options or {},
                input_shape=list(shape), iters=iters, warmup=warmup,
                seed=seed, timeout=timeout, balance=balance)
    report = dict(config=str(config), procs=procs, input_shape=list(shape),
                  iters=iters, warmup=warmup, balance=balance, rows={})
    why_no_pipeline = pipeline_available()
    for row in rows:
        if row.startswith('pipe_') and why_no_pipeline:
            result = dict(available=False,
                          reason=f'skipped: {why_no_pipeline}')
        else:
            if verbose:
                print(f'[{row}] {ROW_TITLES[row]} ...', flush=True)
            result = run_row(row, spec, procs, timeout=timeout,
                             single_threads=single_threads)
        report['rows'][row] = result
        if verbose and not result['available']:
            print(f'[{row}] {result["reason"]}', flush=True)
    add_ratios(report)
    return report


def add_ratios(report):
    """``speedup`` (images/s over ``single``'s), ``speedup_1t`` (over
    ``single_1t``'s) and ``mem_ratio`` (largest process's memory over the
    one process's: ``single``, else ``single_1t``) of every measured
    row."""
    rows = report['rows']

    def base(name):
        r = rows.get(name, {})
        return r if r.get('available') else None

    mem_base = base('single') or base('single_1t')
    for result in rows.values():
        if not result.get('available'):
            continue
        for key, name in (('speedup', 'single'), ('speedup_1t',
                                                  'single_1t')):
            if base(name):
                result[key] = result['images_per_s'] / \
                    base(name)['images_per_s']
        if mem_base:
            result['mem_ratio'] = result['total_bytes'] / \
                mem_base['total_bytes']
    return report


def format_table(report):
    shape = 'x'.join(map(str, report['input_shape']))
    lines = [
        f"{report['config']}  input {shape} per process, "
        f"{report['procs']} processes, {report['iters']} timed iterations",
        f"{'row':<18}{'procs':>6}{'thr':>4}{'images/s':>10}{'x single':>10}"
        f"{'x 1t':>7}{'static':>11}{'peak':>11}{'static+peak':>13}"
        f"{'x single':>10}"]

    def ratio(r, key):
        return f'{r[key]:.2f}' if key in r else '-'

    for row, r in report['rows'].items():
        if not r.get('available'):
            reason = r['reason'].splitlines()[0] if r['reason'] else ''
            lines.append(f'{row:<18}  -- {reason}')
            continue
        lines.append(
            f"{row:<18}{r['procs']:>6}{r['threads']:>4}"
            f"{r['images_per_s']:>10.2f}"
            f"{ratio(r, 'speedup'):>10}{ratio(r, 'speedup_1t'):>7}"
            f"{format_bytes(r['static_bytes']):>11}"
            f"{format_bytes(r['peak_bytes']):>11}"
            f"{format_bytes(r['total_bytes']):>13}"
            f"{ratio(r, 'mem_ratio'):>10}")
    lines.append('x single: images/s over the one process with as many '
                 'threads as all processes of a row; x 1t: over one process '
                 'with one thread (P processes: at most P x)')
    lines.append('static: parameters, buffers and optimizer state of the '
                 'largest process; peak: its live tensors above that '
                 'during one iteration')
    stages = [(row, r['stages']) for row, r in report['rows'].items()
              if r.get('stages')]
    if stages:
        lines.append('pipeline stages (balance={!r}): {}'.format(
            report.get('balance', 'time'),
            ', '.join(f'{row} {s}' for row, s in stages)))
    return '\n'.join(lines)


def plan(config, procs=2, input_shape=None, threads=1, repeats=3, seed=0,
         cfg_options=None):
    """``--plan``: measure the modules in this process and group them.

    Returns:
        dict: the measured ``peaks``, ``state``, ``times`` per module and,
        per balance, the stages with their estimates
        (:func:`summarize_plan`).
    """
    import torch
    from mmengine.registry import init_default_scope

    from mmlocal.engine.model_wrappers.local_pipeline import measure_modules
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 2:
        raise ValueError(f'procs={procs!r} must be an int >= 2')
    if isinstance(repeats, bool) or not isinstance(repeats, int) or \
            repeats < 1:
        raise ValueError(f'repeats={repeats!r} must be an int >= 1')
    torch.set_num_threads(threads)
    cfg = bm.load_config(config, cfg_options)
    if not bm.is_local_learner(cfg.model):
        raise ValueError(f'{config}: cfg.model is not a LocalLearner')
    shape = bm._check_shape(input_shape or default_input_shape(cfg))
    plain = bm.plain_model_cfg(cfg)
    task = bm.detect_task(cfg, plain)
    init_default_scope(bm.default_scope(cfg, task))
    torch.manual_seed(seed)
    learner = bm.build_train_model(bm.mode_model_cfg(cfg, 'local'))
    if procs > learner.num_modules:
        raise ValueError(f'procs={procs} stages for num_modules='
                         f'{learner.num_modules}')
    batch = bm.make_random_batch(shape, task, bm.find_num_classes(
        plain, task), seed=seed)
    measured = measure_modules(learner, batch, time_repeats=repeats)
    report = summarize_plan(measured, procs)
    report.update(config=str(config), input_shape=list(shape),
                  threads=threads, repeats=repeats,
                  split=[list(r) for r in learner.module_ranges])
    return report


def summarize_plan(measured, procs):
    """The stages ``balance='time'`` and ``'memory'`` choose from
    ``measured`` (:func:`measure_modules`), each with per-stage ``times``
    (sum of its modules'), ``memory`` and ``bound``: sum of all module
    times over the largest stage time (the async pipeline's speed-up over
    one process of the same threads, before communication), and
    ``mem_ratio``: the largest stage's memory over one process's. Memory
    of modules ``s``: ``sum(state) + max_k(peaks[k] + grads of the modules
    of s before k)`` (what the benchmark rows report as static + peak: a
    stage's gradients live until its step)."""
    from mmlocal.engine.model_wrappers.local_pipeline import choose_stages
    peaks, state, times = (measured['peaks'], measured['state'],
                           measured['times'])
    grads = measured.get('grads') or [0] * len(peaks)

    def memory(mods):
        return sum(state[k] for k in mods) + max(
            peaks[k] + sum(grads[j] for j in mods if j < k) for k in mods)

    single = memory(range(len(peaks)))
    report = dict(procs=procs, peaks=peaks, state=state, times=times,
                  grads=grads, single_memory=single, balances={})
    for balance in BALANCES:
        stages = choose_stages(procs, balance, times, peaks, state)
        stage_times = [sum(times[k] for k in s) for s in stages]
        stage_memory = [memory(s) for s in stages]
        report['balances'][balance] = dict(
            stages=stages, times=stage_times, memory=stage_memory,
            bound=sum(times) / max(stage_times),
            mem_ratio=max(stage_memory) / single)
    return report


def format_plan(report):
    lines = []
    if 'config' in report:
        lines.append(
            f"{report['config']}  input "
            f"{'x'.join(map(str, report['input_shape']))}, "
            f"{report['threads']} thread(s), least of {report['repeats']} "
            f"timed steps; module block ranges {report['split']}")
    lines.append(f"{'module':>6}{'time [s]':>10}{'share':>7}"
                 f"{'act. peak':>12}{'kept':>12}")
    total = sum(report['times'])
    for k, (t, p, s) in enumerate(zip(report['times'], report['peaks'],
                                      report['state'])):
        lines.append(f'{k:>6}{t:>10.3f}{t / total:>7.0%}'
                     f'{format_bytes(p):>12}{format_bytes(s):>12}')
    for balance, b in report['balances'].items():
        lines.append(
            f"balance={balance!r}: stages {b['stages']}, time [s] "
            f"[{', '.join(f'{t:.3f}' for t in b['times'])}], memory "
            f"estimate [{', '.join(format_bytes(m) for m in b['memory'])}]"
            f" ({b['mem_ratio']:.2f}x one process's "
            f"{format_bytes(report['single_memory'])}), async bound "
            f"{b['bound']:.2f}x one process of as many threads")
    lines.append('kept: parameters, buffers, gradients and one optimizer '
                 'slot per trainable parameter; act. peak: the module\'s '
                 'phase peak less the earlier modules\' gradients')
    return '\n'.join(lines)


def save_plot(report, out_file):
    """Two bar charts: images/s and the largest process's memory."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(
            '--plot needs matplotlib, which is not installed in this '
            'environment (pip install matplotlib)') from exc
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    avail = [(row, r) for row, r in report['rows'].items()
             if r.get('available')]
    if not avail:
        raise SystemExit('--plot: no row was measured')
    names = [row for row, _ in avail]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, scale, label, ratio in (
            (axes[0], 'images_per_s', 1, 'images/s', 'speedup'),
            (axes[1], 'total_bytes', 2**20, 'static + peak per process '
             '[MiB]', 'mem_ratio')):
        values = [r[key] / scale for _, r in avail]
        bars = ax.bar(names, values)
        for bar, (_, r) in zip(bars, avail):
            text = f'{r[key] / scale:.1f}'
            if r.get(ratio) is not None:
                text += f'\n({r[ratio]:.2f}x)'
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2,
                               bar.get_height()),
                        ha='center', va='bottom', fontsize=8)
        ax.set_ylabel(label)
        ax.margins(y=0.25)
        ax.tick_params(axis='x', labelrotation=30, labelsize=8)
    fig.suptitle(f"{osp.basename(report['config'])}  "
                 f"{'x'.join(map(str, report['input_shape']))}, "
                 f"{report['procs']} processes", fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='images/s and per-process memory: one process vs P '
        'processes (pipeline sync/async, data parallel local/overlapped, '
        'data parallel end-to-end)',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='a LocalLearner config')
    parser.add_argument('--procs', type=int, default=2,
                        help='processes of the parallel rows (P)')
    parser.add_argument('--rows', nargs='+', default=list(ROWS),
                        choices=ROWS)
    parser.add_argument(
        '--input-shape', nargs='+', type=int, default=None,
        help='N C H W per process (default: the config\'s batch size and '
        'Resize scale)')
    parser.add_argument('--iters', type=int, default=10,
                        help='timed iterations')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--single-threads', type=int, default=None,
        help='threads of the single-process row (default: --procs, the '
        'total of the other rows)')
    parser.add_argument(
        '--balance', choices=BALANCES, default='time',
        help='default stages of the pipeline rows (LocalPipelineParallel '
        'balance)')
    parser.add_argument(
        '--plan', action='store_true',
        help='run no row: measure each module\'s time and memory in this '
        'process (--single-threads threads, default 1) and print the '
        'stages of both balances with their estimates')
    parser.add_argument('--repeats', type=int, default=3,
                        help='--plan: timed steps (the least is kept)')
    parser.add_argument('--timeout', type=int, default=1800,
                        help='seconds per row (and process group timeout)')
    parser.add_argument('--json', help='write the results as JSON here')
    parser.add_argument('--plot', help='write a bar chart (PNG) here')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (see tools/train.py)')
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--worker']:
        with open(argv[1]) as f:
            result = worker(json.load(f))
        with open(argv[2], 'w') as f:
            json.dump(result, f)
        return 0
    args = parse_args(argv)
    if args.plan:
        report = plan(args.config, procs=args.procs,
                      input_shape=args.input_shape,
                      threads=args.single_threads or 1,
                      repeats=args.repeats, seed=args.seed,
                      cfg_options=args.cfg_options)
        print(format_plan(report))
        if args.json:
            bm.save_json(report, args.json)
            print(f'results written to {args.json}')
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit('--plot needs matplotlib, which is not '
                             'installed in this environment (pip install '
                             'matplotlib)')
    report = run(args.config, rows=args.rows, procs=args.procs,
                 input_shape=args.input_shape, iters=args.iters,
                 warmup=args.warmup, seed=args.seed,
                 cfg_options=args.cfg_options, timeout=args.timeout,
                 single_threads=args.single_threads, balance=args.balance)
    print(format_table(report))
    if args.json:
        bm.save_json(report, args.json)
        print(f'results written to {args.json}')
    if args.plot:
        save_plot(report, args.plot)
        print(f'plot written to {args.plot}')
    return 1 if any(r.get('error') for r in report['rows'].values()) else 0


if __name__ == '__main__':
    sys.exit(main())
