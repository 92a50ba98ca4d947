"""Worker for tests/test_local_pipeline.py.

Under torchrun (2 or 4 processes) it trains tiny GroupNorm FCN LocalLearners
through ``mmlocal.LocalPipelineParallel``; as one process (``single``) it
trains the same models without a wrapper. Each rank writes
``OUT/<tag><suffix>.pt`` (``rank<r>`` or ``single``); the full-model results
are gathered to rank 0 as a checkpoint would be:

- ``'_sync'``: K=3, ``stages=[[0, 1], [2]]``, sync, SGD momentum,
  ``clip_grad`` (active) and ``nan_guard='skip'``; module 0's local loss is
  NaN at iteration POISONED (in every run), so the iteration is dropped.
  ITERS iterations, then the gathered checkpoint (model + optimizer) is
  loaded into a *fresh* model and wrapper on every process (resume
  re-scatters) and trained one more iteration. Saves the final state dict
  and optimizer state (rank 0), what each process holds
  (``<tag>_sync_held.pt``), rank 0's logs, the skip count and the
  predictions of ``val_step`` (whole model gathered on every process);
- ``'_async'``: K=3, the default stages (measured on the first batch),
  async, no clipping, ITERS iterations, ``nan_guard='skip'`` with the
  poisoned iteration (stage 0 drops it and tells the next stage);
- with 4 processes (``'_dp'``): 2 stages x 2 replicas, sync, each replica's
  stage 0 trains on its half of the batch;
- ``'_refuse'`` (2 processes): what the wrapper refuses (ValueError
  messages);
- ``'_fault'`` (2 processes): async; the last stage raises at iteration 1,
  the first stage must stop with an error naming it; then, sync, the first
  stage's process vanishes (``os._exit``) at iteration 1 and the last stage
  must name it within ``timeout_s``.
"""
import copy
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repo

from mmengine.config import ConfigDict  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from local_utils import gn_fcn_learner_cfg, seg_batch  # noqa: E402
from mmlocal.registry import MODELS  # noqa: E402

ITERS, POISONED = 3, 1
LR, MAX_NORM = 0.5, 0.3


def build(num_modules=2, aux_type=None, **learner):
    cfg = gn_fcn_learner_cfg()
    cfg['num_modules'] = num_modules
    cfg['model']['backbone']['zero_init_residual'] = False
    if aux_type is not None:
        cfg['aux']['type'] = aux_type
    cfg.update(learner)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    return model


def build_cascade():
    """HPFF (cascade span 2) with GroupNorm heads."""
    cfg = gn_fcn_learner_cfg()
    gn = dict(type='GN', num_groups=4, requires_grad=True)
    cfg['aux'].update(type='mmlocal.HPFFAux', independent_seg_head=dict(
        channels=16, norm_cfg=gn, head=dict(dropout_ratio=0.0)))
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(ConfigDict(cfg))


def optim(model, clip):
    return OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
        clip_grad=dict(max_norm=MAX_NORM) if clip else None)


def poison(model, it_state):
    """Module 0's local loss is NaN at iteration POISONED."""
    aux = model.aux_nets[0]
    original = aux.loss

    def loss(h, inputs, samples):
        losses = dict(original(h, inputs, samples))
        if it_state['it'] == POISONED:
            losses = {k: v * float('nan') for k, v in losses.items()}
        return losses

    aux.loss = loss


def batch_for(it, replicas=1, replica=0):
    batch = seg_batch(n=4, size=32, seed=it, ignore=False)
    if replicas > 1:
        per = 4 // replicas
        batch = {k: v[replica * per:(replica + 1) * per]
                 for k, v in batch.items()}
    return batch


def wrap(model, **kwargs):
    from mmlocal.engine.model_wrappers import LocalPipelineParallel
    net = LocalPipelineParallel(model, **kwargs)
    net.hook_bound = True  # no Runner: checkpoints gathered by hand
    return net


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def held(model):
    """Names of the parameters/buffers this process holds (not meta)."""
    return sorted(n for n, t in list(model.named_parameters()) +
                  list(model.named_buffers()) if t.device.type != 'meta')


def run_sync(out, tag, distributed):
    it_state = dict(it=0)
    model = build(3, nan_guard='skip')
    poison(model, it_state)
    net = wrap(model, stages=[[0, 1], [2]], schedule='sync') \
        if distributed else model
    ow = optim(net, clip=True)
    logs = []
    for it in range(ITERS):
        it_state['it'] = it
        logs.append(net.train_step(batch_for(it), ow))
    extra = dict(skipped=model.num_skipped_iters)
    if distributed:
        extra['held'] = held(model)
        extra['optim_state_ids'] = sorted(ow.optimizer.state_dict()['state'])
        # the checkpoint as LocalPipelineHook makes rank 0 write it
        with net.full_checkpoint(ow):
            if dist.get_rank() == 0:
                ckpt = dict(model=state_of(model),
                            optim=copy.deepcopy(ow.state_dict()))
        objs = [ckpt if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(objs, src=0)
        ckpt = objs[0]
        extra['released_after_ckpt'] = held(model) == extra['held']
        # resume: a fresh model and wrapper load the whole checkpoint
        model = build(3, nan_guard='skip')
        poison(model, it_state)
        model.load_state_dict(ckpt['model'])
        net = wrap(model, stages=[[0, 1], [2]], schedule='sync')
        ow = optim(net, clip=True)
        ow.load_state_dict(ckpt['optim'])
    it_state['it'] = ITERS
    logs.append(net.train_step(batch_for(ITERS), ow))
    preds = net.val_step(batch_for(99))
    seg_logits = torch.stack([p.seg_logits.data for p in preds])
    if distributed:
        extra['held_after_val'] = len(held(model))
        with net.full_checkpoint(ow):
            final = state_of(model) if dist.get_rank() == 0 else None
            full_optim = ow.state_dict() if dist.get_rank() == 0 else None
    else:
        final, full_optim = state_of(model), ow.state_dict()
    if final is not None:
        torch.save(dict(model=final, optim=full_optim['state']),
                   os.path.join(out, f'{tag}_sync.pt'))
    torch.save(dict(logs=[{k: float(v) for k, v in log.items()}
                          for log in logs],
                    seg_logits=seg_logits, **extra),
               os.path.join(out, f'{tag}_sync_info.pt'))


def run_async(out, tag, distributed):
    it_state = dict(it=0)
    model = build(3, nan_guard='skip')
    poison(model, it_state)
    net = wrap(model, schedule='async') if distributed else model
    ow = optim(net, clip=False)
    for it in range(ITERS):
        it_state['it'] = it
        net.train_step(batch_for(it), ow)
    if distributed:
        info = dict(stages=net.stages, held=held(model),
                    skipped=model.num_skipped_iters)
        with net.full_checkpoint(ow):
            final = state_of(model) if dist.get_rank() == 0 else None
    else:
        info, final = {}, state_of(model)
    if final is not None:
        torch.save(final, os.path.join(out, f'{tag}_async.pt'))
    torch.save(info, os.path.join(out, f'{tag}_async_info.pt'))


def run_dp(out, tag, distributed):
    """2 stages x 2 replicas (4 processes) vs one process, whole batch."""
    model = build(2)
    if distributed:
        net = wrap(model, schedule='sync', num_replicas=2)
        replica = net.replica
    else:
        net, replica = model, 0
    ow = optim(net, clip=True)
    for it in range(2):
        batch = batch_for(it, replicas=2 if distributed else 1,
                          replica=replica)
        net.train_step(batch, ow)
    if distributed:
        info = dict(stage=net.stage, replica=net.replica, held=held(model))
        with net.full_checkpoint(ow):
            final = state_of(model) if dist.get_rank() == 0 else None
        torch.save(info, os.path.join(out, f'{tag}_dp_info.pt'))
    else:
        final = state_of(model)
    if final is not None:
        torch.save(final, os.path.join(out, f'{tag}_dp.pt'))


def run_refuse(out, tag):
    errors = {}
    cases = {
        'too_many_stages': lambda: wrap(build(1)),
        'stage_count': lambda: wrap(build(3), stages=[[0], [1], [2]]),
        'not_contiguous': lambda: wrap(build(3), stages=[[0, 2], [1]]),
        'not_covering': lambda: wrap(build(3), stages=[[0], [1]]),
        'replicas': lambda: wrap(build(2), num_replicas=3),
        'schedule': lambda: wrap(build(2), schedule='gpipe'),
        'man_ema': lambda: wrap(build(2, 'mmlocal.MomentumAux')),
        'cascade': lambda: wrap(build_cascade()),
        'attach': lambda: wrap(build(2, attach_stages=[1])),
        'module_check': lambda: wrap(build(2, nan_guard_check='module')),
    }
    for name, make in cases.items():
        try:
            make()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    torch.save(errors, os.path.join(out, f'{tag}_refuse.pt'))


def run_fault(out, tag):
    from mmlocal.engine.model_wrappers import PipelinePeerError
    rank = dist.get_rank()
    result = {}
    # 1. async: the last stage (rank 0) raises at iteration 1
    model = build(2)
    net = wrap(model, schedule='async', timeout_s=60)
    if net.is_last:
        original = model.model.loss

        def loss(*args, **kwargs):
            if net._iter == 1:
                raise RuntimeError('injected failure')
            return original(*args, **kwargs)

        model.model.loss = loss
    ow = optim(net, clip=False)
    start = time.monotonic()
    try:
        for it in range(8):
            net.train_step(batch_for(it), ow)
        result['raised'] = None
    except PipelinePeerError as exc:
        result['raised'] = ('peer', exc.rank, str(exc))
    except RuntimeError as exc:
        result['raised'] = ('own', rank, str(exc))
    result['seconds'] = time.monotonic() - start
    # 2. sync: the first stage's process (rank 1) vanishes at iteration 1
    dist.barrier()
    model = build(2)
    net = wrap(model, schedule='sync', timeout_s=20)
    ow = optim(net, clip=False)
    start = time.monotonic()
    try:
        for it in range(3):
            if it == 1 and net.stage == 0:
                torch.save(result, os.path.join(out, f'{tag}_fault.pt'))
                os._exit(0)
            net.train_step(batch_for(it), ow)
        result['died'] = None
    except PipelinePeerError as exc:
        result['died'] = (exc.rank, str(exc))
    result['died_seconds'] = time.monotonic() - start
    torch.save(result, os.path.join(out, f'{tag}_fault.pt'))
    os._exit(0)  # the peer is gone: no orderly shutdown of the group


def main(out, mode):
    distributed = 'RANK' in os.environ
    if distributed:
        dist.init_process_group('gloo')
        tag = f'rank{dist.get_rank()}'
    else:
        tag = 'single'
    if not distributed or mode == 'dp':
        run_dp(out, tag, distributed)
    if not distributed or mode == 'pp':
        run_sync(out, tag, distributed)
        run_async(out, tag, distributed)
    if distributed and mode == 'pp':
        run_refuse(out, tag)
        run_fault(out, tag)
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else 'pp')
