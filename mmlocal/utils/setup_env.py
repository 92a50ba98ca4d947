import datetime
import os
import warnings

import torch
from mmengine import DefaultScope


def register_all_modules(init_default_scope=True):
    """Import every mmlocal module that registers something.

    mmlocal's registries import lazily, so this is only needed when you want
    unscoped names to resolve with ``default_scope='mmlocal'`` or want import
    errors to surface at once (a failed import inside a registry location is
    otherwise reported by mmengine as "not in the registry").

    Args:
        init_default_scope (bool): Whether to set ``'mmlocal'`` as the default
            scope when no default scope is set yet. Defaults to True.
    """
    import mmlocal.datasets  # noqa: F401,F403
    import mmlocal.engine  # noqa: F401,F403
    import mmlocal.models  # noqa: F401,F403
    from .checkpoint import enable_trusted_checkpoints
    enable_trusted_checkpoints()

    if init_default_scope:
        never_created = DefaultScope.get_current_instance() is None \
            or not DefaultScope.check_instance_created('mmlocal')
        if never_created:
            DefaultScope.get_instance('mmlocal', scope_name='mmlocal')
            return
        current_scope = DefaultScope.get_current_instance()
        if current_scope.scope_name != 'mmlocal':
            warnings.warn('The current default scope '
                          f'"{current_scope.scope_name}" is not "mmlocal", '
                          '`register_all_modules` will force the current '
                          'default scope to be "mmlocal". If this is not '
                          'expected, please set `init_default_scope=False`.')
            new_instance_name = f'mmlocal-{datetime.datetime.now()}'
            DefaultScope.get_instance(new_instance_name, scope_name='mmlocal')


def setup_launcher(cfg, launcher):
    """Adapt a config to the launcher and the devices actually present.

    mmengine's defaults assume CUDA when a launcher is used: ``init_dist``
    calls ``torch.cuda.set_device`` and the default DDP wrapper passes
    ``device_ids=[LOCAL_RANK]``, both of which fail on a CPU-only machine.
    A ``LocalLearner`` model gets ``mmlocal.LocalDistributedDataParallel``
    unless the config names a wrapper; ``mmlocal.LocalPipelineParallel``
    gets its ``mmlocal.LocalPipelineHook`` in ``custom_hooks``. On a machine
    without CUDA:

    - the ``gloo`` backend is used and the process group is initialised
      before the Runner (the Runner then skips its own ``init_dist``);
    - a DDP wrapper is configured with ``device_ids=None`` unless the config
      names its own ``model_wrapper_cfg`` (whose ``device_ids`` is then set
      to ``None`` too).

    Args:
        cfg (mmengine.Config): The config, modified in place.
        launcher (str): ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
    """
    cfg.launcher = launcher
    if launcher == 'none':
        return cfg
    model_type = str(cfg.get('model', {}).get('type', ''))
    if model_type.endswith('LocalLearner') and \
            cfg.get('model_wrapper_cfg') is None:
        # several backward passes per iteration: mmengine's DDP wrapper
        # would skip LocalLearner.train_step
        cfg.model_wrapper_cfg = dict(
            type='mmlocal.LocalDistributedDataParallel')
    _add_pipeline_hook(cfg)
    if torch.cuda.is_available():
        return cfg
    import torch.distributed as dist
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = dict()
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = dict()
    cfg.env_cfg.dist_cfg.backend = 'gloo'
    dist_cfg = cfg.env_cfg.dist_cfg
    if not dist.is_initialized():
        if launcher == 'slurm':
            _export_slurm_env()
        timeout = datetime.timedelta(
            seconds=int(dist_cfg.get('timeout', 1800)))
        dist.init_process_group(backend='gloo', timeout=timeout)
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            device_ids=None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    else:
        wrapper['device_ids'] = None
    return cfg


def _add_pipeline_hook(cfg):
    """``mmlocal.LocalPipelineParallel`` needs ``mmlocal.LocalPipelineHook``
    (checkpoints gathered to rank 0, data sharded by replica): add it to
    ``custom_hooks`` unless the config has it."""
    wrapper = cfg.get('model_wrapper_cfg', None) or {}
    if not str(wrapper.get('type', '')).endswith('LocalPipelineParallel'):
        return
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(str(h.get('type', '')).endswith('LocalPipelineHook')
               for h in hooks):
        hooks.append(dict(type='mmlocal.LocalPipelineHook'))
    cfg.custom_hooks = hooks


def _export_slurm_env():
    """Translate SLURM variables into torch.distributed's env:// ones."""
    proc_id = int(os.environ['SLURM_PROCID'])
    ntasks = int(os.environ['SLURM_NTASKS'])
    os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        import subprocess
        node_list = os.environ['SLURM_NODELIST']
        addr = subprocess.getoutput(
            f'scontrol show hostname {node_list} | head -n1')
        os.environ['MASTER_ADDR'] = addr
    os.environ['WORLD_SIZE'] = str(ntasks)
    os.environ['LOCAL_RANK'] = str(proc_id % max(1, torch.cuda.device_count()))
    os.environ['RANK'] = str(proc_id)
