import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_tool(args, cwd=REPO, check=True, timeout=600, env=None):
    """Run ``python <args>`` in a subprocess; return CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault('PYTHONPATH', REPO)
    full_env['OMP_NUM_THREADS'] = full_env.get('OMP_NUM_THREADS', '2')
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable] + list(args), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f'command failed ({proc.returncode}): {" ".join(args)}\n'
            f'--- stdout ---\n{proc.stdout[-6000:]}\n'
            f'--- stderr ---\n{proc.stderr[-6000:]}')
    return proc


@pytest.fixture(scope='session')
def demo_data_root():
    """The real demo detection dataset (prepared once, shared with the demo).

    Needs the package registry the first time (the ``deepforest`` wheel is
    downloaded into ``data/cache``); later runs reuse it.
    """
    out = osp.join(REPO, 'data', 'demo')
    proc = run_tool(['tools/data/prepare_demo.py', '--out', out, '--cache',
                     osp.join(REPO, 'data', 'cache')], check=False)
    if proc.returncode != 0:
        pytest.fail('prepare_demo.py failed:\n' + proc.stdout[-3000:] +
                    proc.stderr[-3000:])
    return out


@pytest.fixture(scope='session')
def cityscapes_tiny(tmp_path_factory):
    """A tiny segmentation dataset in Cityscapes layout (random images).

    ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
    ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` with train ids
    0..18 and 255 (ignore), as mmseg's CityscapesDataset expects.
    """
    import cv2
    root = tmp_path_factory.mktemp('cityscapes')
    rng = np.random.default_rng(0)
    for split, n in (('train', 4), ('val', 2)):
        img_dir = root / 'leftImg8bit' / split / 'testcity'
        ann_dir = root / 'gtFine' / split / 'testcity'
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for i in range(n):
            name = f'testcity_{i:06d}_000019'
            label = np.full((64, 128), 255, np.uint8)
            # a few constant regions, so the task is learnable
            for c in range(4):
                label[:, c * 32:(c + 1) * 32] = (c * 5 + i) % 19
            img = (rng.random((64, 128, 3)) * 40 +
                   label[..., None] * 10).astype(np.uint8)
            cv2.imwrite(str(img_dir / f'{name}_leftImg8bit.png'), img)
            cv2.imwrite(str(ann_dir / f'{name}_gtFine_labelTrainIds.png'),
                        label)
    return str(root)
