import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmlocal.registry import MODEL_WRAPPERS


def _distributed():
    return dist.is_available() and dist.is_initialized()


def sync_batchnorm_layers(module):
    """Names of the SyncBatchNorm layers (torch's or mmcv's) in ``module``."""
    types = [nn.SyncBatchNorm]
    try:
        from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
        types.append(MMCVSyncBatchNorm)
    except ImportError:  # pragma: no cover - mmcv without compiled ops
        pass
    return [n for n, m in module.named_modules()
            if isinstance(m, tuple(types))]


def check_sync_bn_device(module):
    """Refuse SyncBatchNorm layers on a device where they cannot run.

    torch's ``SyncBatchNorm`` raises "expected input tensor to be on GPU" in
    its first training forward on a CPU tensor (torch 2.14; mmcv's needs
    CUDA too), so with gloo on the CPU it cannot work. Say so at once, with
    the fix, instead of at the first iteration.
    """
    layers = sync_batchnorm_layers(module)
    param = next(module.parameters(), None)
    if not layers or param is None or param.device.type != 'cpu':
        return
    raise ValueError(
        f'{len(layers)} SyncBatchNorm layers (e.g. {layers[0]!r}; from '
        "sync_bn='torch'/'mmcv' or norm_cfg=dict(type='SyncBN')) cannot run "
        'on the CPU: SyncBatchNorm needs CUDA tensors. Train on GPUs, or use '
        "BN (norm_cfg=dict(type='BN'), no sync_bn) for CPU runs; BatchNorm "
        'statistics are then per rank')


@MODEL_WRAPPERS.register_module()
class LocalDistributedDataParallel(nn.Module):
    """Data-parallel training for models that back-propagate several times
    per iteration (``mmlocal.LocalLearner``).

    Why not mmengine's ``MMDistributedDataParallel``: its ``train_step``
    never calls the model's ``train_step`` (so the per-module backward would
    not run), and torch's DDP expects one forward/backward per iteration
    through ``DDP.forward``; with K immediate backward passes it needs
    ``find_unused_parameters=True`` and still fails on iteration 2 (see
    ECOSYSTEM.md §2).

    What this wrapper does: every rank runs ``module.train_step`` on its own
    batch exactly as in a single process (so the memory saving of the
    immediate per-module backward is kept). Just before the optimizer step,
    the accumulated gradients of all parameters are averaged over the ranks
    with bucketed all-reduces, then clipping and the step run on identical
    gradients, which is the same update DDP computes (mean of per-rank
    gradients). Parameters start equal (broadcast from rank 0 here and by
    the Runner after ``init_weights``). Unlike DDP, communication does not
    overlap with the backward pass; the cost is one all-reduce of the
    gradients per iteration. BatchNorm statistics stay per rank unless
    ``sync_bn`` is set (here, or as the config's top-level ``sync_bn`` that
    the Runner applies before wrapping); SyncBatchNorm needs CUDA and is
    refused on the CPU with a clear error.

    Works with ``OptimWrapper``/``AmpOptimWrapper`` (the averaging runs
    before AMP's unscale and before ``clip_grad``, so every rank clips the
    same averaged gradient), with mmengine's ``EMAHook`` and with
    ``mmlocal.MomentumAuxHook`` (both read ``self.module``, whose parameters
    are identical on every rank after each step).

    The wrapped model is ``self.module``; checkpoints hold its plain keys.

    Args:
        module (nn.Module): The model (a ``LocalLearner`` or any mmengine
            ``BaseModel``).
        bucket_size_mb (float): All-reduce bucket size. Default 25.
        broadcast_buffers (bool): Broadcast buffers from rank 0 at start.
        sync_bn (str, optional): ``'torch'`` or ``'mmcv'``: convert every
            BatchNorm layer of the model (auxiliary nets included) to that
            SyncBatchNorm (mmengine's ``convert_sync_batchnorm``). Needs
            CUDA. Default None (per-rank statistics).
        **kwargs: Accepted and ignored for config compatibility with DDP
            (``device_ids``, ``find_unused_parameters``, ...).
    """

    def __init__(self, module, bucket_size_mb=25, broadcast_buffers=True,
                 sync_bn=None, **kwargs):
        super().__init__()
        if sync_bn is not None:
            if sync_bn not in ('torch', 'mmcv'):
                raise ValueError(f"sync_bn={sync_bn!r} must be 'torch', "
                                 "'mmcv' or None")
            from mmengine.model import convert_sync_batchnorm
            module = convert_sync_batchnorm(module, sync_bn)
        check_sync_bn_device(module)
        self.module = module
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        if not _distributed():
            warnings.warn('LocalDistributedDataParallel without an '
                          'initialised process group: single-process '
                          'training, nothing is averaged')
            return
        with torch.no_grad():
            for p in module.parameters():
                dist.broadcast(p.data, src=0)
            if broadcast_buffers:
                for b in module.buffers():
                    dist.broadcast(b, src=0)

    # -- gradient averaging ------------------------------------------------
    @torch.no_grad()
    def average_gradients(self):
        """All-reduce (mean) the ``.grad`` of every trainable parameter.

        Parameters without a gradient on this rank are reduced as zeros so
        that every rank makes the same collective calls; a parameter that
        received no gradient on any rank keeps ``grad=None``.
        """
        world = dist.get_world_size() if _distributed() else 1
        params = [p for p in self.module.parameters() if p.requires_grad]
        if world == 1 or not params:
            return
        has_grad = torch.tensor([p.grad is not None for p in params],
                                dtype=torch.int32, device=params[0].device)
        dist.all_reduce(has_grad)
        grads = []
        for p, any_rank in zip(params, has_grad.tolist()):
            if not any_rank:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= self.bucket_bytes:
                self._reduce_bucket(bucket, world)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket, world)

    @staticmethod
    def _reduce_bucket(bucket, world):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)

    @contextmanager
    def _average_before_step(self, optim_wrapper):
        step = optim_wrapper.step

        def averaged_step(**kwargs):
            self.average_gradients()
            return step(**kwargs)

        optim_wrapper.step = averaged_step
        try:
            yield
        finally:
            del optim_wrapper.step

    # -- mmengine model-wrapper API ------------------------------------------
    def train_step(self, data, optim_wrapper):
        with self._average_before_step(optim_wrapper):
            return self.module.train_step(data, optim_wrapper)

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
