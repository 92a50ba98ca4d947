import functools
import itertools
import re
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmlocal.registry import MODEL_WRAPPERS

# the marks LocalLearner gives its phase_callback after module k's backward
_PHASE = re.compile(r'module(\d+)')


_instances = itertools.count()  # the same sequence on every rank


class PeerFailureError(RuntimeError):
    """A collective of :class:`LocalDistributedDataParallel` failed
    because another process raised, died or hangs.

    Attributes:
        rank (int | None): The rank that reported its own failure through
            the job's ``torch.distributed`` store, if one did.
    """

    def __init__(self, message, rank=None):
        super().__init__(message)
        self.rank = rank


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
    immediate per-module backward is kept), and the gradients are averaged
    over the ranks (mean of the per-rank gradients: the update DDP computes)
    before clipping and the optimizer step. Parameters start equal
    (broadcast from rank 0 here and by the Runner after ``init_weights``).

    ``overlap_grad_reduce=True`` (default): module k's gradients are final
    as soon as its local backward is done (the model signals it through
    ``phase_callback('module{k}')``), so their bucketed all-reduce is
    started then, asynchronously (``dist.all_reduce(async_op=True)``), and
    runs while modules k+1..K-1 compute; the step waits for every handle.
    Which parameters a phase finalises is learned in the first iteration up
    to the first step: a ``register_post_accumulate_grad_hook`` per
    parameter records the last phase in which its ``.grad`` changed, the
    ranks agree on the latest one (one all-reduce and host read, once), and
    a parameter is reduced after that phase. This covers the cascade
    families (HPFF, MLAAN: module k's gradient is final only after its last
    cascade window) and ``attach_stages`` (an attached module also gets
    gradient from the model's loss, so it is reduced at the step) without
    special cases. After that no host read: the parameters reduced are the
    learned ones (a parameter whose gradient is missing on this rank is
    reduced as zeros, as before). Differences from
    ``overlap_grad_reduce=False``: a parameter that got no gradient on any
    rank in the first iteration is never reduced and keeps ``grad=None``;
    one that did but gets none on any rank in a later iteration ends with a
    zero gradient instead of ``None`` (data-dependent unused parameters
    only; SGD momentum and weight decay then touch it). A gradient that
    reaches a parameter after its phase (the model's structure changed)
    raises a ``RuntimeError`` before the step instead of averaging a stale
    value.

    ``overlap_grad_reduce=False``: all gradients are averaged in one block
    just before the optimizer step, after one all-reduce of "has a
    gradient" flags read on the host (a parameter that received no gradient
    on any rank keeps ``grad=None``).

    With gradient accumulation (``accumulative_counts > 1``) the early
    all-reduces start only in an iteration that ends with a step. BatchNorm
    statistics stay per rank unless ``sync_bn`` is set (here, or as the
    config's top-level ``sync_bn`` that the Runner applies before wrapping);
    SyncBatchNorm needs CUDA and is refused on the CPU with a clear error.

    Works with ``OptimWrapper``/``AmpOptimWrapper`` (the averaging ends
    before AMP's unscale and before ``clip_grad``, so every rank clips the
    same averaged gradient), with ``nan_guard`` (a skipped iteration's
    all-reduces are waited for and dropped), with mmengine's ``EMAHook`` and
    with ``mmlocal.MomentumAuxHook`` (both read ``self.module``, whose
    parameters are identical on every rank after each step).

    Faults: a collective of this wrapper that fails (a process exited:
    gloo reports a closed connection at once) or times out (a process
    hangs; after the process group's timeout, ``env_cfg.dist_cfg.timeout``
    in seconds, 1800 by default) is re-raised as a
    :class:`PeerFailureError` (a ``RuntimeError``). A process whose
    ``train_step`` raised left its rank and error in the job's
    ``torch.distributed`` store: the others name it. Otherwise rank 0's
    error names the ranks that do not answer a ``dist.monitored_barrier``
    on a gloo group of its own within ``monitor_timeout`` seconds (a
    hanging process); a process killed without a word is reported as
    exited (the launcher names its rank; torchrun also stops the
    others).

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
        overlap_grad_reduce (bool): Start each module's all-reduce after
            its local backward (see above). Default True.
        monitor_timeout (float): Seconds that the fault report waits for
            the other ranks in ``dist.monitored_barrier``. Default 30.
        **kwargs: Accepted and ignored for config compatibility with DDP
            (``device_ids``, ``find_unused_parameters``, ...).
    """

    def __init__(self, module, bucket_size_mb=25, broadcast_buffers=True,
                 sync_bn=None, overlap_grad_reduce=True, monitor_timeout=30,
                 **kwargs):
        super().__init__()
        if sync_bn is not None:
            if sync_bn not in ('torch', 'mmcv'):
                raise ValueError(f"sync_bn={sync_bn!r} must be 'torch', "
                                 "'mmcv' or None")
            from mmengine.model import convert_sync_batchnorm
            module = convert_sync_batchnorm(module, sync_bn)
        check_sync_bn_device(module)
        if not isinstance(overlap_grad_reduce, bool):
            raise ValueError(f'overlap_grad_reduce={overlap_grad_reduce!r} '
                             'must be True or False')
        if isinstance(monitor_timeout, bool) or not isinstance(
                monitor_timeout, (int, float)) or monitor_timeout <= 0:
            raise ValueError(f'monitor_timeout={monitor_timeout!r} must be '
                             'a positive number of seconds')
        self.module = module
        self.bucket_bytes = int(bucket_size_mb * 2**20)
        self.overlap_grad_reduce = overlap_grad_reduce
        self.monitor_timeout = float(monitor_timeout)
        self.world_size = dist.get_world_size() if _distributed() else 1
        # overlapped reduction state (see _OverlapState)
        self._overlap = None
        self._monitor_group = None
        self._store = None
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
        # the fault report's monitored_barrier (gloo only) runs in a group of
        # its own: the default group's connections are closed after a
        # failure or a timeout. Every rank builds the wrapper, so the group
        # is created collectively here.
        self._monitor_group = dist.new_group(backend='gloo')
        # a process that raises leaves its rank and error here
        self._store_key = f'mmlocal_ddp/{next(_instances)}/failed'
        try:
            from torch.distributed.distributed_c10d import \
                _get_default_store
            self._store = _get_default_store()
        except Exception:  # pragma: no cover - no store: barrier only
            self._store = None
        if overlap_grad_reduce and self.world_size > 1:
            self._overlap = _OverlapState(self)

    # -- gradient averaging ------------------------------------------------
    @torch.no_grad()
    def average_gradients(self):
        """All-reduce (mean) the ``.grad`` of every trainable parameter, in
        one block (``overlap_grad_reduce=False``).

        Parameters without a gradient on this rank are reduced as zeros so
        that every rank makes the same collective calls; a parameter that
        received no gradient on any rank keeps ``grad=None``.
        """
        world = self.world_size
        params = [p for p in self.module.parameters() if p.requires_grad]
        if world == 1 or not params:
            return
        has_grad = torch.tensor([p.grad is not None for p in params],
                                dtype=torch.int32, device=params[0].device)
        with self._fault_report('the has-gradient flags'):
            dist.all_reduce(has_grad)
            any_rank = has_grad.tolist()
        for p, has in zip(params, any_rank):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)
        reduced = [p for p, has in zip(params, any_rank) if has]
        pending = [self._start_bucket(b) for b in self._buckets(reduced)]
        self._finish(pending)

    def _buckets(self, params):
        """``params`` (each with a ``.grad``) in groups of about
        ``bucket_size_mb`` of gradient."""
        bucket, size = [], 0
        for p in params:
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def _start_bucket(self, params):
        """Flatten the gradients of ``params`` into one buffer, make each
        ``.grad`` a view of it and start its all-reduce.

        The gradients then live in the buffer only (the tensors autograd
        made are freed): the copy costs one bucket at a time, not a second
        set of gradients that stays alive until the step while the later
        modules compute (what DDP's ``gradient_as_bucket_view`` avoids
        too). The all-reduce sums in place; :meth:`_finish` divides.
        """
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        for p, view in zip(params, _unflatten_dense_tensors(flat, grads)):
            p.grad = view
        del grads
        with self._fault_report('a gradient all-reduce'):
            work = dist.all_reduce(flat, async_op=True)
        return work, flat

    def _finish(self, pending):
        """Wait for the all-reduces and turn the sums into means (the
        gradients are views of the reduced buffers)."""
        for work, flat in pending:
            with self._fault_report('a gradient all-reduce'):
                work.wait()
            flat.div_(self.world_size)

    @contextmanager
    def _fault_report(self, what):
        """Re-raise a failed collective naming the ranks that do not
        answer (``dist.monitored_barrier``, gloo)."""
        try:
            yield
        except RuntimeError as exc:
            rank = dist.get_rank()
            reported = self._reported_failure()
            if reported is not None:
                raise PeerFailureError(
                    f'LocalDistributedDataParallel, rank {rank}: {what} '
                    f'failed because another process failed: {reported} '
                    f'({type(exc).__name__}: {exc})',
                    int(reported.split()[1])) from exc
            try:
                dist.monitored_barrier(
                    group=self._monitor_group, wait_all_ranks=True,
                    timeout=timedelta(seconds=self.monitor_timeout))
                who = ('every rank answered a monitored barrier afterwards '
                       '(a transient failure, or one of mismatched '
                       'collectives)')
            except RuntimeError as probe:
                probe = str(probe).strip()
                if 'failed to pass monitoredBarrier' in probe:
                    who = f'Not answering: {probe}'
                elif 'closed' in probe or 'reset' in probe:
                    who = ('A process exited (its connections are closed; '
                           'the launcher names its rank, e.g. torchrun\'s '
                           '"Root Cause ... rank: N")')
                else:
                    who = f'Monitored barrier: {probe}'
                if rank != 0:
                    who += ' (rank 0 names the ranks that do not answer)'
            raise PeerFailureError(
                f'LocalDistributedDataParallel, rank {rank}: {what} failed '
                f'({type(exc).__name__}: {exc}). {who}. Another process '
                'probably died, raised or hangs: its own log has the cause '
                '(the wait is bounded by the process group timeout, '
                'env_cfg.dist_cfg.timeout in seconds)') from exc

    def _report_failure(self, exc):
        """Leave this rank's error in the store for the others."""
        if self._store is None:
            return
        try:
            if not self._store.check([self._store_key]):
                self._store.set(
                    self._store_key,
                    f'rank {dist.get_rank()} failed with '
                    f'{type(exc).__name__}: {str(exc)[:500]}')
        except Exception:  # the store's host (rank 0) is gone
            pass

    def _reported_failure(self):
        if self._store is None:
            return None
        try:
            if self._store.check([self._store_key]):
                return self._store.get(self._store_key).decode()
        except Exception:
            pass
        return None

    @contextmanager
    def _average_before_step(self, optim_wrapper):
        step = optim_wrapper.step

        def averaged_step(**kwargs):
            if self._overlap is not None:
                self._overlap.before_step()
            else:
                self.average_gradients()
            return step(**kwargs)

        optim_wrapper.step = averaged_step
        try:
            yield
        finally:
            del optim_wrapper.step

    @property
    def grad_reduce_phases(self):
        """``{parameter name: phase after which its all-reduce starts}``
        (phase j ends with the model's mark ``module{j}``; -1: never
        reduced) once learned (``overlap_grad_reduce=True``, after the first
        step); None otherwise."""
        return None if self._overlap is None else \
            self._overlap.reduce_phases()

    # -- mmengine model-wrapper API ------------------------------------------
    def train_step(self, data, optim_wrapper):
        try:
            if self._overlap is None:
                with self._average_before_step(optim_wrapper):
                    return self.module.train_step(data, optim_wrapper)
            with self._overlap.iteration(optim_wrapper), \
                    self._average_before_step(optim_wrapper):
                return self.module.train_step(data, optim_wrapper)
        except (FloatingPointError, PeerFailureError):
            raise  # the NaN guard stops every rank; a victim
        except Exception as exc:
            self._report_failure(exc)
            raise

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _will_step(optim_wrapper):
    """Whether the coming ``update_params`` steps (mmengine's
    ``should_update`` after its ``backward`` counts this iteration)."""
    acc = getattr(optim_wrapper, '_accumulative_counts', 1)
    if acc == 1:
        return True
    count = getattr(optim_wrapper, '_inner_count', 0) + 1
    return count % acc == 0 or count == getattr(optim_wrapper,
                                                '_max_counts', -1)


class _OverlapState:
    """Per-phase asynchronous gradient all-reduce of
    :class:`LocalDistributedDataParallel` (``overlap_grad_reduce=True``).

    Phase ``j`` of an iteration is what runs after the model's mark
    ``module{j-1}`` (phase 0 before ``module0``); a parameter's gradient is
    reduced after the mark that ends its learned last phase.
    """

    def __init__(self, ddp):
        self.ddp = ddp
        module = ddp.module
        named = [(n, p) for n, p in module.named_parameters()
                 if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.phase = 0
        self.seen = [-1] * len(self.params)  # latest phase with a gradient
        self.final = None  # agreed over the ranks at the first step
        self.by_phase = None  # phase -> parameter indices
        self.late = {}  # index -> phase of a gradient after its final one
        self.pending = []
        self.started = set()
        self.stepping = False
        self.has_phases = hasattr(module, 'phase_callback')
        self.handles = [
            p.register_post_accumulate_grad_hook(
                functools.partial(self._on_grad, i))
            for i, p in enumerate(self.params)
        ]

    # -- hooks -------------------------------------------------------------
    def _on_grad(self, index, _param):
        if self.final is None:
            self.seen[index] = max(self.seen[index], self.phase)
        elif self.phase > self.final[index]:
            self.late.setdefault(index, self.phase)

    def _on_phase(self, name):
        match = _PHASE.fullmatch(str(name))
        if match is None:
            return
        self.phase = int(match.group(1)) + 1
        if self.final is None or not self.stepping:
            return
        for j in range(self.phase):
            self._start_phase(j)

    # -- one iteration -----------------------------------------------------
    @contextmanager
    def iteration(self, optim_wrapper):
        module = self.ddp.module
        self.phase = 0
        self.started = set()
        self.stepping = _will_step(optim_wrapper)
        outer = getattr(module, 'phase_callback', None)
        if self.has_phases:
            def callback(name):
                if outer is not None:
                    outer(name)
                self._on_phase(name)
            module.phase_callback = callback
        try:
            yield
        except FloatingPointError:
            # the NaN guard's NonFiniteLossError: every rank stops together
            self._drop_pending()
            raise
        except BaseException:
            # another error: do not wait on all-reduces that a failing rank
            # may never join
            self.pending = []
            raise
        else:
            self._drop_pending()
        finally:
            if self.has_phases:
                module.phase_callback = outer

    def _drop_pending(self):
        """All-reduces started in an iteration without a step (skipped or
        stopped by the NaN guard, an accumulation step predicted wrongly):
        let them finish (every rank started them). A skipped iteration's
        gradients were put back by the NaN guard (the buffers are no longer
        the ``.grad`` of anything); where they are still the gradients, the
        mean is kept: what the later iterations of the window add to every
        rank's copy of the same mean averages to the same update."""
        self.ddp._finish(self.pending)
        self.pending = []

    @torch.no_grad()
    def _start_phase(self, j):
        if j in self.started:
            return
        self.started.add(j)
        params = []
        for i in self.by_phase.get(j, ()):
            p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            params.append(p)
        for bucket in self.ddp._buckets(params):
            self.pending.append(self.ddp._start_bucket(bucket))

    @torch.no_grad()
    def before_step(self):
        if self.final is None:
            self._agree()
        if self.late:
            late = ', '.join(f'{self.names[i]} (phase {j}, reduced after '
                             f'phase {self.final[i]})'
                             for i, j in sorted(self.late.items())[:5])
            raise RuntimeError(
                f'LocalDistributedDataParallel(overlap_grad_reduce=True): '
                f'{len(self.late)} parameters got a gradient after their '
                f'all-reduce had started, e.g. {late}: the phases were '
                'learned in the first iteration and the model changed '
                'which phase back-propagates into them. Use '
                'overlap_grad_reduce=False for such a model')
        for j in sorted(self.by_phase):
            self._start_phase(j)
        pending, self.pending = self.pending, []
        self.ddp._finish(pending)

    def _agree(self):
        """The latest phase that gives each parameter a gradient, over the
        ranks (one all-reduce and host read, in the first stepping
        iteration only)."""
        device = self.params[0].device
        seen = torch.tensor(self.seen, dtype=torch.int64, device=device)
        with self.ddp._fault_report('the phase agreement'):
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            self.final = seen.tolist()
        self.by_phase = {}
        for i, j in enumerate(self.final):
            if j >= 0:
                self.by_phase.setdefault(j, []).append(i)
        # the phases of this (first) iteration have passed unreduced
        self.started = set()

    def reduce_phases(self):
        """``{parameter name: phase after which it is reduced}`` (-1:
        never), once learned; None before the first step."""
        if self.final is None:
            return None
        return dict(zip(self.names, self.final))
