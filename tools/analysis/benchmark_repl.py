"""Replacement Learning (RepL) vs end-to-end: trainable parameters, peak
training memory and iteration time.

For every config given (a model with an ``mmlocal.RepLBackbone``, possibly
inside an ``mmlocal.LocalLearner``):

- ``e2e``: the stock model, i.e. the config's model with every
  ``RepLBackbone`` replaced by its inner backbone
  (:func:`mmlocal.models.repl.stock_model_cfg`);
- ``repl``: the config's model as it is.

Both run the model's own ``train_step`` on the same random batch (made by
``benchmark_memory.make_random_batch``, the local-learning benchmark's
batches): ``--warmup`` steps, ``--iters`` timed steps (median wall time and
median process CPU time, no profiler), then one step under
:class:`mmlocal.utils.memory.PeakMemoryMeter` (tensor-level peak: CUDA
allocator statistics, or the profiler's allocation events on the CPU,
deterministic). On a shared CPU the CPU time is the robust time figure:
other processes stretch our wall time, not the CPU time we consume. Configs
whose stock models are identical (``_i2_`` and ``_i3_`` variants) share one
``e2e`` run.

Reported per mode: trainable parameters of the model and of the backbone,
``peak`` (live tensor bytes during an iteration above the level before it:
activations, gradients, temporaries), ``static`` (parameters, buffers and
optimizer state, which live across iterations), ``peak + static`` and the
median iteration time, with ratios to ``e2e``.

Example::

    python tools/analysis/benchmark_repl.py \\
        configs/repl/repl_retinanet_r50_fpn_i2_8xb2-1x_coco.py \\
        configs/repl/repl_retinanet_r50_fpn_i3_8xb2-1x_coco.py \\
        --iters 2 --warmup 1 --json work_dirs/repl_bench/retinanet.json

Default input shapes are those of the local-learning benchmark:
``2x3x800x1333`` for detection, ``2x3x<crop size>`` for segmentation.
"""
import argparse
import copy
import gc
import json
import os
import os.path as osp
import statistics
import sys
import time
import traceback

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402

from benchmark_memory import (  # noqa: E402
    FALLBACK_OPTIM_WRAPPER,
    _loss_value,
    _static_bytes,
    _sync,
    _walk,
    build_train_model,
    default_input_shape,
    default_scope,
    describe_input,
    detect_task,
    find_num_classes,
    is_local_learner,
    load_config,
    make_random_batch,
    mode_model_cfg,
    model_input_shape,
    plain_model_cfg,
    sanitize_model_cfg)
from mmlocal.utils.memory import PeakMemoryMeter, format_bytes  # noqa: E402


def set_layer(cfg, layer):
    """Copy of ``cfg`` with ``layer=<layer>`` in every ``RepLBackbone``
    (``'full'`` or ``'light'``; None: unchanged)."""
    if layer is None:
        return cfg
    cfg = copy.deepcopy(cfg)

    def set_in(node):
        if str(node.get('type', '')).endswith('RepLBackbone'):
            node['layer'] = layer

    _walk(cfg.model, set_in)
    return cfg


def stock_config(cfg):
    """Copy of ``cfg`` whose model is the stock (e2e) model."""
    from mmlocal.models.repl import stock_model_cfg
    cfg = copy.deepcopy(cfg)
    cfg.model = stock_model_cfg(cfg.model)
    return cfg


def count_params(cfg):
    """Trainable parameters of the model and of its backbone (built once,
    offline)."""
    from mmengine.registry import MODELS, init_default_scope
    plain = plain_model_cfg(cfg)
    task = detect_task(cfg, plain)
    init_default_scope(default_scope(cfg, task))
    model = MODELS.build(sanitize_model_cfg(cfg.model))
    model.train()
    inner = model.model if is_local_learner(cfg.model) else model
    backbone = inner.backbone

    def trainable(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    info = dict(
        params_trainable=trainable(model),
        backbone_trainable=trainable(backbone),
        backbone_total=sum(p.numel() for p in backbone.parameters()))
    if hasattr(backbone, 'replaced_blocks'):
        info['replaced_blocks'] = backbone.replaced_blocks
        info['kept_tensors'] = backbone.kept_tensors
        info['transform_params'] = sum(
            p.numel() for p in backbone.replacements.parameters())
    del model
    gc.collect()
    return info


def count_flops(cfg, input_shape, blocks=(), seed=0):
    """FLOPs of one ``train_step`` of ``cfg``'s model (forward + backward,
    ``torch.utils.flop_counter``) and the part spent inside the backbone
    modules named in ``blocks`` (attribute paths in the inner backbone)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from torch.utils.flop_counter import FlopCounterMode
    plain = plain_model_cfg(cfg)
    task = detect_task(cfg, plain)
    num_classes = find_num_classes(plain, task)
    init_default_scope(default_scope(cfg, task))
    torch.manual_seed(seed)
    model = build_train_model(mode_model_cfg(cfg, 'e2e'))
    optim_cfg = cfg.get('optim_wrapper', None) or FALLBACK_OPTIM_WRAPPER
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(optim_cfg))
    # one step first: the light layer calibrates its statistics once
    model.train_step(
        make_random_batch(input_shape, task, num_classes, seed=seed + 1),
        optim_wrapper)
    counter = FlopCounterMode(display=False)
    with counter:
        model.train_step(
            make_random_batch(input_shape, task, num_classes, seed=seed),
            optim_wrapper)
    counts = counter.get_flop_counts()
    inside = sum(
        sum(ops.values()) for name, ops in counts.items()
        if any(name.endswith('backbone.' + b) for b in blocks))
    del model, optim_wrapper
    gc.collect()
    return counter.get_total_flops(), inside


def run_flops(configs, input_shape, layer=None, verbose=True):
    """Train-step FLOPs of e2e and RepL per config, and the zero-cost bound
    (e2e minus the replaced blocks' share of the stock model)."""
    from mmengine.registry import MODELS, init_default_scope
    out = []
    for path in configs:
        cfg = set_layer(load_config(path), layer)
        plain = plain_model_cfg(cfg)
        init_default_scope(default_scope(cfg, detect_task(cfg, plain)))
        model_cfg = sanitize_model_cfg(cfg.model)
        if is_local_learner(cfg.model):
            model_cfg = model_cfg['model']
        backbone = MODELS.build(model_cfg['backbone'])
        names = list(backbone.replaced_blocks)
        del backbone
        try:
            e2e, replaced = count_flops(stock_config(cfg), input_shape, names)
            repl, _ = count_flops(cfg, input_shape)
        except Exception as e:  # report, go on with the other configs
            traceback.print_exc()
            out.append(
                dict(config=path, error=f'{type(e).__name__}: {e}'))
            continue
        row = dict(
            config=path,
            input_shape=list(input_shape),
            model_input_shape=list(model_input_shape(plain, input_shape)),
            e2e_gflops=e2e / 1e9,
            repl_gflops=repl / 1e9,
            flops_ratio=repl / e2e,
            replaced_share=replaced / e2e,
            zero_cost_bound=1 - replaced / e2e)
        out.append(row)
        if verbose:
            print(f"{osp.basename(path)} "
                  f"[{describe_input(plain, input_shape)}]: "
                  f"e2e {row['e2e_gflops']:.1f} GFLOP, "
                  f"RepL {row['repl_gflops']:.1f} ({row['flops_ratio']:.3f}x)"
                  f", replaced blocks {row['replaced_share']:.1%} of e2e "
                  f"(zero-cost bound {row['zero_cost_bound']:.3f}x)",
                  flush=True)
    return out


def measure(cfg, local, input_shape, iters=2, warmup=1, device='cpu', seed=0):
    """Build ``cfg``'s model (``local``: the LocalLearner itself, else the
    plain model), run ``warmup`` + ``iters`` timed training steps, then one
    more under :class:`PeakMemoryMeter`.

    Time is measured without the profiler: wall time and the process's CPU
    time (``time.process_time``, all threads), median over ``iters``. On a
    shared CPU the CPU time is the robust figure (other processes' load
    stretches wall time, not our CPU time); on CUDA only wall time means
    anything.
    """
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    plain = plain_model_cfg(cfg)
    task = detect_task(cfg, plain)
    num_classes = find_num_classes(plain, task)
    init_default_scope(default_scope(cfg, task))
    torch.manual_seed(seed)
    model = build_train_model(
        mode_model_cfg(cfg, 'local' if local else 'e2e'), device)
    optim_cfg = cfg.get('optim_wrapper', None) or FALLBACK_OPTIM_WRAPPER
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(optim_cfg))
    batches = [
        make_random_batch(input_shape, task, num_classes, seed=seed)
        for _ in range(warmup + iters + 1)
    ]
    log_vars = None
    for _ in range(warmup):
        log_vars = model.train_step(batches.pop(0), optim_wrapper)
    wall, cpu = [], []
    for _ in range(iters):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        log_vars = model.train_step(batches.pop(0), optim_wrapper)
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    del log_vars
    gc.collect()
    result = dict(available=True, **_static_bytes(model, optim_wrapper))
    meter = PeakMemoryMeter(device)
    with meter:
        log_vars = model.train_step(batches.pop(0), optim_wrapper)
    result.update(
        peak_bytes=int(meter.peak_bytes),
        method=meter.method,
        time_s=statistics.median(wall),
        times_s=wall,
        cpu_time_s=statistics.median(cpu),
        cpu_times_s=cpu,
        loss=_loss_value(log_vars))
    result['total_bytes'] = result['peak_bytes'] + result['param_bytes'] + \
        result['optim_state_bytes']
    del model, optim_wrapper, batches, log_vars
    gc.collect()
    return result


def _measure(cfg, local, input_shape, iters, warmup, device, seed):
    try:
        return measure(
            cfg,
            local,
            input_shape,
            iters=iters,
            warmup=warmup,
            device=device,
            seed=seed)
    except Exception as e:  # report, go on with the other runs
        traceback.print_exc()
        return dict(
            available=False, error=True, reason=f'{type(e).__name__}: {e}')


def run(configs,
        input_shape=None,
        iters=2,
        warmup=1,
        device=None,
        seed=0,
        verbose=True,
        layer=None):
    """Benchmark each config against its stock model; see the module
    docstring. Returns a JSON-able dict."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    e2e_cache = {}
    report = dict(
        device=str(device),
        torch=torch.__version__,
        iters=iters,
        warmup=warmup,
        threads=torch.get_num_threads(),
        results=[])
    for path in configs:
        cfg = set_layer(load_config(path), layer)
        local = is_local_learner(cfg.model)
        stock = stock_config(cfg)
        plain = plain_model_cfg(cfg)
        task = detect_task(cfg, plain)
        shape = tuple(input_shape) if input_shape else \
            default_input_shape(task, plain)
        entry = dict(
            config=path,
            task=task,
            input_shape=list(shape),
            model_input_shape=list(model_input_shape(plain, shape)),
            input=describe_input(plain, shape),
            num_classes=find_num_classes(plain, task),
            layer=layer)
        key = json.dumps([
            sanitize_model_cfg(stock.model).to_dict(),
            list(shape),
            str(cfg.get('optim_wrapper', None))
        ],
                         sort_keys=True,
                         default=str)
        if key not in e2e_cache:
            if verbose:
                print(f'[benchmark_repl] e2e of {path} ...', flush=True)
            res = _measure(stock, False, shape, iters, warmup, device, seed)
            res.update(count_params(stock))
            e2e_cache[key] = res
        entry['e2e'] = e2e_cache[key]
        if verbose:
            print(f'[benchmark_repl] repl {path} ...', flush=True)
        res = _measure(cfg, local, shape, iters, warmup, device, seed)
        res.update(count_params(cfg))
        ref = entry['e2e']
        if res.get('available') and ref.get('available'):
            for key, ratio in (('peak_bytes', 'peak_ratio'), ('total_bytes',
                                                              'total_ratio'),
                               ('time_s', 'time_ratio'), ('cpu_time_s',
                                                          'cpu_time_ratio')):
                res[ratio] = res[key] / ref[key] if ref[key] else None
        res['backbone_trainable_ratio'] = \
            res['backbone_trainable'] / ref['backbone_trainable']
        res['params_trainable_ratio'] = \
            res['params_trainable'] / ref['params_trainable']
        entry['repl'] = res
        report['results'].append(entry)
        if verbose:
            print(format_table(dict(report, results=[entry])), flush=True)
    return report


def _r(x):
    return '-' if x is None else f'{x:.2f}x'


def format_table(report):
    header = ('config', 'input', 'mode', 'trainable (model)',
              'trainable (backbone)', 'peak', 'peak ratio', 'peak+static',
              'total ratio', 'cpu time/iter', 'cpu ratio', 'wall/iter',
              'wall ratio')
    rows = []
    for entry in report['results']:
        name = osp.basename(entry['config']).replace('.py', '')
        shape = entry.get('input') or 'x'.join(map(str, entry['input_shape']))
        for mode in ('e2e', 'repl'):
            r = entry[mode]
            if not r.get('available'):
                rows.append((name, shape, mode, r.get('reason', 'n/a')) +
                            ('', ) * 9)
                continue
            bb = f"{r['backbone_trainable'] / 1e6:.2f}M"
            if mode == 'repl':
                bb += f" ({1 - r['backbone_trainable_ratio']:.0%} fewer)"
            rows.append(
                (name if mode == 'e2e' else '', shape if mode == 'e2e' else '',
                 mode, f"{r['params_trainable'] / 1e6:.2f}M", bb,
                 format_bytes(r['peak_bytes']),
                 _r(r.get('peak_ratio')) if mode == 'repl' else '',
                 format_bytes(r['total_bytes']),
                 _r(r.get('total_ratio')) if mode == 'repl' else '',
                 f"{r['cpu_time_s']:.2f} s",
                 _r(r.get('cpu_time_ratio')) if mode == 'repl' else '',
                 f"{r['time_s']:.2f} s",
                 _r(r.get('time_ratio')) if mode == 'repl' else ''))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = ' | '.join(f'{{:<{w}}}' for w in widths)
    lines = [
        f"device: {report['device']}  torch {report['torch']}  threads "
        f"{report['threads']}  timed iters {report['iters']} (warmup "
        f"{report['warmup']}), median; peak = live tensors during one more "
        'iteration above the level before it; static = parameters + '
        'buffers + optimizer state',
        fmt.format(*header), '-+-'.join('-' * w for w in widths)
    ]
    lines += [fmt.format(*row) for row in rows]
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='RepL vs e2e: trainable parameters, peak memory, time',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='+', help='RepL configs')
    parser.add_argument(
        '--input-shape',
        nargs=4,
        type=int,
        default=None,
        help='N C H W (default: 2 3 800 1333 for detection, '
        '2 3 <crop size> for segmentation)')
    parser.add_argument(
        '--iters', type=int, default=2, help='measured iterations')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=None)
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch intra-op threads (default: torch\'s)')
    parser.add_argument(
        '--layer',
        choices=['full', 'light'],
        default=None,
        help='override the RepLBackbone layer of the configs')
    parser.add_argument(
        '--flops-only',
        action='store_true',
        help='only count train-step FLOPs (e2e, RepL, replaced blocks; '
        'torch.utils.flop_counter), e.g. at a small --input-shape')
    parser.add_argument('--json', help='write the results as JSON here')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flops_only:
        if not args.input_shape:
            raise SystemExit('--flops-only needs --input-shape')
        rows = run_flops(args.configs, args.input_shape, layer=args.layer)
        if args.json:
            os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
            with open(args.json, 'w') as f:
                json.dump(rows, f, indent=2)
        return 0
    report = run(
        args.configs,
        layer=args.layer,
        input_shape=args.input_shape,
        iters=args.iters,
        warmup=args.warmup,
        device=args.device,
        seed=args.seed)
    print(format_table(report))
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'results written to {args.json}')
    failed = [
        e['config'] for e in report['results']
        if not (e['e2e'].get('available') and e['repl'].get('available'))
    ]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
