import resource
import sys

import torch
from mmengine.hooks import Hook

from mmlocal.registry import HOOKS


def process_peak_rss_mb():
    """Peak resident set size of this process in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return peak / 1024 if sys.platform != 'darwin' else peak / 2**20


@HOOKS.register_module()
class PeakMemoryHook(Hook):
    """Log the training memory peak next to the losses.

    mmengine's logger reports ``memory`` (``torch.cuda.max_memory_allocated``)
    only on CUDA. This hook logs, at every logging interval,

    - ``peak_mem_mb``: ``torch.cuda.max_memory_allocated()`` of the current
      device on CUDA, the process's peak resident set size on the CPU;
    - and keeps the run's overall peak in ``runner.message_hub`` under
      ``'peak_mem_mb'`` so other tools (the demo, benchmarks) can read it.

    On the CPU the RSS peak includes everything the process allocated
    (dataloader buffers, the Python heap), so compare it only between runs of
    the same config; the benchmarks in ``tools/analysis`` use a tensor-level
    measure instead.

    Args:
        interval (int): Logging interval in iterations. Defaults to 50.
    """

    # before LoggerHook (BELOW_NORMAL), so the value is logged this iteration
    priority = 'NORMAL'

    def __init__(self, interval=50):
        if interval < 1:
            raise ValueError(f'interval={interval} must be >= 1')
        self.interval = interval

    def _peak_mb(self, runner):
        device = getattr(runner.model, 'device', None)
        if torch.cuda.is_available() and (
                device is None or torch.device(device).type == 'cuda'):
            return torch.cuda.max_memory_allocated() / 2**20
        return process_peak_rss_mb()

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        peak = self._peak_mb(runner)
        best = max(peak, runner.message_hub.get_info('peak_mem_mb', 0.0))
        runner.message_hub.update_info('peak_mem_mb', best)
        if self.every_n_train_iters(runner, self.interval) or \
                self.is_last_train_iter(runner):
            runner.message_hub.update_scalar('train/peak_mem_mb', peak)
