"""LocalDistributedDataParallel reduces gradients in place: after a bucket
is started every ``.grad`` is a view of the bucket's buffer, so no second
copy of the gradients stays alive until the step."""
import socket
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from mmlocal.engine.model_wrappers.local_ddp import \
    LocalDistributedDataParallel


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip('a process group is already initialised')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_bucket_gradients_become_views_of_the_reduced_buffer(
        one_process_group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1))
    ddp = LocalDistributedDataParallel(model, bucket_size_mb=1e-4)
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    params = [p for p in model.parameters()]
    expected = [p.grad.clone() for p in params]
    originals = [weakref.ref(p.grad) for p in params]
    # tiny buckets: several of them, each flattened once
    buckets = list(ddp._buckets(params))
    assert len(buckets) > 1
    pending = [ddp._start_bucket(b) for b in buckets]
    ddp._finish(pending)
    alive = {id(p): ref() for p, ref in zip(params, originals)}
    for bucket, (_, flat) in zip(buckets, pending):
        base = flat.untyped_storage().data_ptr()
        for p in bucket:
            assert p.grad.untyped_storage().data_ptr() == base
            # the tensor autograd made is gone, or it is the buffer itself
            # (a one-tensor bucket is flattened without a copy)
            old = alive[id(p)]
            assert old is None or (
                len(bucket) == 1
                and old.untyped_storage().data_ptr() == base)
    assert sum(v is None for v in alive.values()) >= len(params) - 1
    # the values are the same (mean over one process)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    # the next backward accumulates into the views, as into any .grad
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
