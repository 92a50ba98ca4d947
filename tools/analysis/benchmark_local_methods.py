"""Every local-learning family against end-to-end training (and against a
reference family, InfoPro by default) in one process: peak memory, iteration
time and trainable parameters.

All configs must wrap the same model (``LocalLearner(model=...)``); its
end-to-end twin is measured first and again last (the time ratio uses the
mean of both, so a drifting machine load shows up as the e2e spread), each
family's ``local`` mode in between, with the measurement of
``benchmark_memory.py`` (:func:`benchmark_memory.run_mode`).

Example (issue #4's table)::

    C=configs/local
    python tools/analysis/benchmark_local_methods.py \\
        infopro=$C/infopro_retinanet_r50_fpn_k4_8xb2-1x_coco.py \\
        man=$C/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py \\
        --input-shape 2 3 800 1333 --iters 1 --json work_dirs/families.json
"""
import argparse
import gc
import json
import os.path as osp
import statistics
import sys
import traceback

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import benchmark_memory as bm  # noqa: E402
from demo_map import named_runs  # noqa: E402
from cuda_like_focal_loss import cuda_like_focal_loss  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmlocal.utils.memory import format_bytes  # noqa: E402


def _same_model(cfgs):
    plains = {name: bm.sanitize_model_cfg(bm.plain_model_cfg(cfg))
              for name, cfg in cfgs.items()}
    first = next(iter(plains))
    for name, plain in plains.items():
        if plain.to_dict() != plains[first].to_dict():
            raise ValueError(
                f'{name!r} wraps another model than {first!r}: the families '
                'must share the end-to-end model to be compared')


def run(runs, input_shape=None, iters=1, warmup=1, device=None, seed=0,
        cfg_options=None, reference='infopro', verbose=True, on_result=None):
    """Measure e2e (twice) and every ``runs`` entry's local mode.

    Args:
        runs (list[tuple[str, str]]): ``(name, config path)``.

    Returns:
        dict: ``input_shape``, ``e2e`` (first and last run), ``families``
        (name -> result of :func:`benchmark_memory.run_mode` plus
        ``config``, or ``error``) and ``reference``. ``on_result(report)``
        is called after every measurement (a long run keeps what it has).
    """
    cfgs = {}
    for name, path in runs:
        cfg = bm.load_config(path, cfg_options)
        if not bm.is_local_learner(cfg.model):
            raise ValueError(f'{name}={path}: model is not a LocalLearner')
        cfgs[name] = cfg
    _same_model(cfgs)
    first = next(iter(cfgs.values()))
    plain = bm.plain_model_cfg(first)
    task = bm.detect_task(first, plain)
    num_classes = bm.find_num_classes(plain, task)
    input_shape = bm._check_shape(input_shape or
                                  bm.default_input_shape(task, plain))
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    kwargs = dict(iters=iters, warmup=warmup, device=device, task=task,
                  num_classes=num_classes, seed=seed)

    def measure(cfg, mode, label):
        if verbose:
            print(f'[benchmark_local_methods] {label} ...', flush=True)
        result = bm.run_mode(cfg, mode, input_shape, **kwargs)
        gc.collect()
        return result

    report = dict(input_shape=list(input_shape), task=task, device=device,
                  iters=iters, warmup=warmup, torch=torch.__version__,
                  threads=torch.get_num_threads(),
                  reference=reference if reference in cfgs else None,
                  e2e=[measure(first, 'e2e', 'e2e')], families={})
    for name, cfg in cfgs.items():
        try:
            res = measure(cfg, 'local', name)
        except Exception as e:  # report it, go on with the other families
            traceback.print_exc()
            res = dict(error=f'{type(e).__name__}: {e}')
        res['config'] = dict(runs)[name]
        res['split'] = cfg.model.get('split_points') or \
            f"K={cfg.model.get('num_modules')}"
        report['families'][name] = res
        if on_result:
            on_result(report)
    report['e2e'].append(measure(first, 'e2e', 'e2e (again)'))
    if on_result:
        on_result(report)
    return report


def format_table(report):
    e2e = report['e2e']
    e2e_peak = e2e[0]['peak_bytes']
    e2e_time = statistics.mean(r['time_s'] for r in e2e)
    ref = report['families'].get(report['reference'] or '')
    shape = 'x'.join(map(str, report['input_shape']))
    e2e_times = ' / '.join('%.2f s' % r['time_s'] for r in e2e)
    cpu = report['device'] == 'cpu' and all(
        'cpu_time_s' in r for r in e2e)
    e2e_cpu = statistics.mean(r['cpu_time_s'] for r in e2e) if cpu else None
    lines = [
        f"input {shape}, {report['device']}, {report['iters']} timed "
        f"iteration(s) after {report['warmup']} warm-up; e2e time "
        f'{e2e_times} (first / last run, ratios use the mean)',
        '',
        '| family | split | peak | vs e2e | vs ' +
        (report['reference'] or '-') + ' | time/iter | vs e2e | ' +
        ('CPU time/iter | vs e2e | ' if cpu else '') +
        'trainable params | largest phase |',
        '|---|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if cpu else '') +
        '---:|---|'
    ]
    if cpu:
        lines[0] += (f'; CPU time (this process, {report.get("threads")} '
                     'thread(s)) is the robust figure on a shared machine')

    def cpu_cols(r):
        if not cpu:
            return ''
        return f"{r['cpu_time_s']:.2f} s | {r['cpu_time_s'] / e2e_cpu:.2f}x | "

    lines.append(f"| e2e | - | {format_bytes(e2e_peak)} | 1.00x | - | "
                 f'{e2e_time:.2f} s | 1.00x | ' +
                 (f'{e2e_cpu:.2f} s | 1.00x | ' if cpu else '') +
                 f"{e2e[0]['params_trainable'] / 1e6:.2f}M | - |")
    for name, r in report['families'].items():
        if 'error' in r:
            lines.append(f"| {name} | {r['split']} | failed: {r['error']} |")
            continue
        phases = {k: v for k, v in r.get('phases', {}).items()
                  if k != bm.REST_PHASE}
        largest = max(phases, key=phases.get) if phases else '-'
        vs_ref = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" \
            if ref else '-'
        lines.append(
            f"| {name} | {r['split']} | {format_bytes(r['peak_bytes'])} | "
            f"{r['peak_bytes'] / e2e_peak:.2f}x | {vs_ref} | "
            f"{r['time_s']:.2f} s | {r['time_s'] / e2e_time:.2f}x | " +
            cpu_cols(r) +
            f"{r['params_trainable'] / 1e6:.2f}M | {largest} |")
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='local-learning families vs end-to-end: memory, time, '
        'parameters',
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='NAME=CONFIG')
    parser.add_argument('--input-shape', type=int, nargs=4,
                        metavar=('N', 'C', 'H', 'W'))
    parser.add_argument('--iters', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int,
                        help='intra-op threads (torch.set_num_threads); 1 '
                        'makes CPU time comparable between runs')
    parser.add_argument('--reference', default='infopro',
                        help='family the "vs" column compares with')
    parser.add_argument('--json', help='write the report here')
    parser.add_argument(
        '--cuda-like-focal-loss', action='store_true',
        help='on the CPU, let the sigmoid focal loss keep only what '
        'mmcv\'s CUDA op keeps (cuda_like_focal_loss.py): peaks as on a '
        'GPU for RetinaNet-style heads')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='applied to every config')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runs = named_runs(args.runs)

    def save(report):
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1, default=str)

    if args.threads:
        torch.set_num_threads(args.threads)
    with cuda_like_focal_loss(args.cuda_like_focal_loss):
        report = run(runs, args.input_shape, args.iters, args.warmup,
                     args.device, args.seed, args.cfg_options,
                     args.reference, on_result=save)
    report['cuda_like_focal_loss'] = args.cuda_like_focal_loss
    save(report)
    print(format_table(report))
    if args.json:
        print(f'results written to {args.json}')
    return report


if __name__ == '__main__':
    main()
