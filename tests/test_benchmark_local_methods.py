"""tools/analysis/benchmark_local_methods.py on a tiny detector."""
import json
import os.path as osp

from conftest import REPO
from tool_server import run_tool_fast as run_tool

BASE = osp.join(REPO, 'tests', 'configs', 'infopro_retinanet_tiny_demo.py')


def test_families_table(tmp_path):
    k1 = tmp_path / 'k1_tiny.py'  # K=1: local learning == end-to-end
    k1.write_text(f"_base_ = {BASE!r}\nmodel = dict(num_modules=1)\n")
    out = tmp_path / 'r.json'
    proc = run_tool(['tools/analysis/benchmark_local_methods.py',
                     f'infopro={BASE}', f'k1={k1}',
                     '--input-shape', '2', '3', '256', '256', '--iters', '1',
                     '--device', 'cpu', '--threads', '1', '--json',
                     str(out)],
                    env=dict(OMP_NUM_THREADS='1'))
    report = json.loads(out.read_text())
    e2e = report['e2e']
    assert len(e2e) == 2 and e2e[0]['peak_bytes'] == e2e[1]['peak_bytes']
    fam = report['families']
    assert list(fam) == ['infopro', 'k1']
    # K=1 runs the wrapped model's own step: same peak as e2e
    assert fam['k1']['peak_bytes'] == e2e[0]['peak_bytes']
    # K=2: lower peak than end-to-end, aux params on top of e2e's
    local = fam['infopro']
    assert local['peak_bytes'] < e2e[0]['peak_bytes']
    assert local['params_trainable'] > e2e[0]['params_trainable']
    assert set(local['phases']) >= {'module0', 'module1'}
    assert '| infopro | K=2 |' in proc.stdout and '| k1 | K=1 |' in proc.stdout
    # on the CPU: process CPU time beside wall time, with its own ratio
    assert report['threads'] == 1
    assert all(r['cpu_time_s'] > 0 for r in e2e + list(fam.values()))
    assert 'CPU time/iter' in proc.stdout


def test_refuses_different_models(tmp_path):
    other = tmp_path / 'other.py'
    other.write_text(f"_base_ = {BASE!r}\n"
                     "model = dict(model=dict(bbox_head=dict(num_classes=2)))"
                     "\n")
    proc = run_tool(['tools/analysis/benchmark_local_methods.py',
                     f'a={BASE}', f'b={other}', '--input-shape', '1', '3',
                     '64', '64'], check=False)
    assert proc.returncode != 0
    assert "'b' wraps another model than 'a'" in proc.stderr
