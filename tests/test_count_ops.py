"""tools/analysis/count_ops.py: kernels and host syncs of a training step."""
import os.path as osp
import sys

import torch

from conftest import REPO, run_tool

sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
import count_ops  # noqa: E402

BASE = osp.join(REPO, 'tests', 'configs', 'infopro_retinanet_tiny_demo.py')


def test_counter_counts_kernels_and_syncs():
    x = torch.randn(4, 4)
    with count_ops.OpCounter() as c:
        y = (x.t() @ x).relu()  # t is a view: 2 kernels
        bool((y > 0).any())  # 2 kernels + 1 sync
        y.nonzero()  # 1 kernel, 1 sync
    assert (c.kernels, c.syncs) == (6, 2), (c.kernels, c.syncs, c.by_op)


def test_batched_aux_targets_remove_syncs():
    """The tiny InfoPro detector (K=2): local learning adds one aux head;
    with mmdet's per-image targets it adds a sync per box and image."""
    import benchmark_memory as bm
    shape = (2, 3, 64, 64)
    e2e = count_ops.count_mode(bm.load_config(BASE), 'e2e', shape)
    local = {
        batched: count_ops.count_mode(
            bm.load_config(BASE,
                           {'model.aux.det_head.batched_targets': batched}),
            'local', shape)
        for batched in (True, False)
    }
    # mmdet: >= one sync per box (4) and image (2) in the low-quality loop
    assert local[False]['syncs'] >= local[True]['syncs'] + 8, local
    # batched: the aux head adds only the CPU focal loss's one_hot reads;
    # the NaN guard reads once per step
    assert local[True]['syncs'] <= e2e['syncs'] + 3, (e2e, local)
    assert local[True]['kernels'] < local[False]['kernels']
    # the aux head adds compute; the target path changes none of it
    assert local[True]['flops'] == local[False]['flops'] > e2e['flops'] > 0


def test_cli_table():
    proc = run_tool(['tools/analysis/count_ops.py', BASE, '--modes', 'e2e',
                     'local', '--input-shape', '1', '3', '64', '64',
                     '--cuda-like-focal-loss'])
    assert '| e2e |' in proc.stdout and '1.00x' in proc.stdout
    rows = {line.split('|')[1].strip(): line.split('|')
            for line in proc.stdout.splitlines() if line.startswith('| ')}
    # as on a GPU: local adds one host read (the NaN guard's) to e2e's
    assert int(rows['local'][4]) == int(rows['e2e'][4]) + 1, proc.stdout
    # host work: every ATen call (views too) >= kernels; the aux net's
    # forward, loss and backward add Python calls
    for mode in ('e2e', 'local'):
        assert int(rows[mode][7]) > int(rows[mode][2]), proc.stdout
    assert int(rows['local'][8]) > int(rows['e2e'][8]) > 1000, proc.stdout


def test_parts_attribute_the_calls_of_submodules():
    """``parts``: the aux net's own count (its ``loss`` call) covers its
    children's; a pattern matches by dot-separated segment."""
    import benchmark_memory as bm
    r = count_ops.count_mode(bm.load_config(BASE), 'local', (1, 3, 64, 64),
                             parts=('aux_nets.*', 'aux_nets.*.*'))
    parts = r['parts']
    assert 'aux_nets.0' in parts and 'aux_nets.0.task_head' in parts
    assert not any(n.count('.') > 2 for n in parts)  # no grandchildren
    children = [v for n, v in parts.items() if n.startswith('aux_nets.0.')]
    total = parts['aux_nets.0']
    assert all(c['kernels'] > 0 for c in children), parts
    assert total['kernels'] >= sum(c['kernels'] for c in children)
    assert 0 < total['flops'] <= r['flops']
    assert count_ops._matches('aux_nets.0.lb', 'aux_nets.*.*')
    assert not count_ops._matches('aux_nets.0.lb.conv1', 'aux_nets.*.*')


def test_cuda_like_focal_loss_counts_one_kernel_per_call():
    """The CPU stand-in of mmcv's fused focal-loss kernel runs ~15 ops per
    32k rows; with --cuda-like-focal-loss each call counts as one kernel
    (as on a GPU), whatever the number of anchors."""
    from cuda_like_focal_loss import cuda_like_focal_loss
    from mmdet.models.losses import FocalLoss
    loss_fn = FocalLoss()
    counts = {}
    for rows in (100, 70000):  # 1 and 3 chunks of the stand-in
        pred = torch.randn(rows, 4, requires_grad=True)
        target = torch.randint(0, 5, (rows, ))
        with cuda_like_focal_loss(True):
            counter = count_ops.OpCounter()
            with counter, count_ops.fused_focal_kernels(counter):
                loss_fn(pred, target, avg_factor=3.0).backward()
        counts[rows] = counter.kernels
        assert counter.by_op['sigmoid_focal_loss_forward'] == 1
        assert counter.by_op['sigmoid_focal_loss_backward'] == 1
    assert counts[100] == counts[70000] < 20, counts
