"""A deterministic peak-memory meter for training steps, on CPU and CUDA.

Usage::

    with PeakMemoryMeter('cpu') as meter:
        loss = model(x).sum()
        loss.backward()
        meter.mark('backward')          # optional per-phase peaks
        optimizer.step()
        optimizer.zero_grad()
    meter.peak_bytes, meter.phases
"""
import os

import torch

__all__ = ['PeakMemoryMeter', 'format_bytes']

# kineto prints start/stop lines (and a CUDA probe error on CPU-only
# machines) at every profiler run unless told not to. It reads this when the
# profiler is first used in the process, hence at import.
os.environ.setdefault('KINETO_LOG_LEVEL', '6')

CUDA_METHOD = 'cuda_max_memory_allocated'
CPU_METHOD = 'torch_profiler_memory_events'
TAIL_PHASE = 'tail'
_MARK_PREFIX = 'mmlocal.PeakMemoryMeter.mark#'


def format_bytes(num_bytes):
    """``1234567`` -> ``'1.18 MiB'``."""
    value = float(num_bytes)
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if abs(value) < 1024 or unit == 'GiB':
            return f'{value:.0f} {unit}' if unit == 'B' else \
                f'{value:.2f} {unit}'
        value /= 1024


class PeakMemoryMeter:
    """Peak of the bytes held by live tensors inside a ``with`` block.

    Attributes (valid after the block):

    - ``peak_bytes`` (int): highest amount of tensor memory live at any
      moment inside the block, *above* what was live at entry.
    - ``phases`` (dict[str, int]): ``name -> peak`` (same baseline) for each
      phase closed by :meth:`mark`. A phase runs from the previous mark (or
      the entry) to the mark that names it and its peak includes the level it
      starts at. A name used more than once keeps the largest peak. If at least
      one mark was made, the part between the last mark and the exit is stored
      under ``'tail'``.
    - ``end_bytes`` (int): live bytes at exit above the entry level (memory
      the block left allocated, e.g. optimizer state created in it).
    - ``method`` (str): ``'cuda_max_memory_allocated'`` or
      ``'torch_profiler_memory_events'``.

    **CUDA** (``device='cuda'`` or ``'cuda:N'``): ``torch.cuda`` caching
    allocator statistics. At entry the device is synchronised, the peak
    statistics are reset and ``memory_allocated()`` is taken as the baseline;
    a mark synchronises, reads ``max_memory_allocated()`` and resets the
    peak. Counts every tensor allocation on that device (activations,
    gradients, optimizer state, cuDNN/cuBLAS workspaces that go through the
    caching allocator); not the allocator's cached-but-free blocks, nor the
    CUDA context.

    **CPU** (the reason this class exists): process RSS is not a usable
    measure, because glibc keeps freed blocks and grows/shrinks the heap
    lazily, so RSS depends on allocation history. Instead the block runs
    under ``torch.profiler`` with ``profile_memory=True``. Every allocation
    and free that goes through PyTorch's CPU allocator is then reported as a
    ``[memory]`` event with its pointer and signed size, in program order.
    On exit the events are replayed in time order: an allocation adds its
    size to a running total, a free subtracts the size of the matching
    allocation; the peak of that total is ``peak_bytes``. Marks are
    ``record_function`` events placed in the same timeline, so phase peaks
    come from the same replay. This counts everything a training step
    allocates through ATen on the CPU -- activations and tensors saved for
    backward, temporaries and scratch buffers that kernels allocate as
    tensors, parameter gradients created in backward, optimizer state
    created in ``step()`` -- and every free. It does not depend on timing,
    threads or the malloc implementation, so identical runs give identical
    numbers (checked in ``tests/test_memory_meter.py``).

    Limits of the CPU method:

    - Only memory allocated *inside* the block is followed. Memory that was
      live at entry and is freed inside the block is not credited (the
      profiler does not know its size), so the result is an upper bound of
      the growth above the entry level, exact when nothing allocated before
      entry is freed in the block. In a training step after one warm-up
      iteration this holds: parameters and optimizer state persist, and
      ``zero_grad(set_to_none=True)`` already freed the gradients of the
      previous step.
    - Memory that does not go through ``c10``'s CPU allocator is invisible:
      oneDNN/MKL internal scratchpads, the Python heap, NumPy arrays, memory
      that torch frees to the OS lazily. It is a tensor-level measure, the CPU
      analogue of ``torch.cuda.max_memory_allocated``, not the process
      footprint.
    - Allocations made by threads the profiler does not follow (a
      user-created thread; not ATen's intra-op pool, nor autograd on the CPU,
      which runs on the calling thread) are not seen.
    - It cannot run inside another active profiler (a ``RuntimeError``
      says so). It costs a few per cent of run time (about 2 % on a
      ResNet-50 training step at 2x3x512x512) plus a fraction of a second
      to replay the events on exit.
    - Importing this module sets ``KINETO_LOG_LEVEL=6`` (unless set) to keep
      the profiler from printing a few log lines per run.

    Args:
        device (str | torch.device): ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
    """

    def __init__(self, device='cpu'):
        device = torch.device(device)
        if device.type == 'cuda':
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f'PeakMemoryMeter(device={str(device)!r}): CUDA is not '
                    'available in this process')
            if device.index is None:
                device = torch.device('cuda', torch.cuda.current_device())
            self.method = CUDA_METHOD
        elif device.type == 'cpu':
            self.method = CPU_METHOD
        else:
            raise ValueError(
                f'PeakMemoryMeter: unsupported device {str(device)!r}; '
                "use 'cpu' or 'cuda[:N]'")
        self.device = device
        self.peak_bytes = 0
        self.end_bytes = 0
        self.phases = {}
        self._mark_names = []
        self._active = False
        self._prof = None
        # CUDA bookkeeping
        self._baseline = 0

    # ------------------------------------------------------------------ API
    def __enter__(self):
        if self._active:
            raise RuntimeError('PeakMemoryMeter is not re-entrant')
        self.peak_bytes = 0
        self.end_bytes = 0
        self.phases = {}
        self._mark_names = []
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            if torch.autograd.profiler._is_profiler_enabled:
                raise RuntimeError(
                    'PeakMemoryMeter on the CPU uses torch.profiler and '
                    'cannot run while another profiler is active')
            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                profile_memory=True, record_shapes=False, with_stack=False)
            self._prof.__enter__()
        self._active = True
        return self

    def mark(self, name):
        """Close the current phase under ``name`` and start a new one."""
        if not self._active:
            raise RuntimeError(
                'PeakMemoryMeter.mark() is only valid inside the with block')
        name = str(name)
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - \
                self._baseline
            self._close_phase(name, peak)
            self.peak_bytes = max(self.peak_bytes, peak)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # a zero-length range in the profiler's timeline; the phase peak
            # is computed on exit when the events are replayed
            index = len(self._mark_names)
            self._mark_names.append(name)
            with torch.autograd.profiler.record_function(
                    f'{_MARK_PREFIX}{index}'):
                pass

    def __exit__(self, exc_type, exc, tb):
        self._active = False
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - \
                self._baseline
            if self.phases:
                self._close_phase(TAIL_PHASE, peak)
            self.peak_bytes = max(self.peak_bytes, peak, 0)
            self.end_bytes = torch.cuda.memory_allocated(self.device) - \
                self._baseline
            return False
        prof, self._prof = self._prof, None
        prof.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._replay(prof)
        return False

    def as_dict(self):
        return dict(method=self.method, device=str(self.device),
                    peak_bytes=int(self.peak_bytes),
                    end_bytes=int(self.end_bytes),
                    phases={k: int(v) for k, v in self.phases.items()})

    # ------------------------------------------------------------ internals
    def _close_phase(self, name, peak):
        self.phases[name] = max(int(peak), self.phases.get(name, 0))

    def _replay(self, prof):
        """Turn the profiler's allocation events into peaks."""
        from torch._C._profiler import _EventType
        tree = prof.profiler.kineto_results.experimental_event_tree()
        # (time, order, kind, payload); DFS pre-order breaks timestamp ties
        timeline = []
        stack = list(reversed(tree))
        order = 0
        while stack:
            event = stack.pop()
            order += 1
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                if fields.device.type == 'cpu' and fields.alloc_size != 0:
                    timeline.append((event.start_time_ns, order, 0,
                                     (fields.ptr, fields.alloc_size)))
            elif event.tag == _EventType.TorchOp and \
                    event.name.startswith(_MARK_PREFIX):
                index = int(event.name[len(_MARK_PREFIX):])
                timeline.append((event.start_time_ns, order, 1, index))
            stack.extend(reversed(event.children))
        timeline.sort(key=lambda item: (item[0], item[1]))

        live = {}  # ptr -> size, for blocks allocated inside the block
        current = peak = phase_peak = 0
        for _, _, kind, payload in timeline:
            if kind == 0:
                ptr, size = payload
                if size > 0:
                    # a pointer can only be handed out again after its free
                    current -= live.get(ptr, 0)
                    live[ptr] = size
                    current += size
                    if current > phase_peak:
                        phase_peak = current
                elif ptr in live:
                    current -= live.pop(ptr)
                # else: freed memory that was allocated before entry: the
                # profiler cannot size it reliably, so it is not credited
            else:
                self._close_phase(self._mark_names[payload], phase_peak)
                peak = max(peak, phase_peak)
                phase_peak = current
        peak = max(peak, phase_peak)
        if self._mark_names:
            self._close_phase(TAIL_PHASE, phase_peak)
        self.peak_bytes = int(peak)
        self.end_bytes = int(current)
