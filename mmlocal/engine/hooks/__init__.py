from .momentum_aux_hook import MomentumAuxHook
from .peak_memory_hook import PeakMemoryHook, process_peak_rss_mb

__all__ = ['MomentumAuxHook', 'PeakMemoryHook', 'process_peak_rss_mb']
