"""Worker for tests/test_local_ddp.py.

Run either under torchrun (each rank trains on its half of the batch through
LocalDistributedDataParallel) or as a single process (the whole batch, no
wrapper). Trains three tiny GroupNorm FCN LocalLearners for ITERS iterations
and saves their state dicts to OUT/<tag><suffix>.pt (tag ``rank0``,
``rank1`` or ``single``):

- ``''``: InfoPro aux, SGD with momentum and ``clip_grad``;
- ``'_man'``: MAN aux (``mmlocal.MomentumAux``), its EMA copies driven by
  ``mmlocal.MomentumAuxHook`` exactly as the Runner calls it;
- ``'_amp'``: InfoPro aux, ``AmpOptimWrapper`` (bfloat16 autocast on the
  CPU) with ``clip_grad``;
- ``'_man_cp'``: ``'_man'`` with ``with_cp=True`` (checkpointing inside
  the aux nets);
- ``'_man_cpb'``: ``'_man_cp'`` with ``checkpoint_blocks`` (backbone blocks
  of both modules recomputed in the local backward);
- ``'_skip'``: ``nan_guard='skip'``, SKIP_ITERS iterations; under torchrun
  rank 1's local loss is NaN at iteration 1, so every rank drops it; the
  single process trains on the other iterations only. Also saves
  ``<tag>_skip_count.pt`` (``num_skipped_iters``);
- ``'_skip_cascade'``: ``'_skip'`` with HPFF (PFF 2x2 over the whole
  cascade aux) and ``nan_guard_check='module'`` (one agreed read per module
  and patch); ``'_skip_recon'``: the same with the reference's PFF
  (``patch_parts='recon'``, a patch's reconstruction NaN);
- ``'_raise'`` (torchrun only): ``nan_guard='raise'``, rank 1's local loss
  NaN at iteration 0; every rank saves what it raised
  (``<tag>_raise.pt``: the error's ``module``, -1 for None, and whether it
  blames another process).

The default wrapper overlaps each module's gradient all-reduce with the
later modules (``overlap_grad_reduce=True``); runs for it and the one-block
path:

- ``'_old'``: ``''`` with ``overlap_grad_reduce=False``;
- ``'_cascade3'``: HPFF (``cascade_span=2``), K=3: module 0's gradient is
  final only after module 1's cascade window;
- ``'_attach'``: InfoPro, K=3 (``ATTACH``), ``attach_stages=(2,)``:
  module 1's stage-2 output also reaches the auxiliary FCN head, so module 1
  gets gradient from the model's loss;
- ``'_acc'``: ``''`` with ``accumulative_counts=2`` (one step, at the last
  iteration);
- under torchrun also ``<tag><suffix>_trace.pt`` for ``''`` and ``'_old'``
  (the model's phase marks and every ``dist.all_reduce`` call, per
  iteration) and ``<tag><suffix>_phases.pt`` (the wrapper's learned
  ``grad_reduce_phases``) for the overlapped runs.

``python local_ddp_worker.py fault <die|raise|hang> OUT`` (two processes
started by hand with RANK/WORLD_SIZE/MASTER_*: no torchrun, which would stop
rank 0 itself): rank 1 exits silently, raises a ValueError, or hangs, in
iteration 1 after module 0; rank 0 reports the wrapper's error in
``OUT/fault_rank0.txt``.
``python local_ddp_worker.py forked OUT`` runs both ranks and the single
process at once, forked from one process (as torchrun would set the ranks'
environment; the imports paid once).

``python local_ddp_worker.py fault_all die,raise,hang OUT`` runs each mode
in two processes forked from one (no torchrun either), all modes at once,
each in ``OUT/<mode>/``.
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repo

from mmengine.config import ConfigDict  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from local_utils import gn_fcn_learner_cfg, seg_batch  # noqa: E402
from mmlocal.engine.hooks import MomentumAuxHook  # noqa: E402
from mmlocal.registry import MODELS  # noqa: E402

ITERS = 2
LR = 0.5  # parameters move by ~1e-3: far above the 1e-5 tolerance
MAX_NORM = 0.3  # the averaged gradient norm is ~0.35 at the first step


def build(aux_type=None, learner=None, **aux_options):
    cfg = gn_fcn_learner_cfg()
    cfg.update(learner or {})
    # zero-initialised residual norms would keep every block's convs (and
    # so the MAN source block) at their initial value for the first steps
    cfg['model']['backbone']['zero_init_residual'] = False
    if aux_type is not None:
        cfg['aux']['type'] = aux_type
        cfg['aux']['momentum'] = 0.9  # the EMA moves visibly in 2 steps
    cfg['aux'].update(aux_options)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    return model


def amp_wrapper(params):
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_mod
    amp_mod.is_cuda_available = lambda: True  # mmengine asserts a GPU
    return amp_mod.AmpOptimWrapper(
        optimizer=torch.optim.SGD(params, lr=LR, momentum=0.9),
        dtype='bfloat16', clip_grad=dict(max_norm=MAX_NORM))


class Trace:
    """The model's phase marks and every ``dist.all_reduce`` (dtype,
    elements, async) while active, one list per iteration."""

    def __init__(self, model):
        self.model, self.iters = model, []

    def __enter__(self):
        self.original = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            self.iters[-1].append(('all_reduce', str(tensor.dtype),
                                   tensor.numel(),
                                   bool(kwargs.get('async_op', False))))
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        self.model.phase_callback = lambda name: self.iters[-1].append(
            ('mark', name))
        return self

    def next_iteration(self):
        self.iters.append([])

    def __exit__(self, *exc):
        dist.all_reduce = self.original
        self.model.phase_callback = None


def train(model, rank, world, distributed, amp=False, hook=None, ddp=None,
          accumulative_counts=1, trace=None):
    learner = model
    if distributed:
        from mmlocal.engine.model_wrappers import \
            LocalDistributedDataParallel
        model = LocalDistributedDataParallel(model, **(ddp or {}))
    if amp:
        ow = amp_wrapper(model.parameters())
    else:
        ow = OptimWrapper(
            torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
            clip_grad=dict(max_norm=MAX_NORM),
            accumulative_counts=accumulative_counts)
        ow.initialize_count_status(model, 0, ITERS)
    tracer = Trace(learner) if trace is not None else None
    if tracer is not None:
        tracer.__enter__()
    runner = SimpleNamespace(model=model, optim_wrapper=ow, iter=0)
    if hook is not None:
        hook.before_train(runner)
    for it in range(ITERS):
        batch = seg_batch(n=4, size=32, seed=it, ignore=False)
        if distributed:  # this rank's contiguous half of the same batch
            per = 4 // world
            batch = {k: v[rank * per:(rank + 1) * per]
                     for k, v in batch.items()}
        runner.iter = it
        if hook is not None:
            hook.before_train_iter(runner, it)
        if tracer is not None:
            tracer.next_iteration()
        model.train_step(batch, ow)
        if hook is not None:
            hook.after_train_iter(runner, it)
    if tracer is not None:
        tracer.__exit__()
        trace['iters'] = tracer.iters
        trace['phases'] = model.grad_reduce_phases
    module = model.module if distributed else model
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


SKIP_ITERS, POISONED = 3, 1
# K=3, modules [0, 2) [2, 6) [6, 8): module 1 produces stage 2, which the
# auxiliary FCN head reads
ATTACH = dict(num_modules=None, split_points=[2, 6], attach_stages=(2, ))


def poison(model, rank, when):
    """Rank 1's module-0 local loss is NaN while ``when()`` is true."""
    aux = model.aux_nets[0]
    if getattr(aux, 'patch_parts', None) == 'recon':
        # the reference's PFF: poison the reconstruction of every patch
        patch_loss = aux.recon_patch_loss

        def recon(*args, **kwargs):
            value = patch_loss(*args, **kwargs)
            return value * float('nan') if rank == 1 and when() else value

        aux.recon_patch_loss = recon
        return
    name = 'cascade_loss' if hasattr(aux, 'cascade_loss') else 'loss'
    original = getattr(aux, name)

    def loss(h, inputs, samples):
        losses = dict(original(h, inputs, samples))
        if rank == 1 and when():
            losses = {k: v * float('nan') for k, v in losses.items()}
        return losses

    setattr(aux, name, loss)


def build_cascade(parts='all', **learner):
    """HPFF with PFF 2x2 (``patch_parts=parts``, cascade span 2),
    GroupNorm heads."""
    cfg = gn_fcn_learner_cfg()
    gn = dict(type='GN', num_groups=4, requires_grad=True)
    head = dict(channels=16, norm_cfg=gn, head=dict(dropout_ratio=0.0))
    # 'all': the whole cascade aux per patch (cascade_loss, which poison()
    # makes NaN, runs once per patch: a NaN read per module and patch)
    cfg['aux'].update(type='mmlocal.HPFFAux', patch_grid=2, patch_parts=parts,
                      independent_seg_head=head)
    cfg.update(learner)
    cfg['model']['backbone']['zero_init_residual'] = False
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    return model


def train_guarded(rank, world, distributed, guard, cascade=False):
    from mmlocal.models.local.learner import NonFiniteLossError
    model = build_cascade(cascade, nan_guard=guard,
                          nan_guard_check='module') \
        if cascade else build(learner=dict(nan_guard=guard))
    state = dict(it=0)
    poison(model, rank, lambda: distributed and state['it'] == (
        POISONED if guard == 'skip' else 0))
    learner = model
    if distributed:
        from mmlocal.engine.model_wrappers import \
            LocalDistributedDataParallel
        model = LocalDistributedDataParallel(model)
    ow = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    for it in range(SKIP_ITERS):
        state['it'] = it
        if not distributed and it == POISONED:
            continue  # what the ranks drop
        batch = seg_batch(n=4, size=32, seed=it, ignore=False)
        if distributed:
            per = 4 // world
            batch = {k: v[rank * per:(rank + 1) * per]
                     for k, v in batch.items()}
        try:
            model.train_step(batch, ow)
        except NonFiniteLossError as exc:
            return dict(module=-1 if exc.module is None else exc.module,
                        another=int('another process' in str(exc)))
    return {k: v.detach().clone() for k, v in learner.state_dict().items()
            }, learner.num_skipped_iters


def main(out_dir):
    distributed = 'RANK' in os.environ
    if distributed:
        dist.init_process_group('gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    tag = f'rank{rank}' if distributed else 'single'
    runs = {
        '': dict(model=build()),
        '_man': dict(model=build('mmlocal.MomentumAux'),
                     hook=MomentumAuxHook()),
        '_amp': dict(model=build(), amp=True),
        '_man_cp': dict(model=build('mmlocal.MomentumAux', with_cp=True),
                        hook=MomentumAuxHook()),
        # K=2 over 8 blocks: modules [0, 4) and [4, 8)
        '_man_cpb': dict(
            model=build('mmlocal.MomentumAux', with_cp=True,
                        learner=dict(checkpoint_blocks=[0, 2, 4, 6])),
            hook=MomentumAuxHook()),
    }
    runs.update({
        '_old': dict(model=build(), ddp=dict(overlap_grad_reduce=False)),
        '_cascade3': dict(model=build_cascade(num_modules=3)),
        '_attach': dict(model=build(learner=ATTACH)),
        '_acc': dict(model=build(), accumulative_counts=2),
    })
    for suffix, kwargs in runs.items():
        trace = {} if distributed else None
        state = train(rank=rank, world=world, distributed=distributed,
                      trace=trace, **kwargs)
        torch.save(state, os.path.join(out_dir, f'{tag}{suffix}.pt'))
        if trace is not None:
            torch.save(trace, os.path.join(out_dir,
                                           f'{tag}{suffix}_trace.pt'))
    for suffix, cascade in (('_skip', False), ('_skip_cascade', 'all'),
                            ('_skip_recon', 'recon')):
        state, skipped = train_guarded(rank, world, distributed, 'skip',
                                       cascade)
        torch.save(state, os.path.join(out_dir, f'{tag}{suffix}.pt'))
        torch.save(torch.tensor(skipped),
                   os.path.join(out_dir, f'{tag}{suffix}_count.pt'))
    if distributed:
        raised = train_guarded(rank, world, distributed, 'raise')
        torch.save(raised, os.path.join(out_dir, f'{tag}_raise.pt'))
    if distributed:
        dist.destroy_process_group()


def build_fault():
    return build(learner=dict(nan_guard=None))


def fault(mode, out_dir, learner=None):
    """Rank 1 exits (``die``), raises (``raise``) or hangs (``hang``) in
    iteration 1 right after module 0, while rank 0 waits for the gradient
    all-reduce. ``learner``: :func:`build_fault`'s model, if built
    already."""
    import datetime
    import time
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=5))
    rank = dist.get_rank()
    from mmlocal.engine.model_wrappers import LocalDistributedDataParallel
    if learner is None:
        learner = build_fault()
    model = LocalDistributedDataParallel(learner, monitor_timeout=3)
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=LR))

    def stop(name):
        if rank == 1 and it == 1 and name == 'module0':
            if mode == 'die':
                os._exit(3)
            if mode == 'raise':
                raise ValueError('boom in rank 1')
            time.sleep(120)

    learner.phase_callback = stop
    for it in range(2):
        batch = seg_batch(n=2, size=32, seed=it, ignore=False)
        start = time.monotonic()
        try:
            model.train_step(batch, ow)
        except RuntimeError as exc:
            with open(os.path.join(out_dir, f'fault_rank{rank}.txt'),
                      'w') as f:
                f.write(f'{time.monotonic() - start:.1f}\n{exc}')
            raise


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def fault_all(modes, out_dir, timeout=300):
    """Every fault mode at once, each in its own pair of processes forked
    from this one (imports paid once; the modes' waits overlap): rank ``r``
    of mode ``m`` runs :func:`fault` in a fresh process group (its own
    port) with its output in ``OUT/<m>/rank<r>.log``; rank 0's exit status
    goes to ``OUT/<m>/rank0.rc``. Rank 1 of ``hang`` is killed once its
    rank 0 has stopped (or after ``timeout`` seconds)."""
    import signal
    import time
    import traceback
    # built before the forks: each process gets its own copy, and the two
    # ranks of a pair reach the wrapper's first collective together (a
    # skew over the 5 s timeout on a loaded machine would fail the setup)
    learner = build_fault()
    children = {}
    for mode in modes:
        sub = os.path.join(out_dir, mode)
        os.makedirs(sub, exist_ok=True)
        port = str(_free_port())
        for rank in (0, 1):
            pid = os.fork()
            if pid:
                children[pid] = (mode, rank)
                continue
            code = 1
            try:
                fd = os.open(os.path.join(sub, f'rank{rank}.log'),
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(
                    MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
                    WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank))
                fault(mode, sub, learner)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    deadline = time.monotonic() + timeout
    waiting = {pid for pid, (_, rank) in children.items() if rank == 0}
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                waiting.discard(pid)
                mode = children[pid][0]
                with open(os.path.join(out_dir, mode, 'rank0.rc'),
                          'w') as f:
                    f.write(str(os.waitstatus_to_exitcode(status)))
        time.sleep(0.05)
    for pid in children:  # rank 1 of 'hang' by design, any left over
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def forked(out_dir):
    """:func:`main` as two ranks (``RANK``, ``WORLD_SIZE``, ``MASTER_*``
    set as torchrun sets them) and as the single process, all three forked
    from this one at once (the imports paid once). Exits 1 if any failed."""
    children = {}
    port = str(_free_port())
    for rank in (0, 1, None):
        pid = os.fork()
        if pid:
            children[pid] = rank
            continue
        code = 1
        try:
            for key in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                        'MASTER_PORT'):
                os.environ.pop(key, None)
            if rank is not None:
                os.environ.update(
                    MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
                    WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank),
                    LOCAL_WORLD_SIZE='2')
            main(out_dir)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    failed = []
    for pid, rank in children.items():
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append('single' if rank is None else f'rank {rank}')
    if failed:
        sys.exit(f'failed: {failed}')


if __name__ == '__main__':
    if sys.argv[1] == 'forked':
        forked(sys.argv[2])
    elif sys.argv[1] == 'fault':
        fault(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == 'fault_all':
        fault_all(sys.argv[2].split(','), sys.argv[3])
    else:
        main(sys.argv[1])
