"""bbox mAP on the bundled demo data after the same number of iterations,
for several configs, as one table.

Each config is trained with ``tools/train.py`` (the normal runner: its own
optimizer, hooks and validation) for ``--iters`` iterations with seed
``--seed`` and evaluated once at the end with mmdet's ``CocoMetric``; the
table lists the final bbox mAP / mAP50 and the wall time.

Example (the local-learning families against end-to-end)::

    D=configs/demo
    python tools/analysis/demo_map.py \\
        e2e=$D/retinanet_r18_fpn_1xb4-300i_demo-trees.py \\
        dgl=$D/dgl_retinanet_r18_fpn_k3_1xb4-300i_demo-trees.py \\
        infopro=$D/infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py \\
        --iters 300 --work-dir work_dirs/demo_map --json work_dirs/map.json
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _scalars(work_dir):
    lines = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')):
        with open(path) as f:
            lines += [json.loads(line) for line in f if line.strip()]
    return lines


def _no_detections(work_dir):
    """Whether the newest run in ``work_dir`` validated with no detection
    at all (mmdet's CocoMetric then logs an error and no metric)."""
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.log')))
    if not logs:
        return False
    with open(logs[-1]) as f:
        return 'testing results of the whole dataset is empty' in f.read()


def demo_map(name, config, iters, work_dir, data_root, threads=None, seed=0,
             resume=False):
    """Train ``config`` on the demo data for ``iters`` iterations and return
    its final bbox mAP / mAP50.

    With ``resume=True`` a finished run in ``work_dir/name`` (checkpoint
    ``iter_<iters>.pth`` and logged metrics) is read instead of training
    again.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'config {config!r} of {name!r} not found')
    out = osp.join(work_dir, name)
    root = data_root.rstrip('/') + '/'
    ann = root + 'annotations/instances_val.json'
    if not osp.isfile(ann):
        raise FileNotFoundError(
            f'--data-root {data_root!r} has no annotations/'
            'instances_val.json; run python tools/data/prepare_demo.py')

    def final():
        # the validation after the last iteration (its logged step depends
        # on the config's log_processor, hence the checkpoint check)
        if not osp.isfile(osp.join(out, f'iter_{iters}.pth')):
            return []
        metrics = [s for s in _scalars(out) if 'coco/bbox_mAP' in s]
        if not metrics and _no_detections(out):
            # CocoMetric logs no metric when nothing scored above the
            # threshold (e.g. a few iterations from scratch): that is 0 mAP
            metrics = [{'coco/bbox_mAP': 0.0, 'coco/bbox_mAP_50': 0.0}]
        return metrics

    start = time.time()
    if not (resume and final()):
        cmd = [
            sys.executable,
            osp.join(REPO, 'tools', 'train.py'), config, '--work-dir', out,
            '--cfg-options', f'train_cfg.max_iters={iters}',
            f'train_cfg.val_interval={iters}', f'randomness.seed={seed}',
            f'train_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}'
        ]
        env = dict(os.environ)
        if threads:
            env['OMP_NUM_THREADS'] = str(threads)
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(
                f'training {name} failed:\n{proc.stderr[-3000:]}')
    metrics = final()
    if not metrics:
        raise RuntimeError(f'no coco/bbox_mAP logged at iteration {iters} '
                           f'in {out}')
    return dict(
        model=name,
        config=osp.relpath(config, REPO),
        iters=iters,
        bbox_mAP=metrics[-1]['coco/bbox_mAP'],
        bbox_mAP_50=metrics[-1]['coco/bbox_mAP_50'],
        train_minutes=(time.time() - start) / 60,
        work_dir=out)


def format_map_table(rows):
    lines = [
        '| model (demo data) | iters | bbox mAP | bbox mAP50 | train (min) |',
        '|---|---:|---:|---:|---:|'
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['iters']} | {r['bbox_mAP']:.3f} "
                     f"| {r['bbox_mAP_50']:.3f} | "
                     f"{r['train_minutes']:.1f} |")
    return '\n'.join(lines)


def named_runs(items):
    """``['a=x.py', 'b=y.py']`` -> ``[('a', 'x.py'), ('b', 'y.py')]``
    (the command lines of the comparison tools); exits naming a bad item."""
    runs = []
    for item in items:
        name, sep, config = item.partition('=')
        if not sep or not name or not config:
            raise SystemExit(f'{item!r}: give runs as NAME=CONFIG')
        runs.append((name, config))
    return runs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='bbox mAP of several configs on the demo data after '
        'equal training',
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='NAME=CONFIG')
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int,
                        help='OMP_NUM_THREADS of the training processes')
    parser.add_argument('--data-root', default=osp.join(REPO, 'data', 'demo'))
    parser.add_argument('--work-dir',
                        default=osp.join(REPO, 'work_dirs', 'demo_map'))
    parser.add_argument('--resume', action='store_true',
                        help='reuse finished runs found in --work-dir')
    parser.add_argument('--json', help='write the rows here')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runs = named_runs(args.runs)
    rows = []
    for name, config in runs:
        print(f'[demo_map] {name}: {config} ({args.iters} iterations) ...',
              flush=True)
        rows.append(demo_map(name, config, args.iters, args.work_dir,
                             args.data_root, args.threads, args.seed,
                             args.resume))
        if args.json:  # after every run: a long job keeps what it has
            with open(args.json, 'w') as f:
                json.dump(rows, f, indent=1)
        print(format_map_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_map_table(rows))
    return rows


if __name__ == '__main__':
    main()
