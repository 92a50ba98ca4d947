"""Parameters, FLOPs and CPU latency of GSO-YOLO against YOLOv8, RTMDet and
YOLOX; optionally bbox mAP on the demo data after equal training.

For every model (built from its config, randomly initialised: nothing is
downloaded) the table gives

- ``params``: all parameters;
- ``FLOPs``: from ``mmengine.analysis.get_model_complexity_info`` on one
  ``3 x H x W`` image; mmengine (like fvcore) counts one multiply-add as
  one FLOP and skips element-wise ops (activations, additions) and eval-mode
  batch norm. Ultralytics' tables count 2 FLOPs per multiply-add (YOLOv8-s:
  28.6 G there, about 14.3 G here);
- ``latency``: median (and min) wall time of the network forward
  (``mode='tensor'``: backbone, neck, head; no box decoding or NMS, whose
  cost depends on how many boxes an untrained model lets through) at
  batch 1, ``torch.no_grad()``, eval mode, after warm-up runs, on the CPU.
  The models take turns (one forward each per round), so a machine whose
  load changes affects them alike. On a shared machine use ``--threads 1``:
  with more threads than free cores every parallel region waits for a
  descheduled thread (measured: 2 threads on 2 busy cores, 2-10x slower
  and erratic).

Untrained weights can drive eval-mode activations into denormal floats,
which make CPU kernels several times slower to a degree that differs per
model; the script flushes denormals to zero (``--keep-denormals`` to not).

Examples::

    python tools/analysis/benchmark_gso_yolo.py
    python tools/analysis/benchmark_gso_yolo.py --threads 1 --runs 9 \\
        --json work_dirs/gso_yolo_benchmark.json
    python tools/analysis/benchmark_gso_yolo.py --models gso-yolo-n yolov8-n
    # + bbox mAP of gso-yolo-n and yolov8-n trained on the demo data with
    # the same schedule (tools/train.py, 300 iterations each)
    python tools/analysis/benchmark_gso_yolo.py --models gso-yolo-n \\
        yolov8-n --threads 1 --demo-map --demo-iters 300
"""
import argparse
import copy
import json
import os
import os.path as osp
import statistics
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# make ``import mmlocal`` work from a plain checkout too
sys.path.insert(0, REPO)

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import demo_map as _demo_map  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

CONFIGS = {
    'gso-yolo-s': 'configs/gso_yolo/gso-yolo_s_8xb16-300e_coco.py',
    'yolov8-s': 'configs/gso_yolo/yolov8_s_8xb16-300e_coco.py',
    'rtmdet-s': 'mmdet::rtmdet/rtmdet_s_8xb32-300e_coco.py',
    'yolox-s': 'mmdet::yolox/yolox_s_8xb8-300e_coco.py',
    'gso-yolo-n': 'configs/gso_yolo/gso-yolo_n_8xb16-300e_coco.py',
    'yolov8-n': 'configs/gso_yolo/yolov8_n_8xb16-300e_coco.py',
    'gso-yolo-m': 'configs/gso_yolo/gso-yolo_m_8xb16-300e_coco.py',
}
DEFAULT_MODELS = ['gso-yolo-s', 'yolov8-s', 'rtmdet-s', 'yolox-s']
DEMO_CONFIGS = {
    'gso-yolo-n': 'configs/gso_yolo/gso-yolo_n_1xb8-300i_demo-trees.py',
    'yolov8-n': 'configs/gso_yolo/yolov8_n_1xb8-300i_demo-trees.py',
}


def load_config(config):
    """A :class:`Config` from a path or an ``mmdet::`` name.

    ``Config.fromfile('mmdet::...')`` is not supported by mmengine, so such
    a name is loaded through a one-line wrapper ``_base_ = 'mmdet::...'``.
    """
    if '::' in config:
        with tempfile.TemporaryDirectory() as tmp:
            wrapper = osp.join(tmp, 'wrapper.py')
            with open(wrapper, 'w') as f:
                f.write(f'_base_ = {config!r}\n')
            return Config.fromfile(wrapper)
    path = config if osp.isabs(config) else osp.join(REPO, config)
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {config!r} not found')
    return Config.fromfile(path)


def _drop_pretrained(node):
    """Remove every ``init_cfg`` that loads weights (nothing downloads)."""
    if isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        if isinstance(init_cfg, dict) and \
                init_cfg.get('type') == 'Pretrained':
            node['init_cfg'] = None
        for value in node.values():
            _drop_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _drop_pretrained(value)


def build_model(cfg):
    """The detector of ``cfg`` in eval mode, randomly initialised."""
    from mmengine.registry import init_default_scope

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import MODELS
    model_cfg = copy.deepcopy(cfg.model)
    _drop_pretrained(model_cfg)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model.eval()


def count_flops(model, shape):
    from mmengine.analysis import get_model_complexity_info
    with torch.no_grad():
        info = get_model_complexity_info(
            model, input_shape=shape, show_table=False, show_arch=False)
    return info['flops']


def time_forwards(models, shape, runs, warmup):
    """Median and min forward time (ms) of every model.

    The models take turns, one forward each per round, so that a load that
    changes over time (other processes on a shared machine) affects them
    alike.
    """
    x = torch.rand(1, *shape)
    times = {name: [] for name in models}
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {
        name: (statistics.median(t) * 1e3, min(t) * 1e3)
        for name, t in times.items()
    }


def measure(name, config, shape):
    """Build ``config``'s model; return it and its params/FLOPs row."""
    import logging

    from mmengine.logging import MMLogger
    cfg = load_config(config)
    logger = MMLogger.get_current_instance()
    level = logger.level
    # quiet: init_weights reports every parameter, the FLOP counter every
    # element-wise op it skips
    logger.setLevel(logging.ERROR)
    try:
        model = build_model(cfg)
        flops = count_flops(model, shape)
    finally:
        logger.setLevel(level)
    params = sum(p.numel() for p in model.parameters())
    return model, dict(
        model=name, config=config, params_m=params / 1e6, flops_g=flops / 1e9)


# ------------------------------------------------------------ demo mAP
def demo_map(name, iters, work_dir, data_root, threads=None):
    """Train the demo config of ``name`` for ``iters`` iterations with
    tools/train.py and return its final bbox mAP / mAP50
    (:func:`demo_map.demo_map`)."""
    if name not in DEMO_CONFIGS:
        raise ValueError(f'--demo-map: no demo config for {name!r}; one of '
                         f'{sorted(DEMO_CONFIGS)}')
    return _demo_map.demo_map(name, osp.join(REPO, DEMO_CONFIGS[name]),
                              iters, work_dir, data_root, threads)


# ----------------------------------------------------------------- output
def format_table(rows, shape, threads):
    lines = [
        f'input 1x{shape[0]}x{shape[1]}x{shape[2]}, CPU, {threads} '
        'threads, network forward (no NMS), FLOPs = multiply-adds',
        '',
        '| model | params (M) | FLOPs (G) | latency median (ms) | '
        'latency min (ms) |',
        '|---|---:|---:|---:|---:|',
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | "
                     f"{r['flops_g']:.2f} | {r['latency_ms']:.1f} | "
                     f"{r['latency_min_ms']:.1f} |")
    return '\n'.join(lines)


format_map_table = _demo_map.format_map_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Params, FLOPs and CPU latency of GSO-YOLO vs. YOLOv8, '
        'RTMDet and YOLOX',
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--models',
        nargs='+',
        default=DEFAULT_MODELS,
        help=f'names among {sorted(CONFIGS)} or NAME=CONFIG pairs')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=[640, 640],
        help='input height and width')
    parser.add_argument(
        '--runs',
        type=int,
        default=5,
        help='timed forward passes (median reported)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch CPU threads, also OMP_NUM_THREADS of the --demo-map '
        'training (default: torch default). On a busy machine use 1: extra '
        'threads stall at every parallel region')
    parser.add_argument(
        '--keep-denormals',
        action='store_true',
        help='do not flush denormal floats to zero')
    parser.add_argument('--json', help='write the results as JSON here')
    parser.add_argument(
        '--demo-map',
        action='store_true',
        help='also train each model on the demo data (tools/train.py) and '
        'report its bbox mAP')
    parser.add_argument('--demo-iters', type=int, default=300)
    parser.add_argument(
        '--demo-data-root', default=osp.join(REPO, 'data', 'demo'))
    parser.add_argument(
        '--work-dir',
        default=osp.join(REPO, 'work_dirs', 'benchmark_gso_yolo'))
    return parser.parse_args(argv)


def _resolve_models(names):
    resolved = []
    for item in names:
        if '=' in item:
            name, config = item.split('=', 1)
        elif item in CONFIGS:
            name, config = item, CONFIGS[item]
        else:
            raise ValueError(f'--models: unknown model {item!r}; use one of '
                             f'{sorted(CONFIGS)} or NAME=CONFIG')
        resolved.append((name, config))
    return resolved


def main(argv=None):
    args = parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise ValueError(f'--runs={args.runs} must be >= 1 and '
                         f'--warmup={args.warmup} >= 0')
    models = _resolve_models(args.models)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    shape = (3, *args.shape)
    rows, built = [], {}
    for name, config in models:
        print(f'building {name} ({config}) ...', flush=True)
        built[name], row = measure(name, config, shape)
        rows.append(row)
    print(
        f'timing {args.warmup} + {args.runs} forwards per model, taking '
        'turns ...',
        flush=True)
    latencies = time_forwards(built, shape, args.runs, args.warmup)
    for row in rows:
        row['latency_ms'], row['latency_min_ms'] = latencies[row['model']]
    threads = torch.get_num_threads()
    print()
    print(format_table(rows, shape, threads))
    result = dict(
        shape=list(shape),
        threads=threads,
        runs=args.runs,
        warmup=args.warmup,
        flush_denormal=not args.keep_denormals,
        torch=torch.__version__,
        cpu=_cpu_name(),
        models=rows)
    if args.demo_map:
        if not osp.isdir(args.demo_data_root):
            raise FileNotFoundError(
                f'--demo-data-root {args.demo_data_root!r} not found; run '
                'python tools/data/prepare_demo.py')
        map_rows = []
        for name, _ in models:
            print(
                f'training {name} on the demo data '
                f'({args.demo_iters} iterations) ...',
                flush=True)
            map_rows.append(
                demo_map(name, args.demo_iters, args.work_dir,
                         args.demo_data_root, args.threads))
        print()
        print(format_map_table(map_rows))
        result['demo_map'] = map_rows
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'\nwrote {args.json}')
    return result


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == '__main__':
    main()
