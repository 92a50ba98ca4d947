from .checkpoint import (enable_trusted_checkpoints,
                         load_trusted_local_checkpoint,
                         trusted_checkpoints_enabled)
from .config_check import check_data_paths
from .setup_env import register_all_modules, setup_launcher

__all__ = [
    'check_data_paths', 'enable_trusted_checkpoints',
    'load_trusted_local_checkpoint', 'trusted_checkpoints_enabled',
    'register_all_modules', 'setup_launcher'
]
