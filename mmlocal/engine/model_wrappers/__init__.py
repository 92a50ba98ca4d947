from .local_ddp import LocalDistributedDataParallel
from .local_pipeline import (LocalPipelineHook, LocalPipelineParallel,
                             PipelinePeerError)

__all__ = [
    'LocalDistributedDataParallel', 'LocalPipelineParallel',
    'LocalPipelineHook', 'PipelinePeerError'
]
