"""Pipeline-parallel local learning: ``mmlocal.LocalPipelineParallel``.

API (``model_wrapper_cfg``; started by ``tools/dist_train.sh`` /
``tools/slurm_train.sh`` like any mm run)::

    model_wrapper_cfg = dict(
        type='mmlocal.LocalPipelineParallel',
        stages=None,        # or [[0, 1], [2, 3]]: module indices per stage
        schedule='sync',    # or 'async'
        num_replicas=1,     # data-parallel replicas of every stage
        max_in_flight=2,    # batches a stage may run ahead of the next one
        timeout_s=300,      # a silent or failed process stops every process
        balance='time',     # default grouping: by time or by 'memory'
        module_times=None,  # optional per-module seconds / memory for the
        module_costs=None)  # default grouping (else measured on the first
                            # batch)

``train_step`` / ``val_step`` / ``test_step`` as any mmengine model wrapper;
``.module`` is the :class:`~mmlocal.models.local.LocalLearner`. The Runner
needs :class:`LocalPipelineHook` (``custom_hooks``; ``tools/train.py`` adds
it): it gathers checkpoints to rank 0 and shards the training data by
replica.

Local learning has no backward locking: module ``k``'s update needs only its
detached input and its own auxiliary loss. So the K modules are cut into
``P = world_size // num_replicas`` contiguous *stages*, one per process of a
pipeline group, and only activations travel, forward: stage ``s`` sends the
preprocessed images, the data samples (ground truth, pickled), its detached
output and every backbone stage output recorded so far (what the neck needs)
to stage ``s + 1``. Nothing flows backward. Ground truth is *sent along*
(not re-loaded by every stage with the same sampler and seed), so every
stage trains on exactly the batch of stage 0 whatever the sampler, the
augmentation randomness or the dataloader workers do.

Every process runs ``LocalLearner.train_stage`` for its modules, at the
Runner's iteration ``t`` on batch ``t``; the math is the single-process
step's. The schedules differ in what stages agree on:

- ``'sync'``: the NaN flags of all stages are AND-ed in one all-reduce
  per iteration (``nan_guard`` ``'raise'``/``'skip'`` agree), ``clip_grad``
  uses the norm of all stages' gradients; batch ``t`` has passed through
  every stage before any stage steps on it. Parameters equal single-process
  ``LocalLearner`` on the same batches.
- ``'async'``: no collective across stages: stage ``s`` goes on to batch
  ``t + 1`` as soon as batch ``t`` is sent (at most ``max_in_flight``
  unreceived batches), while stage ``s + 1`` works on batch ``t``; no stage
  waits for another's backward or step. What changes: ``clip_grad`` clips
  each stage's own gradient norm; a NaN skips the iteration on the stage
  that finds it and on the later ones (the skip travels forward; earlier
  stages have already stepped); ``nan_guard='raise'`` stops every process.
  Without clipping and NaNs, parameters still equal the single-process ones
  (each stage's LR schedule follows the Runner's iteration, BN statistics
  are per stage and see the same batches).

Pipeline x data parallel: ``num_replicas = R`` pipelines; rank
``q * P + (P - 1 - s)`` runs stage ``s`` of replica ``q`` (rank 0 is the
*last* stage of replica 0, so every stage's losses and peak memory reach
rank 0's log along with the activations). The R replicas of a stage average
their gradients (bucketed all-reduce over their own group) before the step.

A process holds only its stages' parameters, buffers and optimizer state;
the others are moved to the ``meta`` device at the first training step
(after the Runner's weight init, checkpoint load or resume, which see the
whole model, so resume re-scatters). The optimizer is the Runner's, over
all parameters: the meta ones never get a gradient, so they have no state
and the state dict keeps single-process indices. Validation and test gather
the whole model on every process (a process then holds all parameters, no
gradients or optimizer state) and run it like one process.

Default stages: at the first training step stage 0 of replica 0 measures
every module on its batch (nothing updated: one metered step, then
``time_repeats`` timed ones) and every process takes the grouping that
``balance`` asks for: ``'time'`` (default) the least largest stage time
(the async pipeline runs at its slowest stage's pace), among groupings
within 5 % of it the least largest memory (:func:`balanced_stages_by_time`);
``'memory'`` the least largest ``max(activation peak) + sum(kept bytes)``
of a stage (:func:`balanced_stages_by_peak`).

Faults: a process that raises writes its rank and error to the job's
``torch.distributed`` store; the others poll it while they wait and stop
with an error naming that rank. A process that dies silently is named by
the one waiting for its data after ``timeout_s`` (also the timeout of the
wrapper's process groups).
"""
import datetime
import functools
import itertools
import pickle
import threading
import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.hooks import Hook
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mmlocal.registry import HOOKS, MODEL_WRAPPERS

SCHEDULES = ('sync', 'async')
BALANCES = ('time', 'memory')
# default stages, balance='time': groupings within 5 % of the least largest
# stage time count as equally fast (then memory decides)
TIME_TOLERANCE = 0.05
_instances = itertools.count()


class PipelinePeerError(RuntimeError):
    """Another process of a :class:`LocalPipelineParallel` run failed,
    died or stayed silent for ``timeout_s``.

    Attributes:
        rank (int | None): The global rank named as the failed one.
    """

    def __init__(self, message, rank):
        super().__init__(message)
        self.rank = rank


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_stages(stages, num_modules, num_stages):
    """Validate ``stages`` (or make the default) for ``num_modules`` K and
    ``num_stages`` P.

    Returns:
        list[list[int]]: P contiguous, non-empty lists of module indices
        covering ``0..K-1`` in order.

    Raises:
        ValueError: naming ``stages`` (or ``num_replicas``) and the values.
    """
    if num_stages > num_modules:
        raise ValueError(
            f'{num_stages} pipeline stages (world_size // num_replicas) for '
            f'a LocalLearner with num_modules={num_modules}: at most one '
            'stage per module; lower the number of processes or raise '
            'num_replicas')
    if stages is None:
        return None
    if isinstance(stages, (str, bytes)) or not hasattr(stages, '__iter__'):
        raise ValueError(f'stages={stages!r} must be a list of lists of '
                         'module indices, e.g. [[0, 1], [2, 3]]')
    stages = [list(s) if hasattr(s, '__iter__') and not isinstance(
        s, (str, bytes)) else s for s in stages]
    if any(not isinstance(s, list) or not s or not all(map(_is_int, s))
           for s in stages):
        raise ValueError(f'stages={stages} must be non-empty lists of module '
                         'indices, e.g. [[0, 1], [2, 3]]')
    if len(stages) != num_stages:
        raise ValueError(
            f'stages={stages} has {len(stages)} stages but the pipeline '
            f'group has {num_stages} processes (world_size // num_replicas)')
    flat = [k for s in stages for k in s]
    bad = [k for k in flat if not 0 <= k < num_modules]
    if bad:
        raise ValueError(f'stages={stages}: {bad} are not module indices of '
                         f'the split (num_modules={num_modules})')
    for s in stages:
        if s != list(range(s[0], s[0] + len(s))):
            raise ValueError(f'stages={stages}: stage {s} is not contiguous '
                             '(consecutive module indices)')
    if flat != list(range(num_modules)):
        missing = sorted(set(range(num_modules)) - set(flat))
        raise ValueError(
            f'stages={stages} must cover the modules 0..{num_modules - 1} '
            f'of the split once each, in order (missing: {missing}, '
            f'duplicated: {sorted({k for k in flat if flat.count(k) > 1})})')
    return stages


def balanced_stages(costs, num_stages):
    """Contiguous stages minimising the largest summed cost (then the next
    largest, ...), with :func:`~mmlocal.models.local.balance.
    balanced_split_points` over modules instead of blocks."""
    from mmlocal.models.local.balance import balanced_split_points
    num_modules = len(costs)
    points = balanced_split_points(
        list(costs), {p: 0 for p in range(1, num_modules)}, 0, num_stages)
    bounds = [0] + list(points) + [num_modules]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def module_state_bytes(learner, grad_only=False):
    """Bytes of the parameters and buffers of each module (blocks, the stem
    with module 0, its aux net; the neck and heads with the last);
    ``grad_only``: of its trainable parameters only."""
    owner = _owners(learner, [[k] for k in range(learner.num_modules)])
    costs = [0] * learner.num_modules
    tensors = learner.named_parameters() if grad_only else itertools.chain(
        learner.named_parameters(), learner.named_buffers())
    for name, t in tensors:
        k = owner(name)
        if k is not None and (t.requires_grad or not grad_only):
            costs[k] += t.numel() * t.element_size()
    return costs


def measure_modules(learner, data, time_repeats=2):
    """Memory and time of each module in training steps of ``learner`` on
    ``data``, measured, with nothing changed.

    Runs ``learner.train_step`` once under
    :class:`~mmlocal.utils.memory.PeakMemoryMeter` with a mark after each
    module, then ``time_repeats`` more times with a clock read at each
    mark (SGD with lr 0 and no step, no NaN guard; after every run the
    gradients, buffers such as BN statistics, the RNG state and the guard's
    counters are put back). The metered run is also the timed runs'
    warm-up.

    Returns:
        dict: per module, ``peaks``: the activation peak of its phase (the
        phase peak less the gradients of the earlier modules, which a stage
        does not hold); ``state``: the bytes it keeps for the whole run
        (parameters and buffers, plus gradients and one optimizer slot per
        trainable parameter); ``times``: seconds of its phase (forward,
        local loss and backward; module 0 also the data preprocessor; the
        optimizer step is not run), the least over the timed runs (``None``
        when ``time_repeats=0``): on the CPU the process's CPU time (a busy
        machine inflates it less than wall time), on CUDA wall time;
        ``grads``: bytes of its trainable parameters' gradients.
    """
    from mmengine.optim import OptimWrapper

    from mmlocal.models.local.learner import _IterationState
    from mmlocal.utils.memory import PeakMemoryMeter
    device = next(learner.parameters()).device
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == 'cuda' \
        else None
    guard = (learner.nan_guard, learner._nan_guard_calls,
             learner.num_skipped_iters, learner.last_iter_skipped)
    optim = OptimWrapper(torch.optim.SGD(
        [p for p in learner.parameters() if p.requires_grad], lr=0.0))
    optim.step = lambda **kwargs: None  # measure, never update
    learner.nan_guard = None
    num = learner.num_modules

    def run(callback):
        saved = _IterationState(learner)
        learner.phase_callback = callback
        try:
            learner.train_step(data, optim)
        finally:
            learner.phase_callback = None
            saved.restore()
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def synchronize():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    # CPU: the process's CPU time (all its threads), which other processes
    # on the machine do not inflate as they do wall time; CUDA: wall time
    clock = time.perf_counter if device.type == 'cuda' else time.process_time

    times = None
    try:
        with PeakMemoryMeter(device) as meter:
            run(meter.mark)
        for _ in range(time_repeats):
            stamps = {}

            def stamp(name):
                synchronize()
                stamps[name] = clock()

            synchronize()
            start = clock()
            run(stamp)
            ends = [stamps[f'module{k}'] for k in range(num)]
            phase = [e - s for s, e in zip([start] + ends[:-1], ends)]
            times = phase if times is None else [
                min(a, b) for a, b in zip(times, phase)]
    finally:
        (learner.nan_guard, learner._nan_guard_calls,
         learner.num_skipped_iters, learner.last_iter_skipped) = guard
    grads = module_state_bytes(learner, grad_only=True)
    state = [s + 2 * g for s, g in zip(module_state_bytes(learner), grads)]
    peaks = []
    for k in range(num):
        peak = meter.phases.get(f'module{k}', meter.peak_bytes)
        peaks.append(max(0, int(peak) - sum(grads[:k])))
    return dict(peaks=peaks, state=state, times=times, grads=grads)


def measure_module_costs(learner, data):
    """``(peaks, state)`` of :func:`measure_modules` (memory only)."""
    measured = measure_modules(learner, data, time_repeats=0)
    return measured['peaks'], measured['state']


def balanced_stages_by_peak(peaks, state, num_stages):
    """Contiguous stages minimising the largest stage estimate
    ``max(peaks[k]) + sum(state[k])`` over its modules (modules run one
    after another: their activations do not add up; what they keep does),
    then the next largest, ... (all groupings tried: K is small)."""
    num_modules = len(peaks)
    best = None
    for points in itertools.combinations(range(1, num_modules),
                                         num_stages - 1):
        bounds = [0] + list(points) + [num_modules]
        costs = [max(peaks[a:b]) + sum(state[a:b])
                 for a, b in zip(bounds[:-1], bounds[1:])]
        key = (sorted(costs, reverse=True), points)
        if best is None or key < best[0]:
            best = (key, bounds)
    bounds = best[1]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def balanced_stages_by_time(times, num_stages, memory=None,
                            tolerance=TIME_TOLERANCE):
    """Contiguous stages that balance time first, then memory.

    The throughput of an asynchronous pipeline is set by its slowest stage,
    so the groupings whose largest stage time ``sum(times[k])`` is within
    ``1 + tolerance`` of the least one are the candidates (measured times
    are noisy; a few per cent of throughput is worth less than memory);
    among them the one with the least largest ``memory`` (then the next
    largest, ...), then the least largest time (then the next, ...).

    Args:
        times (Sequence[float]): Seconds of each module's phase.
        num_stages (int): ``P``.
        memory (callable, optional): ``memory(a, b)``: the memory of a stage
            holding modules ``a..b-1`` (e.g. ``max(peaks[a:b]) +
            sum(state[a:b])``); default: time only.
        tolerance (float): Relative slack on the largest stage time.

    Returns:
        list[list[int]]: the module indices of each stage.
    """
    num_modules = len(times)
    options = []
    for points in itertools.combinations(range(1, num_modules),
                                         num_stages - 1):
        bounds = [0] + list(points) + [num_modules]
        ranges = list(zip(bounds[:-1], bounds[1:]))
        stage_times = sorted((sum(times[a:b]) for a, b in ranges),
                             reverse=True)
        mem = sorted((memory(a, b) for a, b in ranges),
                     reverse=True) if memory is not None else []
        options.append((stage_times, mem, points, ranges))
    fastest = min(o[0][0] for o in options)
    limit = fastest * (1 + tolerance) + 1e-12
    best = min((o for o in options if o[0][0] <= limit),
               key=lambda o: (o[1], o[0], o[2]))
    return [list(range(a, b)) for a, b in best[3]]


def choose_stages(num_stages, balance='time', times=None, peaks=None,
                  state=None, costs=None):
    """The default grouping from measured (or given) per-module figures.

    ``balance='time'``: :func:`balanced_stages_by_time` of ``times``, the
    memory of a stage being ``max(peaks) + sum(state)`` of its modules
    (measured) or ``sum(costs)`` (given); ``'memory'``:
    :func:`balanced_stages_by_peak` of ``peaks``/``state`` or
    :func:`balanced_stages` of ``costs``.
    """
    if peaks is not None:
        def memory(a, b):
            return max(peaks[a:b]) + sum(state[a:b])
    elif costs is not None:
        def memory(a, b):
            return sum(costs[a:b])
    else:
        memory = None
    if balance == 'time' and times is not None:
        return balanced_stages_by_time(times, num_stages, memory)
    if peaks is not None:
        return balanced_stages_by_peak(peaks, state, num_stages)
    return balanced_stages(costs, num_stages)


def _owners(learner, stages):
    """``name -> stage index`` for every parameter/buffer name of
    ``learner`` (``None``: kept by every stage, the data preprocessor)."""
    seq = learner._seq
    stage_of_module = {k: s for s, mods in enumerate(stages) for k in mods}
    prefixes = []
    for k, (start, end) in enumerate(learner.module_ranges):
        for b in range(start, end):
            prefixes.append((f'model.backbone.{seq.block_names[b]}.',
                             stage_of_module[k]))
    for k in range(learner.num_modules - 1):
        prefixes.append((f'aux_nets.{k}.', stage_of_module[k]))
    first, last = stage_of_module[0], stage_of_module[learner.num_modules - 1]

    def owner(name):
        if name.startswith(('data_preprocessor.',
                            'model.data_preprocessor.')):
            return None
        for prefix, stage in prefixes:
            if name.startswith(prefix):
                return stage
        if name.startswith('model.backbone.'):
            return first  # the stem
        return last  # neck, heads, losses

    return owner


def _communication_error(exc):
    """Whether ``exc`` comes from torch.distributed (a lost peer, a
    timeout), not from this process's own computation."""
    if isinstance(exc, getattr(dist, 'DistError', ())):
        return True
    text = str(exc)
    return any(s in text for s in ('gloo', 'Connection closed', 'NCCL',
                                   'Timed out', 'timed out'))


def _payload(obj, device):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torch.tensor([buf.numel()], dtype=torch.int64,
                        device=device), buf.to(device)


@MODEL_WRAPPERS.register_module()
class LocalPipelineParallel(nn.Module):
    """Pipeline-parallel (and pipeline x data-parallel) local learning.

    See the module docstring for the design, the schedules and what the
    asynchronous one changes.

    Args:
        module (LocalLearner): The model.
        stages (list[list[int]], optional): Module indices of each stage,
            contiguous and covering ``0..K-1`` in order. Default: at the
            first training step stage 0 of replica 0 measures the modules
            on its batch (:func:`measure_modules`) and every process takes
            :func:`choose_stages` for ``balance``; with ``module_times``
            (``balance='time'``) or ``module_costs`` (``'memory'``) those,
            without measuring.
        schedule (str): ``'sync'`` or ``'async'``.
        num_replicas (int): Data-parallel replicas of every stage;
            ``world_size`` must be a multiple, the pipeline has
            ``world_size // num_replicas`` stages.
        max_in_flight (int): Batches a stage may have sent and the next
            stage not yet received before the sender waits (the bound of
            the activation queue).
        timeout_s (float): Seconds a process waits for another one's data
            (and the timeout of the wrapper's process groups) before it
            stops with an error naming that process.
        module_costs (list[float], optional): Per-module memory (e.g. the
            ``costs`` of ``tools/analysis/plan_split.py --json``) that the
            default grouping balances (``'memory'``) or, with
            ``module_times``, respects (``'time'``); a measurement
            replaces it.
        balance (str): What the default grouping balances: ``'time'``
            (the largest stage time, the async pipeline's throughput; among
            groupings within 5 % of it the least memory) or ``'memory'``
            (the largest stage memory).
        module_times (list[float], optional): Per-module seconds (e.g. the
            ``times`` of ``tools/analysis/benchmark_parallel.py --plan``)
            for ``balance='time'``.
        time_repeats (int): Timed steps of the measurement (the least time
            of each module is kept).
        **kwargs: Accepted and ignored (``device_ids`` from the launcher).
    """

    def __init__(self, module, stages=None, schedule='sync', num_replicas=1,
                 max_in_flight=2, timeout_s=300, module_costs=None,
                 balance='time', module_times=None, time_repeats=2,
                 **kwargs):
        super().__init__()
        if not callable(getattr(module, 'train_stage', None)):
            raise TypeError('LocalPipelineParallel wraps a LocalLearner; got '
                            f'{type(module).__name__}')
        if schedule not in SCHEDULES:
            raise ValueError(f'schedule={schedule!r} must be one of '
                             f'{SCHEDULES}')
        if balance not in BALANCES:
            raise ValueError(f'balance={balance!r} must be one of '
                             f'{BALANCES}')
        if not _is_int(time_repeats) or time_repeats < 1:
            raise ValueError(f'time_repeats={time_repeats!r} must be an int '
                             '>= 1')
        K = module.num_modules
        for name, values in (('module_costs', module_costs),
                             ('module_times', module_times)):
            if values is not None and (
                    len(values) != K or any(
                        isinstance(v, bool) or not isinstance(
                            v, (int, float)) or v < 0 for v in values)):
                raise ValueError(
                    f'{name}={list(values)} must be {K} numbers >= 0, one '
                    f'per module (num_modules={K})')
        if not _is_int(num_replicas) or num_replicas < 1:
            raise ValueError(f'num_replicas={num_replicas!r} must be an int '
                             '>= 1')
        if not _is_int(max_in_flight) or max_in_flight < 1:
            raise ValueError(f'max_in_flight={max_in_flight!r} must be an '
                             'int >= 1')
        if isinstance(timeout_s, bool) or not isinstance(
                timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f'timeout_s={timeout_s!r} must be a positive '
                             'number of seconds')
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                'LocalPipelineParallel needs an initialised process group '
                '(start with tools/dist_train.sh, torchrun or '
                '--launcher pytorch/slurm)')
        self.module = module
        self.schedule = schedule
        self.num_replicas = num_replicas
        self.max_in_flight = max_in_flight
        self.timeout_s = float(timeout_s)
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % num_replicas:
            raise ValueError(f'num_replicas={num_replicas} does not divide '
                             f'the world_size {world}')
        K = module.num_modules
        P = self.num_stages = world // num_replicas
        stages = check_stages(stages, K, P)
        self.balance = balance
        self.time_repeats = time_repeats
        self.measured = None  # what _measure_stages measured
        if stages is None and P in (1, K):
            stages = balanced_stages([1] * K, P)
        elif stages is None and (module_times if balance == 'time'
                                 else module_costs) is not None:
            stages = choose_stages(P, balance, times=module_times,
                                   costs=module_costs)
        self.replica, pos = divmod(rank, P)
        self.stage = P - 1 - pos
        # None: measured at the first training step (_measure_stages)
        self.stages = None
        if stages is not None:
            self._set_stages(stages)
        else:
            self._check_supported(module)

        def rank_of(replica, stage):
            return replica * P + (P - 1 - stage)

        self._rank_of = rank_of
        timeout = datetime.timedelta(seconds=self.timeout_s)
        # every process creates every group, in the same order
        self._group = dist.new_group(list(range(world)), timeout=timeout)
        self._cpu_group = dist.new_group(list(range(world)), timeout=timeout,
                                         backend='gloo')
        for q in range(num_replicas):
            ranks = [rank_of(q, s) for s in range(P)]
            group = dist.new_group(ranks, timeout=timeout)
            if q == self.replica:
                self._pp_group = group
        for s in range(P):
            ranks = [rank_of(q, s) for q in range(num_replicas)]
            group = dist.new_group(ranks, timeout=timeout)
            if s == self.stage:
                self._dp_group = group
        self._prev = rank_of(self.replica, self.stage - 1) \
            if self.stage > 0 else None
        self._next = rank_of(self.replica, self.stage + 1) \
            if self.stage < P - 1 else None
        # sync: NaN flags agreed by every process; async: by the replicas
        module.guard_group = self._group if schedule == 'sync' \
            else self._dp_group
        self._released = False
        self._in_flight = []
        self._iter = 0
        self._store_key = f'mmlocal_pipeline/{next(_instances)}/failed'
        try:
            from torch.distributed.distributed_c10d import _get_default_store
            self._store = _get_default_store()
        except Exception:  # pragma: no cover - no store: timeouts only
            self._store = None
        self.hook_bound = False

    # ------------------------------------------------------------------
    def _set_stages(self, stages):
        self.stages = stages
        self.modules_range = (stages[self.stage][0],
                              stages[self.stage][-1] + 1)
        self._check_supported(self.module)
        self._owner = _owners(self.module, stages)

    def _measure_stages(self, data):
        """Default stages: stage 0 of replica 0 measures each module's
        memory and time on its first batch (:func:`measure_modules`), every
        process groups the modules with :func:`choose_stages`."""
        src = self._rank_of(0, 0)
        measured = [None]
        if dist.get_rank() == src:
            measured = [measure_modules(
                self.module, data, time_repeats=self.time_repeats
                if self.balance == 'time' else 0)]
        dist.broadcast_object_list(measured, src=src, group=self._cpu_group)
        m = measured[0]
        stages = choose_stages(self.num_stages, self.balance, m['times'],
                               m['peaks'], m['state'])
        self._set_stages(stages)
        self.measured = m
        from mmengine.logging import print_log
        mib = [f'{(p + s) / 2**20:.1f}' for p, s in zip(m['peaks'],
                                                        m['state'])]
        times = '' if m['times'] is None else ', time [s] ' + str(
            [round(t, 4) for t in m['times']])
        print_log(
            f'LocalPipelineParallel: stages {stages} (balance='
            f'{self.balance!r}) from the measured modules: activation peak '
            f'+ kept bytes [MiB] {mib}{times}', logger='current')

    def _check_supported(self, learner):
        """Refuse what needs parameters of another stage (stages not yet
        known: what any grouping into several stages would refuse)."""
        if self.stages is None:  # every module on a stage of its own
            stage_of = {k: k for k in range(learner.num_modules)}
        else:
            stage_of = {k: s for s, mods in enumerate(self.stages)
                        for k in mods}
        if learner.cascade_span is not None and self.num_stages > 1:
            raise ValueError(
                f'aux type {type(learner.aux_nets[0]).__name__} is a cascade '
                f'family (cascade_span={learner.cascade_span}): its windows '
                'back-propagate through earlier modules, which another '
                'pipeline stage holds. LocalPipelineParallel refuses it; '
                'use LocalDistributedDataParallel (data parallel)')
        if learner.nan_guard_check == 'module' and self.schedule == 'sync' \
                and self.num_stages > 1:
            raise ValueError(
                "nan_guard_check='module' with schedule='sync': the stages "
                'run different numbers of modules, so per-module agreed '
                "reads cannot pair up; use nan_guard_check='step' (or "
                "schedule='async', where only a stage's replicas agree)")
        if self.stages is not None:
            self._check_attached(learner, stage_of)
        blocks = {id(b): next(k for k, (a, e) in enumerate(
            learner.module_ranges) if a <= i < e)
            for i, b in enumerate(learner._seq.blocks)}
        for k, aux in enumerate(learner.aux_nets):
            source = getattr(aux, '_source', None)
            if not source:
                continue
            src = blocks.get(id(source[0]))
            if src is not None and stage_of[src] != stage_of[k] and \
                    self.num_stages > 1:
                raise ValueError(
                    f'{type(aux).__name__} of module {k} (pipeline stage '
                    f'{stage_of[k]}) keeps an EMA copy of a block of module '
                    f'{src}, which pipeline stage {stage_of[src]} trains; '
                    'LocalPipelineParallel refuses it (its parameters would '
                    'have to travel backward; with several stages some '
                    f'module always meets this; stages={self.stages}). Use '
                    'LocalDistributedDataParallel or a family without an '
                    'EMA copy (InfoPro, DGL, AugLocal)')

    def _check_attached(self, learner, stage_of):
        """Attached stage outputs must be made on the last stage."""
        seq = learner._seq
        last = self.num_stages - 1
        for block, out_stage in seq._output_blocks.items():
            if out_stage not in learner.attach_stages:
                continue
            k = next(k for k, (a, b) in enumerate(learner.module_ranges)
                     if a <= block < b)
            if stage_of[k] != last:
                raise ValueError(
                    f'attach_stages={list(learner.attach_stages)}: backbone '
                    f'stage {out_stage} comes from module {k} on pipeline '
                    f'stage {stage_of[k]}, but the neck\'s gradient cannot '
                    'go back to another stage; put that module on the last '
                    f'stage (stages={self.stages}) or drop it from '
                    'attach_stages')

    @property
    def is_last(self):
        return self.stage == self.num_stages - 1

    def _device(self):
        for t in itertools.chain(self.module.parameters(),
                                 self.module.buffers()):
            if t.device.type != 'meta':
                return t.device
        return torch.device('cpu')

    # ------------------------------------------------------------------
    # holding only this stage
    def _foreign(self):
        """``(module, attribute, name, tensor, is_param)`` of every
        parameter and buffer another stage owns."""
        out = []
        for mod_name, mod in self.module.named_modules():
            prefix = f'{mod_name}.' if mod_name else ''
            for kind, table in (('p', mod._parameters), ('b', mod._buffers)):
                for attr, t in table.items():
                    if t is None:
                        continue
                    owner = self._owner(prefix + attr)
                    if owner is not None and owner != self.stage:
                        out.append((mod, attr, prefix + attr, t, kind == 'p'))
        return out

    def release_foreign(self, optim_wrapper=None):
        """Move the other stages' parameters and buffers to ``meta`` and
        drop their optimizer state (idempotent)."""
        if self._released:
            return
        foreign = self._foreign()
        params = {id(t) for _, _, _, t, is_p in foreign if is_p}
        optimizers = []
        if optim_wrapper is not None:
            optimizers = [getattr(optim_wrapper, 'optimizer', None)]
        for opt in optimizers:
            if opt is None:
                continue
            for p in list(opt.state):
                if id(p) in params:
                    del opt.state[p]
        for mod, attr, _, t, is_param in foreign:
            if t.device.type == 'meta':
                continue
            if is_param:
                t.grad = None
                torch.utils.swap_tensors(t, nn.Parameter(
                    torch.empty_like(t, device='meta'),
                    requires_grad=t.requires_grad))
            else:
                mod._buffers[attr] = torch.empty_like(t, device='meta')
        self._released = True

    def _owned_state(self):
        """This stage's parameters and buffers (CPU copies), by name; only
        replica 0 sends (the replicas are identical)."""
        if self.replica != 0:
            return {}
        state = {}
        for name, t in itertools.chain(
                self.module.named_parameters(remove_duplicate=False),
                self.module.named_buffers(remove_duplicate=False)):
            if self._owner(name) == self.stage:
                state[name] = t.detach().cpu()
        return state

    def _fill(self, state):
        """Put gathered values into the meta parameters/buffers."""
        device = self._device()
        for mod, attr, name, t, is_param in self._foreign():
            if t.device.type != 'meta' or name not in state:
                continue
            value = state[name].to(device)
            if is_param:
                torch.utils.swap_tensors(t, nn.Parameter(
                    value, requires_grad=t.requires_grad))
            else:
                mod._buffers[attr] = value

    def gather_full(self, dst=None):
        """Give process ``dst`` (every process when None) the whole model.

        A collective over every process of the run (checkpoints: ``dst=0``;
        validation/test: all).
        """
        self.wait_in_flight()
        if not self._released:
            return
        mine = self._owned_state()
        rank = dist.get_rank()
        if dst is None:
            merged = {}
            for s in range(self.num_stages):
                obj = [mine if self._rank_of(0, s) == rank else None]
                dist.broadcast_object_list(obj, src=self._rank_of(0, s),
                                           group=self._cpu_group)
                merged.update(obj[0])
        else:
            gathered = [None] * dist.get_world_size() if rank == dst \
                else None
            dist.gather_object(mine, gathered, dst=dst,
                               group=self._cpu_group)
            merged = {}
            for part in gathered or []:
                merged.update(part)
        if dst is None or rank == dst:
            self._fill(merged)
            self._released = False

    def gather_optimizer_state(self, optim_wrapper, dst=0):
        """The optimizer state dict of the whole model on ``dst`` (other
        processes: None); every stage holds the state of its parameters
        under the single-process indices."""
        self.wait_in_flight()
        state = optim_wrapper.state_dict()
        rank = dist.get_rank()
        mine = state.get('state', {}) if self.replica == 0 else {}
        gathered = [None] * dist.get_world_size() if rank == dst else None
        dist.gather_object(mine, gathered, dst=dst, group=self._cpu_group)
        if rank != dst:
            return None
        merged = {}
        for part in gathered:
            merged.update(part)
        state = dict(state)
        state['state'] = dict(sorted(merged.items()))
        return state

    @contextmanager
    def full_checkpoint(self, optim_wrapper=None, dst=0):
        """On ``dst``: the whole model (and ``optim_wrapper.state_dict()``
        for the whole model) while the context is open; every process
        must enter it. Used by :class:`LocalPipelineHook` around
        ``runner.save_checkpoint``."""
        was_released = self._released
        self.gather_full(dst)
        full_optim = None
        if optim_wrapper is not None and hasattr(optim_wrapper,
                                                 'optimizer'):
            full_optim = self.gather_optimizer_state(optim_wrapper, dst)
        if full_optim is not None:
            optim_wrapper.state_dict = lambda: full_optim
        try:
            yield
        finally:
            if full_optim is not None:
                del optim_wrapper.state_dict
            if was_released:
                self._released = False
                self.release_foreign(optim_wrapper)

    # ------------------------------------------------------------------
    # faults
    def _report_failure(self, exc):
        if self._store is None:
            return
        msg = (f'rank {dist.get_rank()} (stage {self.stage}, replica '
               f'{self.replica}) failed with {type(exc).__name__}: '
               f'{str(exc)[:500]}')
        try:
            if not self._store.check([self._store_key]):
                self._store.set(self._store_key, msg)
        except Exception:  # the store's host is gone: timeouts remain
            pass

    def _check_peers(self):
        if self._store is None:
            return
        try:
            failed = self._store.check([self._store_key])
        except Exception:
            failed = False
        if failed:
            msg = self._store.get(self._store_key).decode()
            rank = int(msg.split()[1])
            raise PipelinePeerError(
                f'LocalPipelineParallel: another process failed, stopping '
                f'rank {dist.get_rank()} too: {msg}', rank)

    def _wait(self, works, peer, what):
        """Wait for gloo/NCCL work while polling the store for a peer's
        failure; gloo's P2P work completes only inside ``wait()``, so a
        helper thread waits (bounded by the group's ``timeout_s`` too)."""
        done, error = threading.Event(), []

        def run():
            try:
                for w in works:
                    w.wait()
            except Exception as exc:
                error.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        pause = 1e-4
        while not done.wait(pause):
            self._check_peers()
            if time.monotonic() > deadline:
                raise PipelinePeerError(
                    f'LocalPipelineParallel: rank {dist.get_rank()} (stage '
                    f'{self.stage}) waited timeout_s={self.timeout_s:g} s '
                    f'for {what} rank {peer} (stage {self._stage_of(peer)}'
                    '): that process died, hangs or is far behind', peer)
            pause = min(2 * pause, 5e-3)
        if error:
            self._check_peers()
            raise PipelinePeerError(
                f'LocalPipelineParallel: rank {dist.get_rank()} lost rank '
                f'{peer} (stage {self._stage_of(peer)}) while waiting for '
                f'{what} it: {error[0]}', peer) from error[0]

    def _stage_of(self, rank):
        return self.num_stages - 1 - rank % self.num_stages

    # ------------------------------------------------------------------
    # activations, forward only
    def _send(self, header, tensors):
        device = self._device()
        size, payload = _payload(header, device)
        tensors = [t.detach().contiguous() for t in tensors]
        works = [dist.isend(t, dst=self._next, group=self._pp_group)
                 for t in [size, payload] + tensors]
        self._in_flight.append((works, [size, payload] + tensors))
        while len(self._in_flight) > self.max_in_flight:
            self._wait_oldest()

    def _wait_oldest(self):
        works, _ = self._in_flight[0]
        self._wait(works, self._next, 'the receive of a batch by')
        self._in_flight.pop(0)

    def wait_in_flight(self):
        """Wait until the next stage has received every sent batch."""
        while self._in_flight:
            self._wait_oldest()

    def _recv(self):
        device = self._device()
        size = torch.empty(1, dtype=torch.int64, device=device)
        self._wait([dist.irecv(size, src=self._prev, group=self._pp_group)],
                   self._prev, 'a batch from')
        payload = torch.empty(int(size.item()), dtype=torch.uint8,
                              device=device)
        self._wait([dist.irecv(payload, src=self._prev,
                               group=self._pp_group)], self._prev,
                   'a batch from')
        header = pickle.loads(payload.cpu().numpy().tobytes())
        tensors = [torch.empty(shape, dtype=dtype, device=device)
                   for shape, dtype in header.pop('shapes')]
        if tensors:
            self._wait([dist.irecv(t, src=self._prev, group=self._pp_group)
                        for t in tensors], self._prev, 'a batch from')
        if header['iter'] != self._iter:
            raise RuntimeError(
                f'LocalPipelineParallel: stage {self.stage} at iteration '
                f'{self._iter} received batch {header["iter"]} from stage '
                f'{self.stage - 1}: the stages are out of step (one skipped '
                'or repeated train_step calls)')
        return header, tensors

    def _header(self, inputs=None, samples=None, x=None, outs=None,
                logs=None, skipped=False):
        header = dict(iter=self._iter, skipped=skipped, samples=samples,
                      logs=logs or {}, out_stages=sorted(outs or {}))
        tensors = [] if skipped else [inputs, x] + [
            outs[s] for s in sorted(outs)]
        header['shapes'] = [(tuple(t.shape), t.dtype) for t in tensors]
        return header, tensors

    # ------------------------------------------------------------------
    # gradients: replicas average, sync clips with the global norm
    @torch.no_grad()
    def average_gradients(self):
        """Mean of every owned parameter's ``.grad`` over this stage's
        replicas (a parameter without a gradient on every replica keeps
        ``None``), in buckets of 25 MB."""
        if self.num_replicas == 1:
            return
        params = [p for p in self.module.parameters()
                  if p.requires_grad and p.device.type != 'meta']
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params],
                           dtype=torch.int32, device=params[0].device)
        dist.all_reduce(has, group=self._dp_group)
        grads = []
        for p, any_replica in zip(params, has.tolist()):
            if any_replica:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        bucket, size = [], 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= 25 * 2**20 or i == len(grads) - 1:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=self._dp_group)
                flat.div_(self.num_replicas)
                for g_, v in zip(bucket,
                                 _unflatten_dense_tensors(flat, bucket)):
                    g_.copy_(v)
                bucket, size = [], 0

    def _global_clip(self, params, max_norm, norm_type=2.0,
                     error_if_nonfinite=False, foreach=None):
        """``clip_grad_norm_`` with the norm over every stage's gradient."""
        params = [p for p in params if p.grad is not None]
        norm_type = float(norm_type)
        grads = [p.grad for p in params]
        device = self._device()
        local = torch.nn.utils.get_total_norm(
            grads, norm_type, foreach=foreach).to(device) if grads else \
            torch.zeros((), device=device)
        if norm_type == float('inf'):
            total = local.clone()
            dist.all_reduce(total, op=dist.ReduceOp.MAX,
                            group=self._pp_group)
        else:
            total = local.double() ** norm_type
            dist.all_reduce(total, group=self._pp_group)
            total = (total ** (1.0 / norm_type)).to(local.dtype)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f'The total norm of order {norm_type} for '
                               'gradients is non-finite')
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total,
                                                 foreach=foreach)
        return total

    @contextmanager
    def _stage_step(self, optim_wrapper):
        step = optim_wrapper.step
        clip = getattr(optim_wrapper, 'clip_func', None)
        if self.schedule == 'sync' and self.num_stages > 1 and \
                clip is torch.nn.utils.clip_grad_norm_:
            optim_wrapper.clip_func = self._global_clip

        def averaged_step(**kwargs):
            self.average_gradients()
            return step(**kwargs)

        optim_wrapper.step = averaged_step
        try:
            yield
        finally:
            del optim_wrapper.step
            if clip is not None:
                optim_wrapper.clip_func = clip

    # ------------------------------------------------------------------
    # mmengine model-wrapper API
    def train_step(self, data, optim_wrapper):
        """One iteration of this process's stage (see the module
        docstring); on the last stage the logs of every stage."""
        learner = self.module
        if self._iter == 0 and not self.hook_bound:
            warnings.warn(
                'LocalPipelineParallel runs without mmlocal.LocalPipelineHook'
                ': a Runner then saves incomplete checkpoints and reads one '
                'shard per process. Add custom_hooks=[dict(type='
                '"mmlocal.LocalPipelineHook")] (tools/train.py does)')
        if self.stages is None:
            self._measure_stages(data)
        self.release_foreign(optim_wrapper)
        self._check_peers()
        try:
            return self._train_step(data, optim_wrapper)
        except PipelinePeerError:
            raise
        except Exception as exc:
            learner._pending_checks = []
            if _communication_error(exc):
                # a victim: name the process that reported, if any
                self._check_peers()
                raise PipelinePeerError(
                    f'LocalPipelineParallel: rank {dist.get_rank()} (stage '
                    f'{self.stage}) lost a peer in a collective (it died '
                    f'or stayed silent for timeout_s={self.timeout_s:g} '
                    f's): {exc}', None) from exc
            if not (self.schedule == 'sync' and type(exc).__name__ ==
                    'NonFiniteLossError'):  # sync: every process raises
                self._report_failure(exc)
            raise
        finally:
            self._iter += 1

    def _train_step(self, data, optim_wrapper):
        learner = self.module
        if self.num_stages == 1:  # replicas of the whole model
            with self._stage_step(optim_wrapper):
                return learner.train_step(data, optim_wrapper)
        first, stop = self.modules_range
        logs_in = {}
        if self.stage == 0:
            with optim_wrapper.optim_context(learner):
                data = learner.data_preprocessor(data, True)
            inputs, samples = data['inputs'], data['data_samples']
            x, outs = None, {}
        else:
            header, tensors = self._recv()
            logs_in = header['logs']
            if header['skipped']:
                return self._skip_forward(logs_in)
            inputs, x = tensors[0], tensors[1]
            outs = dict(zip(header['out_stages'], tensors[2:]))
            samples = header['samples']
        sent = []

        def send(x_out, outs_out, local_logs):
            if self.schedule == 'async':
                # agree with the replicas only, before anything leaves
                learner._read_pending_checks()
            logs = dict(logs_in)
            logs.update(self._stage_logs(local_logs))
            header, tensors = self._header(inputs, samples, x_out,
                                           outs_out, logs)
            self._send(header, tensors)
            sent.append(True)

        stage_data = dict(modules=(first, stop), inputs=inputs,
                          data_samples=samples, x=x, outs=outs, send=send)
        with self._stage_step(optim_wrapper):
            log_vars = learner.train_stage(stage_data, optim_wrapper)
        if learner.last_iter_skipped:
            if not self.is_last and not sent:
                self._send(*self._header(logs=logs_in, skipped=True))
            return {}
        if not self.is_last:
            return log_vars
        return self._merge_logs(log_vars, logs_in)

    def _skip_forward(self, logs_in):
        """An earlier stage dropped this batch (``nan_guard='skip'``,
        async): drop it here too and tell the next stage."""
        learner = self.module
        learner.last_iter_skipped = True
        learner.num_skipped_iters += 1
        if not self.is_last:
            self._send(*self._header(logs=logs_in, skipped=True))
        return {}

    def _stage_logs(self, local_logs):
        """``loss_stage{s}`` and ``stage{s}.peak_mem_mb`` plus the stage's
        terms, as Python floats (they travel in the pickled header)."""
        names = [n for n, v in local_logs.items() if torch.is_tensor(v)]
        values = torch.stack([local_logs[n].detach().float().reshape(())
                              for n in names]).tolist() if names else []
        logs = dict(zip(names, values))
        logs[f'loss_stage{self.stage}'] = sum(
            v for n, v in logs.items() if n.startswith('loss_local'))
        logs[f'stage{self.stage}.peak_mem_mb'] = self._peak_mem_mb()
        return logs

    def _peak_mem_mb(self):
        device = self._device()
        if device.type == 'cuda':
            return torch.cuda.max_memory_allocated(device) / 2**20
        from mmlocal.engine.hooks.peak_memory_hook import process_peak_rss_mb
        return process_peak_rss_mb()

    def _merge_logs(self, log_vars, logs_in):
        """The last stage's logs with every earlier stage's; ``loss`` is
        the sum over all stages (what one process logs)."""
        device = log_vars['loss'].device
        own = log_vars['loss'].detach()
        upstream = sum(v for n, v in logs_in.items()
                       if n.startswith('loss_stage'))
        out = {n: torch.tensor(v, device=device) for n, v in logs_in.items()}
        out.update(log_vars)
        out[f'loss_stage{self.stage}'] = own
        out[f'stage{self.stage}.peak_mem_mb'] = torch.tensor(
            self._peak_mem_mb(), device=device)
        out['loss'] = own + upstream
        return out

    def val_step(self, data):
        self.gather_full()
        return self.module.val_step(data)

    def test_step(self, data):
        self.gather_full()
        return self.module.test_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _shard_by_replica(sampler, replica, num_replicas):
    """Make an mmengine sampler yield replica ``replica``'s shard of
    ``num_replicas`` (instead of the global rank's of ``world_size``)."""
    import math
    sampler.rank, sampler.world_size = replica, num_replicas
    if hasattr(sampler, '_indices_of_rank'):  # InfiniteSampler
        sampler.indices = sampler._indices_of_rank()
    elif hasattr(sampler, 'round_up'):  # DefaultSampler
        n = len(sampler.dataset)
        if sampler.round_up:
            sampler.num_samples = math.ceil(n / num_replicas)
            sampler.total_size = sampler.num_samples * num_replicas
        else:
            sampler.num_samples = math.ceil((n - replica) / num_replicas)
            sampler.total_size = n


@HOOKS.register_module()
class LocalPipelineHook(Hook):
    """What :class:`LocalPipelineParallel` needs from the Runner.

    - ``runner.save_checkpoint`` gathers the whole model and optimizer
      state to rank 0 first (every process enters; rank 0 writes the
      ordinary single-process checkpoint);
    - the training sampler shards the data by *replica*: the processes of
      one pipeline see the same shard (stage 0 reads the batches that the
      pipeline trains on; the other stages' batches are not used) and the
      replicas see disjoint ones, so one pass covers the dataset; the
      dataloader workers are seeded by replica too (mmengine seeds them by
      rank), so with one replica the batches and their augmentation are
      those of a one-process run;
    - at the end of training every sent batch has been received.

    ``tools/train.py`` (``setup_launcher``) adds it when the config's
    ``model_wrapper_cfg`` is ``mmlocal.LocalPipelineParallel``.
    """

    priority = 'VERY_HIGH'

    @staticmethod
    def _wrapper(runner):
        model = runner.model
        return model if isinstance(model, LocalPipelineParallel) else None

    def before_run(self, runner):
        wrapper = self._wrapper(runner)
        if wrapper is None:
            return
        wrapper.hook_bound = True
        save = runner.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            # the best-checkpoint save (after validation: the model is
            # whole everywhere) has no optimizer and may run on rank 0 only
            optim = runner.optim_wrapper if kwargs.get(
                'save_optimizer', True) else None
            with wrapper.full_checkpoint(optim):
                return save(*args, **kwargs)

        runner.save_checkpoint = save_checkpoint

    def before_train(self, runner):
        wrapper = self._wrapper(runner)
        if wrapper is None:
            return
        loop = runner.train_loop
        loader = loop.dataloader
        sampler = getattr(loader, 'sampler', None)
        if not hasattr(sampler, 'rank'):
            sampler = getattr(getattr(loader, 'batch_sampler', None),
                              'sampler', None)
        if sampler is None or not hasattr(sampler, 'world_size'):
            runner.logger.warning(
                'LocalPipelineHook: the training sampler has no rank / '
                'world_size; every stage-0 process reads its own shard')
            return
        _shard_by_replica(sampler, wrapper.replica, wrapper.num_replicas)
        init_fn = getattr(loader, 'worker_init_fn', None)
        if isinstance(init_fn, functools.partial) and \
                'rank' in init_fn.keywords:
            # workers seeded as those of process `replica` (mmengine seeds
            # them by rank): the augmentation of one process's run
            loader.worker_init_fn = functools.partial(
                init_fn.func, *init_fn.args,
                **dict(init_fn.keywords, rank=wrapper.replica))
        # forget what the loop's first iterator already drew: mmdet's
        # aspect-ratio buckets, persistent workers (started with the old
        # seeds and indices)
        buckets = getattr(loader.batch_sampler, '_aspect_ratio_buckets',
                          None)
        if isinstance(buckets, list):
            loader.batch_sampler._aspect_ratio_buckets = [[] for _ in buckets]
        if getattr(loader, '_iterator', None) is not None:
            loader._iterator = None
        if hasattr(loop, 'dataloader_iterator'):
            from mmengine.runner.loops import _InfiniteDataloaderIterator
            loop.dataloader_iterator = _InfiniteDataloaderIterator(loader)
        runner.logger.info(
            f'LocalPipelineParallel: stages {wrapper.stages or "measured"} '
            f'(schedule={wrapper.schedule!r}, '
            f'num_replicas={wrapper.num_replicas}); this process: stage '
            f'{wrapper.stage}, replica {wrapper.replica}')

    def after_train(self, runner):
        wrapper = self._wrapper(runner)
        if wrapper is not None:
            wrapper.wait_in_flight()
