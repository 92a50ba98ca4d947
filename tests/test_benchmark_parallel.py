"""tools/analysis/benchmark_parallel.py on a narrow LocalLearner RetinaNet
(processes started by the tool, gloo on the CPU)."""
import importlib.util
import json
import os.path as osp

import pytest

from conftest import REPO, run_tool

TOOL = osp.join(REPO, 'tools', 'analysis', 'benchmark_parallel.py')
_spec = importlib.util.spec_from_file_location('benchmark_parallel', TOOL)
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)

LOCAL_RETINANET_TINY = """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model=dict(
        _base_.model,
        backbone=dict(_base_.model.backbone, depth=18, base_channels=16,
                      frozen_stages=-1, init_cfg=None),
        neck=dict(_base_.model.neck, in_channels=[16, 32, 64, 128],
                  out_channels=32),
        bbox_head=dict(_base_.model.bbox_head, num_classes=3,
                       in_channels=32, feat_channels=32, stacked_convs=1)),
    num_modules=2,
    aux=dict(type='mmlocal.InfoProAux', det_head=dict(feat_channels=16),
             recon=dict(channels=16)))
"""


@pytest.fixture(scope='module')
def tiny_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp('bp') / 'local_retinanet_tiny.py'
    path.write_text(LOCAL_RETINANET_TINY)
    return str(path)


def test_rows_run_print_and_plot(tiny_cfg, tmp_path):
    """One process, two data-parallel processes (overlapped) and the async
    pipeline (skipped with its reason if the wrapper is not there): every
    row printed with images/s and memory, JSON and PNG written."""
    rows = ['single', 'dp_local_overlap', 'pipe_async']
    out = tmp_path / 'parallel.json'
    plot = tmp_path / 'parallel.png'
    proc = run_tool([TOOL, tiny_cfg, '--rows', *rows, '--procs', '2',
                     '--input-shape', '1', '3', '64', '64', '--iters', '1',
                     '--warmup', '1', '--timeout', '300', '--json',
                     str(out), '--plot', str(plot)])
    report = json.loads(out.read_text())
    assert list(report['rows']) == rows
    single, dp = report['rows']['single'], report['rows']['dp_local_overlap']
    assert single['procs'] == 1 and dp['procs'] == 2
    assert single['threads'] == dp['threads'] == 2  # same total threads
    # data parallel: two processes, each its own image per iteration
    assert single['images'] == 1 and dp['images'] == 2
    for r in (single, dp):
        assert r['images_per_s'] > 0 and r['peak_bytes'] > 0
        assert r['static_bytes'] > 0
        assert len(r['ranks']) == r['procs']
    assert single['speedup'] == 1.0 and single['mem_ratio'] == 1.0
    # both ranks hold the whole model: the same static bytes
    assert dp['ranks'][0]['static_bytes'] == dp['ranks'][1]['static_bytes']
    table = proc.stdout
    for row in rows:
        assert any(line.startswith(row) for line in table.splitlines()), \
            table
    pipe = report['rows']['pipe_async']
    if bp.pipeline_available() is None:
        assert pipe['available'] and pipe['images'] == 1, pipe
    else:
        assert pipe['reason'].startswith('skipped: '), pipe
        assert 'LocalPipelineParallel' in table
    assert plot.stat().st_size > 1000


def test_pipeline_rows_skipped_with_the_reason(tiny_cfg, monkeypatch):
    monkeypatch.setattr(bp, 'pipeline_available',
                        lambda: 'mmlocal.LocalPipelineParallel is not '
                        'registered')
    report = bp.run(tiny_cfg, rows=('pipe_sync', 'pipe_async'),
                    input_shape=(1, 3, 32, 32), iters=1, verbose=False)
    table = bp.format_table(report)
    for row in ('pipe_sync', 'pipe_async'):
        assert not report['rows'][row]['available']
        assert f'{row:<18}  -- skipped: mmlocal.LocalPipelineParallel ' \
            'is not registered' in table


def test_bad_options_name_the_option(tiny_cfg):
    with pytest.raises(ValueError, match='procs=1'):
        bp.run(tiny_cfg, procs=1)
    with pytest.raises(ValueError, match="'dp'"):
        bp.run(tiny_cfg, rows=('dp', ))
    with pytest.raises(ValueError, match='iters=0'):
        bp.run(tiny_cfg, iters=0)
    with pytest.raises(ValueError, match='single_threads=0'):
        bp.run(tiny_cfg, single_threads=0)


def test_ratios_against_both_single_rows():
    """Speed-ups over the P-thread and the one-thread single process
    (pure arithmetic on a report: no processes), both in the table."""
    mib = 2**20

    def row(procs, threads, ips, total):
        return dict(available=True, procs=procs, threads=threads,
                    images_per_s=ips, static_bytes=total // 2,
                    peak_bytes=total - total // 2, total_bytes=total)

    report = dict(config='c.py', procs=2, input_shape=[4, 3, 32, 32],
                  iters=5, balance='time', rows=dict(
                      single=row(1, 2, 2.0, 400 * mib),
                      single_1t=row(1, 1, 1.25, 400 * mib),
                      pipe_async=row(2, 2, 2.5, 240 * mib)))
    report['rows']['pipe_async']['stages'] = [[0, 1], [2]]
    bp.add_ratios(report)
    pipe = report['rows']['pipe_async']
    assert pipe['speedup'] == pytest.approx(1.25)
    assert pipe['speedup_1t'] == pytest.approx(2.0)
    assert pipe['mem_ratio'] == pytest.approx(0.6)
    assert report['rows']['single_1t']['speedup'] == pytest.approx(0.625)
    lines = bp.format_table(report).splitlines()
    line = next(ln for ln in lines if ln.startswith('pipe_async'))
    assert line.split()[4:6] == ['1.25', '2.00'] and line.endswith('0.60')
    assert "pipeline stages (balance='time'): pipe_async [[0, 1], [2]]" \
        in lines
    # without the one-thread row: '-' in its column
    del report['rows']['single_1t']
    for r in report['rows'].values():
        r.pop('speedup_1t', None)
    bp.add_ratios(report)
    line = next(ln for ln in bp.format_table(report).splitlines()
                if ln.startswith('pipe_async'))
    assert line.split()[5] == '-'


def test_plan_summary_groups_and_estimates():
    """--plan's arithmetic: each balance's stages, stage times, the async
    bound and the memory estimate of a stage (kept bytes + the largest
    activation peak plus the stage's earlier gradients)."""
    measured = dict(times=[1.0, 1.0, 0.06, 1.0], peaks=[10, 10, 10, 10],
                    state=[5, 5, 5, 40], grads=[1, 1, 1, 10])
    plan = bp.summarize_plan(measured, 2)
    t, m = plan['balances']['time'], plan['balances']['memory']
    assert t['stages'] == m['stages'] == [[0, 1, 2], [3]]
    assert t['times'] == pytest.approx([2.06, 1.0])
    assert t['bound'] == pytest.approx(3.06 / 2.06)
    # one process: 55 kept + module 3's 10 + 3 earlier gradients
    assert plan['single_memory'] == 68
    assert t['memory'] == [15 + 12, 40 + 10]
    assert t['mem_ratio'] == pytest.approx(50 / 68)
    text = bp.format_plan(plan)
    assert "balance='time': stages [[0, 1, 2], [3]]" in text
    with pytest.raises(ValueError, match='balance='):
        bp.run('unused.py', balance='speed')
