"""Exactness of :class:`mmlocal.utils.memory.PeakMemoryMeter` on the CPU."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint_sequential

from mmlocal.utils.memory import CPU_METHOD, PeakMemoryMeter, format_bytes

MiB = 2**20
SLACK = 8 * 1024  # a few KiB of small tensors (scalars, indices)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine
    OpenMP barriers (spinning threads waiting for descheduled ones) make
    them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_step(model, x, optimizer=None, meter=None, checkpoint=0):
    if checkpoint:
        out = checkpoint_sequential(model, checkpoint, x,
                                    use_reentrant=False)
    else:
        out = model(x)
    loss = out.square().mean()
    if meter is not None:
        meter.mark('forward')
    loss.backward()
    if meter is not None:
        meter.mark('backward')
    if optimizer is not None:
        optimizer.step()
        if meter is not None:
            meter.mark('step')
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _mlp(width=256, depth=8, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.ReLU()]
    return nn.Sequential(*layers)


def test_method_and_errors():
    meter = PeakMemoryMeter()
    assert meter.method == CPU_METHOD
    with pytest.raises(RuntimeError, match='inside the with block'):
        meter.mark('x')
    with pytest.raises(ValueError, match='unsupported device'):
        PeakMemoryMeter('meta')
    with torch.profiler.profile():
        with pytest.raises(RuntimeError, match='another profiler'):
            with PeakMemoryMeter():
                pass
    assert format_bytes(3 * MiB) == '3.00 MiB'


def test_single_allocation_is_exact():
    with PeakMemoryMeter('cpu') as meter:
        a = torch.empty(10 * MiB, dtype=torch.uint8)
    assert 10 * MiB <= meter.peak_bytes <= 10 * MiB + SLACK
    assert meter.end_bytes == 10 * MiB  # still alive at exit
    del a
    # float tensors: 10 MiB = 2.5M float32
    with PeakMemoryMeter('cpu') as meter:
        b = torch.zeros(10 * MiB // 4)
        del b
    assert 10 * MiB <= meter.peak_bytes <= 10 * MiB + SLACK
    assert meter.end_bytes == 0


def test_sequential_allocations_do_not_add_up():
    with PeakMemoryMeter('cpu') as meter:
        a = torch.ones(10 * MiB, dtype=torch.uint8)
        del a
        b = torch.ones(10 * MiB, dtype=torch.uint8)
        del b
    assert 10 * MiB <= meter.peak_bytes <= 10 * MiB + SLACK
    # two alive at once do add up
    with PeakMemoryMeter('cpu') as meter:
        a = torch.ones(10 * MiB, dtype=torch.uint8)
        b = torch.ones(10 * MiB, dtype=torch.uint8)
        del a, b
    assert 20 * MiB <= meter.peak_bytes <= 20 * MiB + SLACK


def test_views_and_inplace_cost_nothing():
    x = torch.ones(4 * MiB // 4)
    with PeakMemoryMeter('cpu') as meter:
        v = x.view(-1, 4)
        v.mul_(2)
        x.add_(1)
        del v
    assert meter.peak_bytes <= SLACK


def test_phases():
    with PeakMemoryMeter('cpu') as meter:
        a = torch.ones(4 * MiB, dtype=torch.uint8)
        del a
        meter.mark('a')  # peak 4 MiB
        keep = torch.ones(2 * MiB, dtype=torch.uint8)
        meter.mark('b')  # 2 MiB
        c = torch.ones(MiB, dtype=torch.uint8)
        del c
        meter.mark('c')  # starts at 2 MiB, +1 MiB
        meter.mark('d')  # nothing happens: the level it starts at
        d = torch.ones(3 * MiB, dtype=torch.uint8)
        del d
        meter.mark('a')  # repeated name: the larger of 4 and 5 MiB
    assert list(meter.phases) == ['a', 'b', 'c', 'd', 'tail']
    expected = dict(a=5 * MiB, b=2 * MiB, c=3 * MiB, d=2 * MiB,
                    tail=2 * MiB)
    for name, value in expected.items():
        assert value <= meter.phases[name] <= value + SLACK, name
    assert 5 * MiB <= meter.peak_bytes <= 5 * MiB + SLACK
    assert meter.end_bytes == 2 * MiB
    del keep


def test_counts_grads_saved_activations_and_optimizer_state():
    torch.manual_seed(0)
    width, batch = 512, 1024
    model = nn.Linear(width, width, bias=False)  # 1 MiB of weights
    param = width * width * 4
    act = batch * width * 4  # 2 MiB per activation
    x = torch.randn(batch, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with PeakMemoryMeter('cpu') as meter:
        _train_step(model, x, optimizer, meter)
    # forward: output (saved for backward by square)
    assert act <= meter.phases['forward'] <= act + SLACK + 2 * act
    # backward creates the weight gradient (and transient grad buffers)
    assert meter.phases['backward'] >= act + param
    # SGD step creates the momentum buffer, which stays
    assert meter.phases['step'] >= 2 * param
    assert param <= meter.end_bytes <= param + SLACK
    # second step: momentum exists, gradient freed by zero_grad
    with PeakMemoryMeter('cpu') as meter2:
        _train_step(model, x, optimizer, meter2)
    assert meter2.end_bytes <= SLACK
    assert meter2.phases['backward'] >= act + param


def test_peak_grows_linearly_with_batch():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    peaks = {}
    for batch in (4, 8, 16):
        x = torch.randn(batch, 3, 32, 32)
        _train_step(model, x, optimizer)  # warm up: optimizer state
        with PeakMemoryMeter('cpu') as meter:
            _train_step(model, x, optimizer)
        peaks[batch] = meter.peak_bytes
    step1 = peaks[8] - peaks[4]
    step2 = peaks[16] - peaks[8]
    assert step1 > 0
    # activations 4->8 add half of what 8->16 adds
    assert step2 == pytest.approx(2 * step1, rel=0.1)
    # per-sample slope at least the saved activations of the convs
    assert step1 / 4 >= 2 * 16 * 32 * 32 * 4


def test_checkpointing_lowers_the_peak():
    model = _mlp()
    x = torch.randn(4096, 256)  # 4 MiB per activation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    peaks = {}
    for segments in (0, 4):
        _train_step(model, x, optimizer, checkpoint=segments)
        with PeakMemoryMeter('cpu') as meter:
            _train_step(model, x, optimizer, checkpoint=segments)
        peaks[segments] = meter.peak_bytes
    # plain: the 8 ReLU outputs (4 MiB each) are saved for backward;
    # 4 segments: the segment inputs, the last (not checkpointed) segment and
    # one recomputed segment at a time: at least two activations fewer
    assert peaks[0] >= 8 * 4 * MiB
    assert peaks[4] <= peaks[0] - 2 * 4 * MiB


def test_identical_runs_give_identical_numbers():
    results = []
    for _ in range(2):
        model = _mlp(width=128, depth=4, seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01,
                                    momentum=0.9)
        x = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
        _train_step(model, x, optimizer)
        with PeakMemoryMeter('cpu') as meter:
            _train_step(model, x, optimizer, meter)
        results.append((meter.peak_bytes, meter.end_bytes, meter.phases))
    assert results[0] == results[1]
    assert results[0][0] > 0


def test_memory_freed_from_before_entry_is_not_credited():
    """Documented limit: the CPU method only follows allocations made in
    the block, so freeing older memory does not lower the figure."""
    a = torch.ones(4 * MiB, dtype=torch.uint8)
    with PeakMemoryMeter('cpu') as meter:
        del a
        b = torch.ones(4 * MiB, dtype=torch.uint8)
    assert 4 * MiB <= meter.peak_bytes <= 4 * MiB + SLACK
    del b


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_single_allocation_and_phases():
    with PeakMemoryMeter('cuda') as meter:
        a = torch.empty(10 * MiB, dtype=torch.uint8, device='cuda')
        del a
        meter.mark('first')
        b = torch.empty(2 * MiB, dtype=torch.uint8, device='cuda')
    assert meter.method == 'cuda_max_memory_allocated'
    assert 10 * MiB <= meter.peak_bytes <= 10 * MiB + SLACK
    assert 10 * MiB <= meter.phases['first'] <= 10 * MiB + SLACK
    assert 2 * MiB <= meter.phases['tail'] <= 2 * MiB + SLACK
    del b
