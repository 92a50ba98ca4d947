"""tools/analysis/demo_map.py: equal-iteration mAP table on the demo data."""
import json
import os.path as osp

from conftest import REPO
from tool_server import run_tool_fast as run_tool

DET_CFG = osp.join(REPO, 'tests', 'configs', 'retinanet_tiny_demo.py')
LOCAL_CFG = osp.join(REPO, 'tests', 'configs',
                     'infopro_retinanet_tiny_demo.py')


def test_demo_map_table_and_resume(demo_data_root, tmp_path):
    out = tmp_path / 'rows.json'
    args = ['tools/analysis/demo_map.py', f'e2e={DET_CFG}',
            f'infopro={LOCAL_CFG}', '--iters', '2', '--threads', '1',
            '--data-root', demo_data_root, '--work-dir', str(tmp_path),
            '--json', str(out)]
    proc = run_tool(args)
    rows = json.loads(out.read_text())
    assert [r['model'] for r in rows] == ['e2e', 'infopro']
    for r in rows:
        assert r['iters'] == 2
        assert 0.0 <= r['bbox_mAP'] <= r['bbox_mAP_50'] <= 1.0
        assert osp.isfile(osp.join(r['work_dir'], 'iter_2.pth'))
    assert '| e2e | 2 |' in proc.stdout and '| infopro | 2 |' in proc.stdout
    # --resume reads the finished runs instead of training again
    ckpt = osp.join(rows[0]['work_dir'], 'iter_2.pth')
    mtime = osp.getmtime(ckpt)
    run_tool(args + ['--resume'])
    assert osp.getmtime(ckpt) == mtime
    assert json.loads(out.read_text()) == [
        dict(r, train_minutes=s['train_minutes'])
        for r, s in zip(rows, json.loads(out.read_text()))]


def test_demo_map_bad_input(tmp_path):
    proc = run_tool(['tools/analysis/demo_map.py', 'no_equals_sign'],
                    check=False)
    assert proc.returncode != 0 and 'NAME=CONFIG' in proc.stderr
    proc = run_tool(['tools/analysis/demo_map.py', 'x=missing.py',
                     '--work-dir', str(tmp_path)], check=False)
    assert proc.returncode != 0 and "'missing.py'" in proc.stderr


def test_demo_map_no_detection_is_zero_map(demo_data_root, tmp_path):
    """A model that detects nothing (score threshold above any sigmoid)
    gets 0 mAP in the table instead of failing the whole comparison."""
    cfg = tmp_path / 'never_detects.py'
    cfg.write_text(f"_base_ = {DET_CFG!r}\n"
                   "model = dict(test_cfg=dict(score_thr=1.0))\n")
    out = tmp_path / 'rows.json'
    run_tool(['tools/analysis/demo_map.py', f'blind={cfg}', '--iters', '1',
              '--threads', '1', '--data-root', demo_data_root,
              '--work-dir', str(tmp_path), '--json', str(out)])
    row, = json.loads(out.read_text())
    assert row['bbox_mAP'] == 0.0 and row['bbox_mAP_50'] == 0.0
