from .peak_memory_hook import PeakMemoryHook, process_peak_rss_mb

__all__ = ['PeakMemoryHook', 'process_peak_rss_mb']
