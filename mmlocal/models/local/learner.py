import copy
import functools
import logging
import math
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.logging import MessageHub, print_log
from mmengine.model import BaseModel, ModuleList

from mmlocal.engine.optim_wrappers import (check_local_optim_wrapper,
                                           local_backward)
from mmlocal.registry import MODELS
from .aux.base import LocalModuleInfo, release_recon_inputs
from .heads.anchor_targets import share_anchor_targets
from .split import build_block_sequence, module_output_info, plan_split


def _task_of(model):
    """``'det'`` for mmdet detectors, ``'seg'`` for mmseg segmentors."""
    try:
        from mmdet.models.detectors import BaseDetector
        if isinstance(model, BaseDetector):
            return 'det'
    except ImportError:  # pragma: no cover - mmdet is a requirement
        pass
    try:
        from mmseg.models.segmentors import BaseSegmentor
        if isinstance(model, BaseSegmentor):
            return 'seg'
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f'LocalLearner wraps mmdet detectors and mmseg segmentors; got '
        f'{type(model).__name__}')


def _first(head):
    return head[0] if isinstance(head, (list, tuple, nn.ModuleList)) else head


def _num_classes(model, task):
    if task == 'seg':
        head = _first(model.decode_head)
        return head.num_classes, getattr(head, 'ignore_index', 255)
    for path in ('bbox_head', 'roi_head.bbox_head', 'rpn_head'):
        obj = model
        for name in path.split('.'):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        obj = _first(obj) if obj is not None else None
        if obj is not None and hasattr(obj, 'num_classes'):
            return obj.num_classes, 255
    raise ValueError(f'cannot find num_classes in {type(model).__name__}')


def _cascade_span(aux_nets):
    """The cascade span ``w`` of two-stream families, ``None`` otherwise.

    A family joins the cascade engine by having a ``cascade_span`` attribute
    and a ``backward_streams`` method (see
    :class:`~mmlocal.models.local.aux.cascade.CascadeLocalAux`); every
    module's auxiliary net must agree on ``w``.
    """
    spans = {getattr(aux, 'cascade_span', None) for aux in aux_nets}
    if not aux_nets or spans == {None}:
        return None
    if None in spans or len(spans) > 1:
        raise ValueError(f'cascade_span differs between the auxiliary nets '
                         f'of the modules: {sorted(map(str, spans))}')
    span = spans.pop()
    if not all(callable(getattr(aux, 'backward_streams', None))
               for aux in aux_nets):
        raise TypeError('an auxiliary net with cascade_span must implement '
                        'backward_streams()')
    return span


# ----------------------------------------------------------------------
# NaN guard
NAN_GUARD_MODES = ('raise', 'skip', None)
NAN_GUARD_CHECKS = ('step', 'module')


class NonFiniteLossError(FloatingPointError):
    """A local loss or the model's loss is NaN or infinite.

    Raised by :class:`LocalLearner` (``nan_guard='raise'``) before that loss
    is back-propagated and before any optimizer step of the iteration.

    Attributes:
        module (int | None): Index of the module whose loss is not
            finite; None when only another process's loss is not finite
            (distributed runs stop or skip together).
        terms (list[str]): Names of the non-finite loss terms (``['loss']``
            when only their sum is known).
        iteration (int): The iteration (``runner.iter``, 0-based, from
            mmengine's ``MessageHub``; else the model's own count of
            ``train_step`` calls, 0-based).
    """

    def __init__(self, message, module, terms, iteration):
        super().__init__(message)
        self.module = module
        self.terms = list(terms)
        self.iteration = iteration


def _world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _detached(terms):
    """A log dict without autograd history (kept until the deferred read)."""
    if not isinstance(terms, dict):
        return terms
    return {
        name: value.detach() if torch.is_tensor(value) else value
        for name, value in terms.items()
    }


def _parse_local_losses(losses):
    """``BaseModel.parse_losses`` of an aux net's losses, with the same
    values, logs and gradients, in fewer kernels: a 0-dim term is not
    averaged again (its ``mean()`` is itself) and the sum starts at the
    first term, not at 0."""
    log_vars = []
    for name, value in losses.items():
        if torch.is_tensor(value):
            log_vars.append([name, value if value.dim() == 0 else
                             value.mean()])
        elif isinstance(value, (list, tuple)) and value and all(
                torch.is_tensor(v) for v in value):
            means = [v.mean() for v in value]
            total = means[0]
            for mean in means[1:]:
                total = total + mean
            log_vars.append([name, total])
        else:
            raise TypeError(f'{name} is not a tensor or list of tensors')
    terms = [value for name, value in log_vars if 'loss' in name]
    loss = terms[0] if terms else 0
    for value in terms[1:]:
        loss = loss + value
    log_vars.insert(0, ['loss', loss])
    return loss, OrderedDict(log_vars)


def _all_ranks(flag, group=None):
    """``bool(flag)`` (a 0-dim tensor), AND-ed over the processes of a
    distributed run with one all-reduce, so that every process raises or
    skips the same iteration (no process is left waiting in the gradient
    all-reduce of a step the others dropped). ``group``: the processes to
    agree with (default: all; see ``LocalLearner.guard_group``)."""
    if _world_size() == 1 or (group is not None
                              and dist.get_world_size(group) == 1):
        return bool(flag)
    flag = flag.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag)


def _nonfinite_terms(terms):
    """``'name=value'`` for every non-finite loss term of a log dict."""
    bad = []
    for name, value in (terms or {}).items():
        if name == 'loss' or 'loss' not in name:
            continue
        value = torch.as_tensor(value).detach()
        if not bool(torch.isfinite(value).all()):
            shown = value.float().mean().item() if value.numel() else value
            bad.append(f'{name}={shown}')
    return bad


class _IterationState:
    """What ``nan_guard='skip'`` puts back when it drops an iteration.

    The ``.grad`` of every parameter as it was when the iteration started
    (``None`` after the previous step's ``zero_grad``; the gradients of the
    earlier iterations of an accumulation window otherwise) and every buffer
    (BatchNorm statistics that the forward passes of the dropped iteration
    have already updated).
    """

    def __init__(self, model):
        self.params = list(model.parameters())
        self.grads = [None if p.grad is None else p.grad.detach().clone()
                      for p in self.params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    @torch.no_grad()
    def restore(self):
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        for b, saved in self.buffers:
            b.copy_(saved)


def _nan_guarded(train_step):
    """Wrap ``LocalLearner.train_step`` with the ``nan_guard='skip'``
    behaviour (``'raise'`` and ``None`` just run it)."""

    def run(self, data, optim_wrapper):
        try:
            return train_step(self, data, optim_wrapper)
        except NonFiniteLossError:
            raise
        except Exception as exc:
            # nan_guard_check='step': a NaN of an earlier module may be what
            # made a later part fail (an assigner given NaN costs); read the
            # flags now (the other processes wait in the same read)
            if self.nan_guard is not None and self._pending_checks:
                self._read_pending_checks(cause=exc)
            raise
        finally:
            self._deferred = []  # a failed step's graphs are not kept

    @functools.wraps(train_step)
    def guarded(self, data, optim_wrapper):
        self._nan_guard_calls += 1
        self.last_iter_skipped = False
        if self.nan_guard != 'skip':
            return run(self, data, optim_wrapper)
        state = _IterationState(self)
        try:
            return run(self, data, optim_wrapper)
        except NonFiniteLossError as exc:
            state.restore()
            self.last_iter_skipped = True
            self.num_skipped_iters += 1
            print_log(
                f'{exc}; nan_guard=\'skip\': iteration {exc.iteration} '
                'skipped (gradients and buffers restored, no optimizer '
                f'step; {self.num_skipped_iters} skipped so far)',
                logger='current', level=logging.WARNING)
            return {}

    return guarded


def _check_checkpoint_blocks(blocks, num_blocks):
    """Sorted block indices; ValueError naming ``checkpoint_blocks``."""
    if blocks is None:
        return ()
    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, '__iter__'):
        raise ValueError(f'checkpoint_blocks={blocks!r} must be a list of '
                         'block indices')
    blocks = list(blocks)
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(
        b, int) or not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f'checkpoint_blocks={blocks}: {bad} are not block '
                         f'indices in [0, {num_blocks})')
    if len(set(blocks)) != len(blocks):
        raise ValueError(f'checkpoint_blocks={blocks} has duplicates')
    return tuple(sorted(blocks))


class _ModuleGraph:
    """Module ``j``'s retained graph in the cascade engine.

    ``h = f_j(x)`` with ``x`` a leaf (the detached output of module ``j-1``),
    so a backward pass through it stops at ``x``; ``x.grad`` is what the
    cascade window hands on to module ``j-1``. ``pending`` collects the
    gradients w.r.t. ``h`` that must *not* go further down (the independent
    loss, and the share of every window that starts at ``j``); they are
    back-propagated together, parameters only, when the graph is last used.
    """

    __slots__ = ('x', 'h', 'params', 'pending', 'keep')

    def __init__(self, x, h, params, keep):
        self.x = x
        self.h = h
        self.params = params
        self.pending = None
        self.keep = keep

    def add_pending(self, grad):
        if grad is not None:
            self.pending = grad if self.pending is None else \
                self.pending + grad

    def backward_to_input(self, grad):
        """Returns ``J^T grad`` w.r.t. ``x`` (a pass that computes no
        parameter gradient); the parameters' share joins ``pending``, so
        each parameter gets one gradient from this graph; the graph is
        kept."""
        torch.autograd.backward(self.h, grad, inputs=[self.x],
                                retain_graph=True)
        grad_x, self.x.grad = self.x.grad, None
        self.add_pending(grad)
        return grad_x

    def release(self, deferred):
        """Back-propagate ``pending`` into the parameters only; free. A
        graph the model's loss reaches too (``keep``) appends ``(h,
        pending)`` to ``deferred`` instead: it joins the model's backward
        (:class:`_JoinPending`), one pass through the graph for both."""
        if self.pending is not None and self.params:
            if self.keep:
                deferred.append((self.h, self.pending))
            else:
                torch.autograd.backward(self.h, self.pending,
                                        inputs=self.params)
        self.pending = self.h = self.x = None


class _JoinPending(torch.autograd.Function):
    """``loss`` as it is; its backward also sends each deferred gradient
    ``g`` into its tensor ``h`` (``[(h, g), ...]``, already scaled as the
    loss will be): autograd sums what meets in a graph, so a module graph
    reached by both is traversed once."""

    @staticmethod
    def forward(ctx, loss, deferred, *tensors):
        ctx.grads = [g for _, g in deferred]
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        grads, ctx.grads = ctx.grads, None
        return (grad, None, *grads)


def _join_pending(loss, deferred):
    """``loss`` whose backward also back-propagates ``deferred``."""
    if not deferred:
        return loss
    return _JoinPending.apply(loss, deferred, *(h for h, _ in deferred))


@MODELS.register_module()
class LocalLearner(BaseModel):
    """Supervised local learning for any mmdet detector or mmseg segmentor.

    The backbone of ``model`` is viewed as K gradient-isolated modules
    ``f_0 .. f_{K-1}`` (block granularity). For ``k < K-1``:

    .. math::  h_k = f_k(\\mathrm{sg}(h_{k-1})), \\qquad
               \\theta_{f_k}, \\theta_{g_k} \\leftarrow
               \\nabla \\mathcal{L}_k(g_k(h_k))

    where ``g_k`` is module k's auxiliary net and ``sg`` stops the gradient.
    ``L_k`` is back-propagated **at once**, which frees module k's graph
    before module k+1 runs: that is where the memory saving comes from. The
    last module (the rest of the backbone, the neck and the heads) is trained
    by the model's own losses. One optimizer step per iteration.

    Stage outputs of earlier modules reach the neck detached (MAN++'s COCO
    setting) unless listed in ``attach_stages``; an attached one keeps its
    module's graph until the model's loss has been back-propagated (gradient
    from the neck reaches that module; memory is spent on it).

    Validation, test and inference run the wrapped model unchanged; the
    auxiliary nets are training-only (``tools/model_converters/strip_aux.py``
    writes a checkpoint of the plain model).

    Args:
        model (dict | nn.Module): The stock detector/segmentor (config).
        num_modules (int, optional): K, split evenly by trainable blocks.
        split_points (list[int], optional): Block indices that start a new
            module (instead of ``num_modules``).
        stage_aligned (bool): Split only at stage boundaries.
        aux (dict): Config of the auxiliary family, e.g.
            ``dict(type='mmlocal.InfoProAux')``; each module's copy gets a
            :class:`LocalModuleInfo` as ``module_info``.
        attach_stages (Sequence[int]): Stage indices (backbone
            ``out_indices`` numbering) whose outputs reach the neck attached.
        nan_guard (str | None): What a NaN/inf local loss or model loss
            does. ``'raise'`` (default): a :class:`NonFiniteLossError`
            (a ``FloatingPointError``) naming the module, the non-finite
            terms and the iteration, raised before the optimizer step (see
            ``nan_guard_check`` for when), so no parameter and no optimizer
            state changes. ``'skip'``: the iteration is dropped instead
            (gradients and buffers restored to their state at its start, no
            step, a warning is logged) and training goes on. With several
            processes the flags are AND-ed over them (one all-reduce per
            host read): all raise or all skip. ``None``: no check.
        nan_guard_check (str): When the guard reads the losses' finiteness
            on the host. ``'step'`` (default): each loss's flag stays on the
            device and all are read once, before the model's loss is
            back-propagated and before the optimizer step (one host
            synchronisation per iteration); a non-finite local loss of
            module k has then already been back-propagated into this
            iteration's gradients (``'skip'`` restores them, ``'raise'``
            stops with no parameter or optimizer state changed) and later
            modules have run (their BN statistics moved). ``'module'``:
            each loss is read before it is back-propagated (one
            synchronisation per module, or per PFF patch: a GPU waits for
            its queue each time), so a NaN never reaches a gradient.
        checkpoint_blocks (Sequence[int]): Blocks (``split_points``
            numbering) run under activation checkpointing: each keeps only
            its input for backward and runs its forward again during the
            local backward (:func:`~mmlocal.models.local.split.
            checkpoint_block`; same outputs, gradients and BN statistics).
            Lowers the peak of the module holding them by their activations
            for one more forward of each. A module's last block is
            recomputed as soon as the backward leaves its aux net (or
            head), so checkpointing it lowers only that part of the peak.
            Default: none.
    """

    def __init__(self,
                 model,
                 num_modules=None,
                 split_points=None,
                 stage_aligned=False,
                 aux=dict(type='mmlocal.InfoProAux'),
                 attach_stages=(),
                 nan_guard='raise',
                 nan_guard_check='step',
                 checkpoint_blocks=(),
                 init_cfg=None):
        if isinstance(model, dict):
            model = copy.deepcopy(model)
            # 'mmdet.RetinaNet' -> build (and nested builds) in mmdet's scope,
            # whatever the caller's default scope is
            mtype = model.get('type', '')
            if '_scope_' not in model and isinstance(mtype, str) \
                    and '.' in mtype:
                model['_scope_'] = mtype.split('.')[0]
            inner = MODELS.build(model)
        else:
            inner = model
        if not hasattr(inner, 'backbone'):
            raise TypeError(f'model {type(inner).__name__} has no backbone '
                            'to split')
        super().__init__(
            data_preprocessor=inner.data_preprocessor, init_cfg=init_cfg)
        self.model = inner
        self.task = _task_of(inner)
        if num_modules is None and split_points is None:
            raise ValueError('LocalLearner needs num_modules or split_points')
        self._seq = build_block_sequence(inner.backbone)
        self.module_ranges = plan_split(
            self._seq, num_modules=num_modules, split_points=split_points,
            stage_aligned=stage_aligned)
        self.num_modules = len(self.module_ranges)
        self.checkpoint_blocks = _check_checkpoint_blocks(
            checkpoint_blocks, self._seq.num_blocks)
        self._seq.checkpointed = frozenset(self.checkpoint_blocks)
        stages = set(getattr(inner.backbone, 'out_indices', ()))
        bad = [s for s in attach_stages if s not in stages]
        if bad:
            raise ValueError(f'attach_stages={list(attach_stages)}: {bad} '
                             f'not in the backbone out_indices '
                             f'{sorted(stages)}')
        self.attach_stages = tuple(attach_stages)
        self.phase_callback = None
        if nan_guard not in NAN_GUARD_MODES:
            raise ValueError(f'nan_guard={nan_guard!r} must be one of '
                             f'{NAN_GUARD_MODES}')
        self.nan_guard = nan_guard
        if nan_guard_check not in NAN_GUARD_CHECKS:
            raise ValueError(f'nan_guard_check={nan_guard_check!r} must be '
                             f'one of {NAN_GUARD_CHECKS}')
        self.nan_guard_check = nan_guard_check
        self._pending_checks = []  # (module, device flag, terms): 'step'
        # cascade graphs whose pending gradient joins the model's backward
        self._deferred = []
        self.num_skipped_iters = 0  # by nan_guard='skip'
        self.last_iter_skipped = False  # read by MomentumAuxHook
        self._nan_guard_calls = 0
        # processes whose NaN flags are AND-ed (None: all; set by
        # mmlocal.LocalPipelineParallel to its own groups)
        self.guard_group = None

        num_classes, ignore_index = _num_classes(inner, self.task)
        mean = getattr(self.data_preprocessor, 'mean', None)
        std = getattr(self.data_preprocessor, 'std', None)
        if mean is None or std is None:  # no normalisation: raw 0..255
            mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
        infos = module_output_info(self._seq, self.module_ranges)
        if self.num_modules > 1 and not (isinstance(aux, dict)
                                         and 'type' in aux):
            raise ValueError(f'aux must be a config dict with a type, got '
                             f'{aux!r}')
        aux_nets = []
        for k in range(self.num_modules - 1):
            info = LocalModuleInfo(
                index=k,
                num_modules=self.num_modules,
                in_channels=infos[k]['out_channels'],
                stride=infos[k]['stride'],
                task=self.task,
                num_classes=num_classes,
                next_block=infos[k]['next_block'],
                next_out_channels=infos[k]['next_out_channels'],
                next_stride=infos[k]['next_stride'],
                img_mean=mean,
                img_std=std,
                ignore_index=ignore_index,
                # families that copy later blocks (AugLocal, MLAAN) read the
                # whole block sequence; it owns nothing (no duplicate keys)
                extra=dict(block_sequence=self._seq,
                           module_range=self.module_ranges[k],
                           module_ranges=list(self.module_ranges)))
            cfg = copy.deepcopy(aux)
            cfg['module_info'] = info
            try:
                aux_nets.append(MODELS.build(cfg))
            except KeyError as exc:
                if str(cfg['type']).split('.')[-1] in str(exc):
                    raise ValueError(
                        f'aux.type={aux["type"]!r} is not a registered '
                        'auxiliary family (e.g. mmlocal.InfoProAux, '
                        'mmlocal.DGLAux)') from exc
                raise
        # mmengine's ModuleList: init_weights reaches the aux heads' init_cfg
        self.aux_nets = ModuleList(aux_nets)
        self.cascade_span = _cascade_span(aux_nets)
        # the aux detection heads' anchor targets: one pass per batch
        self._shared_targets = share_anchor_targets(self.aux_nets)

    # ------------------------------------------------------------------
    # inference: exactly the wrapped model
    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.model(inputs, data_samples, mode=mode)

    def val_step(self, data):
        return self.model.val_step(data)

    def test_step(self, data):
        return self.model.test_step(data)

    # ------------------------------------------------------------------
    @contextmanager
    def _backbone_runs_last_module(self, x, start, outs):
        """Make ``model.backbone(...)`` run only blocks ``start..end``.

        The wrapped model's own ``loss`` (any mmdet detector / mmseg
        segmentor) then trains the last module, the neck and the heads with
        nothing re-implemented.
        """
        backbone = self.model.backbone
        seq = self._seq

        def forward(_ignored_inputs):
            seq.forward_blocks(x, start, seq.num_blocks, outs)
            return seq.collect(outs)

        backbone.forward = forward
        try:
            yield
        finally:
            del backbone.forward

    @_nan_guarded
    def train_step(self, data, optim_wrapper):
        """One iteration: K-1 local backward passes, then the model's loss.

        Returns:
            dict[str, Tensor]: ``loss`` (sum of all terms), the model's loss
            terms, ``loss_local{k}`` per module and ``local{k}.<term>``.
        """
        check_local_optim_wrapper(optim_wrapper)
        self._pending_checks = []
        with optim_wrapper.optim_context(self):
            data = self.data_preprocessor(data, True)
        inputs, data_samples = data['inputs'], data['data_samples']
        if self.num_modules == 1:
            with optim_wrapper.optim_context(self):
                losses = self.model.loss(inputs, data_samples)
            loss, log_vars = self.parse_losses(losses)
            self._check_finite(0, loss, log_vars)
            optim_wrapper.update_params(loss)
            self._mark('module0')
            return log_vars

        outs = {}
        local_logs = OrderedDict()
        train_modules = (self._train_local_modules if self.cascade_span is None
                         else self._train_cascade_modules)
        self._shared_targets.begin(data_samples)
        try:
            x, local_total = train_modules(inputs, data_samples,
                                           optim_wrapper, outs, local_logs)
        finally:
            self._shared_targets.release()
            release_recon_inputs(inputs)

        start = self.module_ranges[-1][0]
        with optim_wrapper.optim_context(self):
            with self._backbone_runs_last_module(x, start, outs):
                losses = self.model.loss(inputs, data_samples)
        loss, log_vars = self.parse_losses(losses)
        self._check_finite(self.num_modules - 1, loss, log_vars)
        deferred, self._deferred = self._deferred, []
        optim_wrapper.update_params(_join_pending(loss, deferred))
        del deferred
        self._mark(f'module{self.num_modules - 1}')

        log_vars['loss'] = log_vars['loss'] + local_total
        log_vars.update(local_logs)
        return log_vars

    def _train_local_modules(self, inputs, data_samples, optim_wrapper,
                             outs, local_logs, modules=None, x=None):
        """Modules ``0..K-2`` (or ``modules``, a range of them, from
        ``x``, the detached output of the module before), each trained by
        its own aux loss alone (DGL, InfoPro, MAN, AugLocal).

        Returns:
            tuple: ``(x, total)``: the detached input of the last module and
            the sum of the local losses (for logging).
        """
        seq = self._seq
        local_total = 0.
        x = inputs if x is None else x
        if modules is None:
            modules = range(self.num_modules - 1)
        for k in modules:
            start, end = self.module_ranges[k]
            produced = set()
            with optim_wrapper.optim_context(self):
                h = seq.forward_stem(x, outs) if k == 0 else x
                before = set(outs)
                h = seq.forward_blocks(h, start, end, outs)
                produced = set(outs) - before
                local_losses = self.aux_nets[k].loss(h, inputs, data_samples)
            loss_k, logs_k = _parse_local_losses(local_losses)
            self._check_finite(k, loss_k, logs_k)
            keep = any(s in self.attach_stages for s in produced)
            local_backward(optim_wrapper, loss_k, retain_graph=keep)
            for s in produced:
                if s not in self.attach_stages:
                    outs[s] = outs[s].detach()
            x = h.detach()
            del h, local_losses
            local_logs[f'loss_local{k}'] = loss_k.detach()
            for name, value in logs_k.items():
                if name != 'loss':
                    local_logs[f'local{k}.{name}'] = value
            local_total = loss_k.detach() if k == modules[0] else \
                local_total + loss_k.detach()
            self._mark(f'module{k}')
        return x, local_total

    # ------------------------------------------------------------------
    # one pipeline stage (mmlocal.LocalPipelineParallel)
    @_nan_guarded
    def train_stage(self, data, optim_wrapper):
        """Train a contiguous range of modules only: one pipeline stage.

        What :meth:`train_step` does for all modules, for
        ``data['modules'] = (first, stop)``: the same forward passes, local
        backward passes, NaN checks (AND-ed over ``guard_group``), model
        loss (when ``stop == K``) and one optimizer step of the parameters
        that received gradients. Used by
        :class:`~mmlocal.engine.model_wrappers.LocalPipelineParallel`.

        Args:
            data (dict): ``inputs`` (preprocessed) and ``data_samples``;
                for ``first > 0`` also ``x`` (the detached output of module
                ``first - 1``) and ``outs`` (the backbone stage outputs
                recorded so far, detached); for ``stop < K`` a callable
                ``send(x, outs, logs)`` that hands the stage's output on. It
                is called before the NaN flags are read and before the
                step.
            optim_wrapper (OptimWrapper): As for :meth:`train_step`.

        Returns:
            dict: The stage's log variables (``{}`` when ``nan_guard='skip'``
            dropped the iteration).
        """
        check_local_optim_wrapper(optim_wrapper)
        if self.cascade_span is not None:
            raise ValueError('train_stage does not run cascade families '
                             f'(cascade_span={self.cascade_span})')
        self._pending_checks = []
        first, stop = data['modules']
        inputs, data_samples = data['inputs'], data['data_samples']
        outs = dict(data.get('outs') or {})
        x = data.get('x') if first > 0 else inputs
        local_logs = OrderedDict()
        last = self.num_modules - 1
        # one anchor-target pass for the aux heads of this stage's modules
        # (as train_step; the other stages' heads are not computed here)
        group, heads = self._shared_targets, self._shared_targets.heads
        mine = {id(m) for k in range(first, min(stop, last))
                for m in self.aux_nets[k].modules()}
        group.heads = [h for h in heads if id(h) in mine]
        group.begin(data_samples)
        try:
            x, local_total = self._train_local_modules(
                inputs, data_samples, optim_wrapper, outs, local_logs,
                modules=range(first, min(stop, last)), x=x)
        finally:
            group.release()
            group.heads = heads
        if stop <= last:
            data['send'](x, outs, local_logs)
            self._read_pending_checks()
            # count the iteration and step (the zero loss adds no gradient)
            optim_wrapper.update_params(
                torch.zeros((), device=inputs.device, requires_grad=True))
            local_logs['loss'] = torch.as_tensor(local_total).detach()
            return local_logs
        start = self.module_ranges[last][0]
        with optim_wrapper.optim_context(self):
            with self._backbone_runs_last_module(x, start, outs):
                losses = self.model.loss(inputs, data_samples)
        loss, log_vars = self.parse_losses(losses)
        self._check_finite(last, loss, log_vars)
        optim_wrapper.update_params(loss)
        self._mark(f'module{last}')
        log_vars['loss'] = log_vars['loss'] + local_total
        log_vars.update(local_logs)
        return log_vars

    # ------------------------------------------------------------------
    # cascade windows (HPFF, MLAAN)
    def _module_params(self, k):
        """Trainable parameters of module ``k`` (its blocks; module 0 also
        the stem, i.e. every backbone parameter outside the blocks)."""
        # found once (a walk over the modules per step and module is host
        # work a GPU step waits for); parameter objects stay the same in
        # training, as the optimizer assumes. requires_grad is read each time
        found = self.__dict__.setdefault('_module_params_found', {})
        params = found.get(k)
        if params is None:
            start, end = self.module_ranges[k]
            params = [p for block in self._seq.blocks[start:end]
                      for p in block.parameters()]
            if k == 0:
                in_blocks = {id(p) for block in self._seq.blocks
                             for p in block.parameters()}
                params = [p for p in self.model.backbone.parameters()
                          if id(p) not in in_blocks] + params
            found[k] = params
        return [p for p in params if p.requires_grad]

    def _train_cascade_modules(self, inputs, data_samples, optim_wrapper,
                               outs, local_logs):
        """Modules ``0..K-2`` of a two-stream family with cascade span ``w``.

        Module ``k`` has an independent loss ``L_ind^k`` on its own output
        and a cascade loss ``L_cas^k`` on the output of the window
        ``W_k = {s..k}``, ``s = max(0, k - w + 1)``, run from the detached
        input of module ``s``. The gradient is that of

        .. math::  \\sum_k w_x L_{ind}^k(f_k(sg(h_{k-1})))
                   + w_y L_{cas}^k(f_k \\circ .. \\circ f_s(sg(h_{s-1})))

        Within one iteration both streams carry the same activations
        (parameters change only at the optimizer step), so every module is
        run **once**, on a detached leaf input, and its graph ``G_j`` is kept
        while a window still needs it (``w`` graphs at a time):

        1. the aux net turns ``h_k`` into its losses on two detached leaves
           (one per stream) and back-propagates them at once (with
           ``local_backward``'s scaling; PFF does it patch by patch), which
           leaves ``g_ind`` and ``g_cas`` = dL/dh_k on the leaves and frees
           the aux graph;
        2. ``g_cas`` goes down the window: through ``G_k, .., G_{s+1}``
           (parameters and input: ``x_j.grad`` is the gradient at
           ``h_{j-1}``), and is added to ``G_s``'s *pending* gradient, which
           never reaches below ``s``; ``g_ind`` is pending on ``G_k``;
        3. a graph's pending gradient is back-propagated (parameters only)
           when its last window has passed, and the graph is freed.

        Gradients equal one backward of the sum above (tested), with
        ``1 + (w - 1)`` backward passes per module instead of the
        reference's ``w + 1`` forward and backward passes.

        Returns:
            tuple: ``(x, total)``: the detached input of the last module and
            the sum of the local losses (for logging).
        """
        seq = self._seq
        span = self.cascade_span
        last_aux = self.num_modules - 2
        graphs = {}
        total = 0.

        current = {}  # module k's output, for the NaN guard's message

        def backward(loss):
            # 'module': terms are re-evaluated only to name them in the
            # error; 'step': named from the logs below if the check fails
            self._check_finite(k, loss, lambda: self.aux_nets[k].loss(
                current['h'], inputs, data_samples))
            local_backward(optim_wrapper, loss)

        def forward_context():
            return optim_wrapper.optim_context(self)

        x = inputs
        for k, (start, end) in enumerate(self.module_ranges[:-1]):
            if k > 0:
                # a leaf: a window that continues below k reads x.grad
                x = x.detach().requires_grad_(span > 1)
            with forward_context():
                h = seq.forward_stem(x, outs) if k == 0 else x
                before = set(outs)
                h = seq.forward_blocks(h, start, end, outs)
                produced = set(outs) - before
            keep = any(s in self.attach_stages for s in produced)
            graphs[k] = _ModuleGraph(x, h, self._module_params(k), keep)
            h_ind = h.detach().requires_grad_()
            h_cas = h.detach().requires_grad_()
            current['h'] = h.detach()
            logs = self.aux_nets[k].backward_streams(
                h_ind, h_cas, inputs, data_samples, backward=backward,
                forward_context=forward_context)
            self._name_pending_terms(k, logs)
            graphs[k].add_pending(h_ind.grad)
            grad, first = h_cas.grad, max(0, k - span + 1)
            for j in range(k, first, -1):
                if grad is None:
                    break
                grad = graphs[j].backward_to_input(grad)
            graphs[first].add_pending(grad)
            del h_ind, h_cas, grad
            for j in sorted(graphs):
                # G_j is last used by window j + w - 1 (or the last aux)
                if j + span - 1 <= k or k == last_aux:
                    graphs.pop(j).release(self._deferred)
            for s in produced:
                if s not in self.attach_stages:
                    outs[s] = outs[s].detach()
            x = h.detach()
            del h
            # the aux net's own total if it gives one, else the sum from the
            # first term (no 0 +: the same value)
            loss_k = getattr(logs, 'total', None)
            if loss_k is None:
                loss_k = functools.reduce(torch.add, logs.values()) \
                    if logs else torch.zeros(())
            local_logs[f'loss_local{k}'] = loss_k
            for name, value in logs.items():
                local_logs[f'local{k}.{name}'] = value
            total = loss_k if k == 0 else total + loss_k
            self._mark(f'module{k}')
        return x, total

    # ------------------------------------------------------------------
    # NaN guard
    def _check_finite(self, k, loss, terms=None):
        """Raise :class:`NonFiniteLossError` if ``loss`` of module ``k`` is
        NaN/inf (unless ``nan_guard`` is None).

        Called before ``loss`` is back-propagated. ``terms`` is the log dict
        of ``parse_losses`` or a callable returning the loss dict (called
        only on failure, without gradient, to name the terms).

        With ``nan_guard_check='step'`` the flag of a local loss is kept on
        the device (no host read) and every flag of the iteration is read
        when the model's own loss (the last module) is checked.
        """
        if self.nan_guard is None:
            return
        if torch.is_tensor(loss) and self.nan_guard_check == 'step' and \
                loss.dim() == 0:
            # its flag is computed with the others' at the read (one
            # isfinite of them all: fewer kernels)
            finite = None
            loss = loss.detach()
        elif torch.is_tensor(loss):
            loss = loss.detach()
            finite = torch.isfinite(loss).all()
        else:  # a Python number (no loss terms)
            finite = torch.tensor(
                math.isfinite(loss),
                device=next(self.parameters()).device)
        if self.nan_guard_check == 'step':
            self._pending_checks.append(
                [k, finite, None if callable(terms) else _detached(terms),
                 loss])
            if k == self.num_modules - 1:
                self._read_pending_checks()
            return
        if _all_ranks(finite, self.guard_group):
            return
        if bool(finite):
            self._raise_for_another_process()
        if callable(terms):
            # re-running an aux loss on one process only could meet the
            # collectives of SyncBN layers on the others: not when several
            terms = None if _world_size() > 1 else self._named_terms(terms)
        self._raise_nonfinite(k, loss, terms)

    def _read_pending_checks(self, cause=None):
        """Read the deferred flags once (AND-ed over the processes) and
        raise for the first non-finite loss; ``cause`` is the exception a
        later module raised (e.g. an assigner given NaN costs), if any."""
        pending, self._pending_checks = self._pending_checks, []
        if not pending:
            return
        device = next(p[1] if p[1] is not None else p[3]
                      for p in reversed(pending)).device
        # deferred scalar losses: one isfinite of them all
        deferred = [p for p in pending if p[1] is None]
        if deferred:
            # x * 0 == 0 exactly where x is finite (inf * 0, NaN * 0 are
            # NaN): two kernels; torch.isfinite is four on every device
            flags = torch.stack([p[3].to(device) for p in deferred]).mul(
                0).eq(0)
            for p, flag in zip(deferred, flags.unbind()):
                p[1] = flag
        if len(deferred) == len(pending):
            finite = flags.all()
        else:
            finite = torch.stack([p[1].to(device) for p in pending]).all()
        if _all_ranks(finite, self.guard_group):
            return
        bad = [p for p in pending if not bool(p[1])]
        if not bad:
            self._raise_for_another_process(cause)
        k, _, terms, loss = bad[0]
        self._raise_nonfinite(k, loss, terms, cause)

    def _named_terms(self, make_losses):
        try:  # naming the terms is best effort
            with torch.no_grad():
                return self.parse_losses(make_losses())[1]
        except Exception:
            return None

    def _raise_nonfinite(self, k, loss, terms, cause=None):
        if terms is not None and not all(
                torch.is_tensor(v) for v in terms.values()):
            try:  # per-level lists (cascade logs): as parse_losses sums
                terms = self.parse_losses(terms)[1]
            except Exception:
                terms = None
        bad = _nonfinite_terms(terms) or [
            f'loss={torch.as_tensor(loss).detach().float().mean().item()}']
        iteration = self._guard_iteration()
        start, end = self.module_ranges[k]
        what = "the model's own loss" if k == self.num_modules - 1 else \
            'the local loss'
        when = ('Stopped before back-propagating it and before the '
                'optimizer step' if k == self.num_modules - 1
                or self.nan_guard_check == 'module' else
                'Stopped before the optimizer step (this iteration\'s '
                'gradients hold its backward)')
        if cause is not None:
            when = (f'A later part of the step then failed '
                    f'({type(cause).__name__}: {cause}). ' + when)
        raise NonFiniteLossError(
            f'non-finite loss: {what} of module {k} (blocks {start}-'
            f'{end - 1}) at iteration {iteration}: '
            f'{", ".join(bad)}. {when} (nan_guard={self.nan_guard!r}, '
            f'nan_guard_check={self.nan_guard_check!r})', k,
            [b.split('=')[0] for b in bad], iteration) from cause

    def _guard_iteration(self):
        """``runner.iter`` from mmengine's MessageHub, else the model's own
        0-based count of ``train_step`` calls."""
        hub_iter = MessageHub.get_current_instance().get_info('iter')
        return hub_iter if isinstance(hub_iter, int) else \
            self._nan_guard_calls - 1

    def _raise_for_another_process(self, cause=None):
        if cause is not None:  # this process failed on its own
            raise cause
        iteration = self._guard_iteration()
        raise NonFiniteLossError(
            f'non-finite loss in another process at iteration {iteration} '
            '(the losses of this one are finite). Stopped before the '
            f'optimizer step (nan_guard={self.nan_guard!r}, every process '
            'stops or skips together)', None, [], iteration)

    def _name_pending_terms(self, k, terms):
        """Give module ``k``'s deferred checks the terms known only after
        its losses ran (the cascade families' logs)."""
        for entry in self._pending_checks:
            if entry[0] == k and entry[2] is None:
                entry[2] = terms

    def _mark(self, name):
        if self.phase_callback is not None:
            self.phase_callback(name)
