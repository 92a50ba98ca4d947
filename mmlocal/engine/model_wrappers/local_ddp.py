import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmlocal.registry import MODEL_WRAPPERS


def _distributed():
    return dist.is_available() and dist.is_initialized()


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
    gradients per iteration. BatchNorm statistics stay per rank unless the
    config sets ``sync_bn='torch'``.

    The wrapped model is ``self.module``; checkpoints hold its plain keys.

    Args:
        module (nn.Module): The model (a ``LocalLearner`` or any mmengine
            ``BaseModel``).
        bucket_size_mb (float): All-reduce bucket size. Default 25.
        broadcast_buffers (bool): Broadcast buffers from rank 0 at start.
        **kwargs: Accepted and ignored for config compatibility with DDP
            (``device_ids``, ``find_unused_parameters``, ...).
    """

    def __init__(self, module, bucket_size_mb=25, broadcast_buffers=True,
                 **kwargs):
        super().__init__()
        self.module = module
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        if _distributed() and dist.get_world_size() > 1 and \
                getattr(module, 'nan_guard', None) == 'skip':
            # a rank that drops an iteration would leave the others waiting
            # in the gradient all-reduce
            raise ValueError(
                "nan_guard='skip' is not supported with several processes "
                '(the ranks would disagree on which iterations step); use '
                "nan_guard='raise'")
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
