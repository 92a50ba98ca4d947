"""Replacement Learning (RepL) vs end-to-end: trainable parameters, peak
training memory and iteration time.

For every config given (a model with an ``mmlocal.RepLBackbone``, possibly
inside an ``mmlocal.LocalLearner``):

- ``e2e``: the stock model, i.e. the config's model with every
  ``RepLBackbone`` replaced by its inner backbone
  (:func:`mmlocal.models.repl.stock_model_cfg`);
- ``repl``: the config's model as it is.

Both run the model's own ``train_step`` on the same random batch through
:func:`benchmark_memory.run_mode` (the local-learning benchmark's
measurement: :class:`mmlocal.utils.memory.PeakMemoryMeter`, warm-up
iterations first, median time of the measured ones), so the figures are
comparable with ``tools/analysis/benchmark_memory.py``. Configs whose stock
models are identical (``_i2_`` and ``_i3_`` variants) share one ``e2e`` run.

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
import sys
import traceback

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402

from benchmark_memory import (default_input_shape, default_scope,  # noqa
                              detect_task, find_num_classes,
                              is_local_learner, load_config,
                              plain_model_cfg, run_mode, sanitize_model_cfg)
from mmlocal.utils.memory import format_bytes  # noqa: E402


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


def _measure(cfg, local, input_shape, iters, warmup, device, seed):
    try:
        res = run_mode(cfg, 'local' if local else 'e2e', input_shape,
                       iters=iters, warmup=warmup, device=device, seed=seed)
    except Exception as e:  # report, go on with the other runs
        traceback.print_exc()
        return dict(available=False, error=True,
                    reason=f'{type(e).__name__}: {e}')
    res['total_bytes'] = res['peak_bytes'] + res['param_bytes'] + \
        res['optim_state_bytes']
    return res


def run(configs, input_shape=None, iters=2, warmup=1, device=None, seed=0,
        verbose=True):
    """Benchmark each config against its stock model; see the module
    docstring. Returns a JSON-able dict."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    e2e_cache = {}
    report = dict(device=str(device), torch=torch.__version__, iters=iters,
                  warmup=warmup, results=[])
    for path in configs:
        cfg = load_config(path)
        local = is_local_learner(cfg.model)
        stock = stock_config(cfg)
        plain = plain_model_cfg(cfg)
        task = detect_task(cfg, plain)
        shape = tuple(input_shape) if input_shape else \
            default_input_shape(task, plain)
        entry = dict(config=path, task=task, input_shape=list(shape),
                     num_classes=find_num_classes(plain, task))
        key = json.dumps(
            [sanitize_model_cfg(stock.model).to_dict(), list(shape),
             str(cfg.get('optim_wrapper', None))], sort_keys=True,
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
            for key, ratio in (('peak_bytes', 'peak_ratio'),
                               ('total_bytes', 'total_ratio'),
                               ('time_s', 'time_ratio')):
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
              'total ratio', 'time/iter', 'time ratio')
    rows = []
    for entry in report['results']:
        name = osp.basename(entry['config']).replace('.py', '')
        shape = 'x'.join(map(str, entry['input_shape']))
        for mode in ('e2e', 'repl'):
            r = entry[mode]
            if not r.get('available'):
                rows.append((name, shape, mode, r.get('reason', 'n/a'), '',
                             '', '', '', '', '', ''))
                continue
            bb = f"{r['backbone_trainable'] / 1e6:.2f}M"
            if mode == 'repl':
                bb += f" ({1 - r['backbone_trainable_ratio']:.0%} fewer)"
            rows.append((
                name if mode == 'e2e' else '', shape if mode == 'e2e' else '',
                mode, f"{r['params_trainable'] / 1e6:.2f}M", bb,
                format_bytes(r['peak_bytes']),
                _r(r.get('peak_ratio')) if mode == 'repl' else '',
                format_bytes(r['total_bytes']),
                _r(r.get('total_ratio')) if mode == 'repl' else '',
                f"{r['time_s']:.2f} s",
                _r(r.get('time_ratio')) if mode == 'repl' else ''))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = ' | '.join(f'{{:<{w}}}' for w in widths)
    lines = [
        f"device: {report['device']}  torch {report['torch']}  iters "
        f"{report['iters']} (warmup {report['warmup']}); peak = live tensors "
        'during an iteration above the level before it; static = '
        'parameters + buffers + optimizer state',
        fmt.format(*header), '-+-'.join('-' * w for w in widths)
    ]
    lines += [fmt.format(*row) for row in rows]
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='RepL vs e2e: trainable parameters, peak memory, time',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='+', help='RepL configs')
    parser.add_argument('--input-shape', nargs=4, type=int, default=None,
                        help='N C H W (default: 2 3 800 1333 for detection, '
                        '2 3 <crop size> for segmentation)')
    parser.add_argument('--iters', type=int, default=2,
                        help='measured iterations')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=None)
    parser.add_argument('--json', help='write the results as JSON here')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available')
    report = run(args.configs, input_shape=args.input_shape,
                 iters=args.iters, warmup=args.warmup, device=args.device,
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
