"""Training memory and speed of a model: end-to-end vs. local learning vs.
gradient checkpointing.

Every mode runs the model's own ``train_step(data, optim_wrapper)`` (the
mmengine ``BaseModel`` API) on a random batch with random but valid ground
truth, so the figures cover data preprocessing, forward, losses, backward,
optimizer step and ``zero_grad`` exactly as training does.

Modes:

- ``e2e``: the plain model (``cfg.model``, or ``cfg.model.model`` when the
  config wraps it in a ``LocalLearner``);
- ``checkpoint``: the plain model with ``backbone.with_cp=True``;
- ``local``: ``cfg.model`` as configured, when it is a ``LocalLearner``
  (otherwise reported as unavailable).

Memory is the peak of live tensor bytes during one measured iteration above
the level before it (:class:`mmlocal.utils.memory.PeakMemoryMeter`: the
CUDA allocator's statistics on a GPU, the profiler's allocation events on the
CPU). Model and optimizer are built and ``--warmup`` iterations run first, so
parameters and optimizer state are *not* part of the peak; they are reported
separately as ``static``. If the model has a ``phase_callback`` attribute
(local learning), it is set to ``meter.mark`` during that iteration and the
per-module peaks are reported; ``rest`` is what follows the model's
last mark (optimizer step, ``zero_grad``).

Examples::

    python tools/analysis/benchmark_memory.py \\
        mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        --modes e2e checkpoint --input-shape 2 3 512 512 --iters 2 \\
        --json work_dirs/mem.json --plot work_dirs/mem.png
    python tools/analysis/benchmark_memory.py configs/local/...py \\
        --modes e2e local checkpoint

Time is the median of ``--iters`` iterations run before the measured one,
without the meter: on CUDA its phase marks synchronise the device (which
would penalise local learning's K phases), on the CPU its profiler slows
every op. With ``nan_guard`` on (the default), a LocalLearner synchronises
once per module to check its loss; ``--cfg-options model.nan_guard=None``
measures without it.
"""
import argparse
import copy
import gc
import json
import os
import os.path as osp
import re
import statistics
import sys
import tempfile
import time
import traceback

# make ``import mmlocal`` work from a plain checkout too
sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

from mmlocal.utils.memory import PeakMemoryMeter, format_bytes  # noqa: E402
from cuda_like_focal_loss import cuda_like_focal_loss  # noqa: E402

MODES = ('e2e', 'local', 'checkpoint')
DEFAULT_DET_SHAPE = (2, 3, 800, 1333)
DEFAULT_SEG_SHAPE = (2, 3, 512, 1024)
SYNC_BN_TYPES = ('SyncBN', 'MMSyncBN', 'SyncBatchNorm', 'nn.SyncBatchNorm')
REST_PHASE = 'rest'
FALLBACK_OPTIM_WRAPPER = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9))


class ModeUnavailable(Exception):
    """A mode that does not apply to the config (not an error)."""


# --------------------------------------------------------------------- config
def load_config(config, cfg_options=None):
    """A :class:`Config` from a path, an ``mmdet::``/``mmseg::`` name or a
    config object (copied).

    ``Config.fromfile('mmdet::...')`` is not supported by mmengine, so such a
    name is loaded through a one-line wrapper ``_base_ = 'mmdet::...'``.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = Config(copy.deepcopy(config))
    elif re.match(r'^[A-Za-z_]\w*::', str(config)):
        with tempfile.TemporaryDirectory() as tmp:
            wrapper = osp.join(tmp, 'benchmark_wrapper.py')
            with open(wrapper, 'w') as f:
                f.write(f'_base_ = {str(config)!r}\n')
            try:
                cfg = Config.fromfile(wrapper)
            except Exception as e:
                raise FileNotFoundError(
                    f'cannot load config {config!r} (is the package '
                    f'installed and the path right?): {e}') from e
    else:
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file {config!r} not found')
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise KeyError(f'config {config!r} has no `model`')
    return cfg


def _type_name(model_cfg):
    t = model_cfg.get('type', '') if isinstance(model_cfg, dict) else ''
    return t if isinstance(t, str) else getattr(t, '__name__', str(t))


def is_local_learner(model_cfg):
    return _type_name(model_cfg).endswith('LocalLearner')


def plain_model_cfg(cfg):
    """The model without local learning (``cfg.model.model`` for a
    ``LocalLearner``)."""
    if is_local_learner(cfg.model):
        if 'model' not in cfg.model:
            raise KeyError('cfg.model is a LocalLearner without `model`')
        return copy.deepcopy(cfg.model.model)
    return copy.deepcopy(cfg.model)


def _walk(node, fn):
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def _is_pretrained_init(init_cfg):
    if isinstance(init_cfg, dict):
        return init_cfg.get('type') == 'Pretrained'
    if isinstance(init_cfg, (list, tuple)):
        return any(_is_pretrained_init(c) for c in init_cfg)
    return False


def sanitize_model_cfg(model_cfg):
    """Copy of ``model_cfg`` fit for a single-process, offline benchmark:
    SyncBN -> BN everywhere, no pretrained weights anywhere."""
    model_cfg = copy.deepcopy(model_cfg)

    def fix(d):
        if d.get('type') in SYNC_BN_TYPES:
            d['type'] = 'BN'
        if isinstance(d.get('pretrained'), str):
            d['pretrained'] = None
        if _is_pretrained_init(d.get('init_cfg')):
            d['init_cfg'] = None

    _walk(model_cfg, fix)
    if isinstance(model_cfg.get('backbone'), dict):
        model_cfg.backbone['init_cfg'] = None
    if 'pretrained' in model_cfg:
        model_cfg['pretrained'] = None
    return model_cfg


def detect_task(cfg, model_cfg=None):
    """``'det'`` or ``'seg'``, from the model's heads or the default scope."""
    model_cfg = plain_model_cfg(cfg) if model_cfg is None else model_cfg
    if 'decode_head' in model_cfg:
        return 'seg'
    if any(k in model_cfg for k in ('bbox_head', 'roi_head', 'rpn_head')):
        return 'det'
    scope = cfg.get('default_scope', None)
    if scope in ('mmseg', 'mmdet'):
        return {'mmseg': 'seg', 'mmdet': 'det'}[scope]
    raise ValueError(
        f'cannot tell whether model type {_type_name(model_cfg)!r} is a '
        'detector or a segmentor: it has no decode_head/bbox_head/roi_head '
        f'and default_scope is {scope!r}')


def _last(head):
    return head[-1] if isinstance(head, (list, tuple)) else head


def find_num_classes(model_cfg, task):
    """Number of classes from the head config of the plain model."""
    candidates = []
    if task == 'seg':
        candidates.append(_last(model_cfg.get('decode_head')))
    else:
        candidates.append(model_cfg.get('bbox_head'))
        roi_head = model_cfg.get('roi_head')
        if isinstance(roi_head, dict):
            candidates.append(_last(roi_head.get('bbox_head')))
    for head in candidates:
        if isinstance(head, dict) and head.get('num_classes') is not None:
            return int(head['num_classes'])
    if task == 'det' and model_cfg.get('rpn_head') is not None:
        return 1
    raise ValueError(
        f'cannot find num_classes in the {task} head config of model type '
        f'{_type_name(model_cfg)!r}')


def default_input_shape(task, model_cfg):
    if task == 'seg':
        size = (model_cfg.get('data_preprocessor') or {}).get('size')
        if size:
            return (DEFAULT_SEG_SHAPE[0], 3) + tuple(int(s) for s in size)
        return DEFAULT_SEG_SHAPE
    return DEFAULT_DET_SHAPE


def default_scope(cfg, task):
    """``cfg.default_scope``, else the task's package."""
    return cfg.get('default_scope', None) or \
        {'det': 'mmdet', 'seg': 'mmseg'}[task]


def mode_model_cfg(cfg, mode):
    """The model config that ``mode`` builds (sanitized)."""
    if mode == 'e2e':
        return sanitize_model_cfg(plain_model_cfg(cfg))
    if mode == 'checkpoint':
        model_cfg = sanitize_model_cfg(plain_model_cfg(cfg))
        if not isinstance(model_cfg.get('backbone'), dict):
            raise ModeUnavailable('the model has no `backbone` config to '
                                  'set with_cp=True on')
        model_cfg.backbone['with_cp'] = True
        return model_cfg
    if mode == 'local':
        if not is_local_learner(cfg.model):
            raise ModeUnavailable(
                f'cfg.model.type is {_type_name(cfg.model)!r}, not a '
                "LocalLearner; wrap the model as "
                "model=dict(type='mmlocal.LocalLearner', model=..., ...) "
                'to benchmark local learning')
        return sanitize_model_cfg(cfg.model)
    raise ValueError(f'unknown mode {mode!r}; choose from {MODES}')


# ---------------------------------------------------------------------- data
def _check_shape(input_shape):
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, ) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f'--input-shape must be N C H W (or C H W), got '
                         f'{input_shape}')
    return shape


def model_input_shape(model_cfg, input_shape):
    """``(N, C, H, W)`` of the images the model computes on: the data
    preprocessor pads them to its ``size`` (mmseg configs: the crop size,
    e.g. 512x1024 for Cityscapes) and to a multiple of its ``size_divisor``
    (mmseg) or ``pad_size_divisor`` (mmdet). A smaller ``--input-shape``
    of a segmentation config is measured at the crop size."""
    n, c, h, w = _check_shape(input_shape)
    pre = model_cfg.get('data_preprocessor') or {}
    size = pre.get('size')
    if size:
        h, w = max(h, int(size[0])), max(w, int(size[1]))
    div = pre.get('size_divisor') or pre.get('pad_size_divisor') or 1
    h, w = -(-h // div) * div, -(-w // div) * div
    return n, c, h, w


def describe_input(model_cfg, input_shape):
    """``'2x3x64x96'``, or ``'2x3x64x96 (padded to 2x3x512x1024)'`` where
    the data preprocessor pads it (:func:`model_input_shape`)."""
    shape = _check_shape(input_shape)
    text = 'x'.join(map(str, shape))
    seen = model_input_shape(model_cfg, shape)
    if seen != shape:
        text += f" (padded to {'x'.join(map(str, seen))})"
    return text


def make_random_batch(input_shape, task, num_classes, seed=0,
                      boxes_per_image=4, ignore_ratio=0.1):
    """A random batch in the format mmdet/mmseg data preprocessors expect.

    Args:
        input_shape (tuple): ``(N, C, H, W)``.
        task (str): ``'det'`` (``DetDataSample`` with ``gt_instances``:
            xyxy ``bboxes`` inside the image, at least 8 px wide and high,
            ``labels`` in ``[0, num_classes)``) or ``'seg'``
            (``SegDataSample`` with ``gt_sem_seg`` labels in
            ``[0, num_classes)`` and about ``ignore_ratio`` of pixels 255).
        num_classes (int): Number of classes of the head.
        seed (int): Same seed, same batch.

    Returns:
        dict: ``{'inputs': [uint8 CxHxW tensors], 'data_samples': [...]}``.
    """
    n, c, h, w = _check_shape(input_shape)
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    g = torch.Generator().manual_seed(int(seed))
    inputs, samples = [], []
    for i in range(n):
        inputs.append(torch.randint(0, 256, (c, h, w), dtype=torch.uint8,
                                    generator=g))
        meta = dict(img_id=i, ori_shape=(h, w), img_shape=(h, w))
        if task == 'det':
            from mmdet.structures import DetDataSample
            from mmengine.structures import InstanceData
            k = boxes_per_image
            min_w, min_h = min(8, w), min(8, h)
            bw = min_w + torch.rand(k, generator=g) * max(w // 2 - min_w, 0)
            bh = min_h + torch.rand(k, generator=g) * max(h // 2 - min_h, 0)
            x1 = torch.rand(k, generator=g) * (w - bw)
            y1 = torch.rand(k, generator=g) * (h - bh)
            sample = DetDataSample(metainfo=dict(
                meta, scale_factor=(1.0, 1.0), flip=False,
                flip_direction=None))
            sample.gt_instances = InstanceData(
                bboxes=torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1),
                labels=torch.randint(0, num_classes, (k, ), generator=g))
        elif task == 'seg':
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            label = torch.randint(0, num_classes, (1, h, w), generator=g)
            label[torch.rand((1, h, w), generator=g) < ignore_ratio] = 255
            sample = SegDataSample(metainfo=dict(meta, pad_shape=(h, w)))
            sample.gt_sem_seg = PixelData(data=label)
        else:
            raise ValueError(f"task must be 'det' or 'seg', got {task!r}")
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_train_model(model_cfg, device='cpu'):
    """Build a model as the Runner does (``init_weights()``: e.g. the
    RetinaNet/FCOS classification bias prior; without it a few SGD steps at
    the configs' learning rates diverge), move it to ``device``, train mode.
    """
    import logging

    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS
    model = MODELS.build(model_cfg)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)  # init_weights logs every parameter
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    model.to(device)
    model.train()
    return model


# ----------------------------------------------------------------- measuring
def _tensor_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == 'meta':
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _static_bytes(model, optim_wrapper):
    state = []
    for s in optim_wrapper.optimizer.state.values():
        state.extend(v for v in s.values() if torch.is_tensor(v))
    return dict(
        param_bytes=_tensor_bytes(list(model.parameters()) +
                                  list(model.buffers())),
        optim_state_bytes=_tensor_bytes(state))


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def _loss_value(log_vars):
    if isinstance(log_vars, dict) and 'loss' in log_vars:
        value = log_vars['loss']
        try:
            return float(value.detach() if torch.is_tensor(value) else value)
        except (TypeError, ValueError):
            return None
    return None


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def local_lower_bound(model, batch, device='cpu'):
    """Lower bound of a LocalLearner's training-step peak for its split.

    ``LB = input batch + all parameter gradients + retained stage outputs
    + max_k A_k``, where ``A_k`` is the activation peak of module ``k`` with
    its auxiliary net (the last: with the neck, heads and the model's loss),
    forward and backward, measured **in isolation** from its detached input
    (gradients it creates are subtracted, they are counted once in the
    first term). A step cannot need less: gradients persist until the
    optimizer step, the neck needs the retained outputs, and some module has
    to be trained. Parameters and optimizer state are static (outside the
    peak, as in the main measurement).

    Returns:
        dict: ``bytes`` and its parts (``input``, ``grads``, ``retained``,
        ``modules`` = list of ``A_k``, ``largest_module``).
    """
    seq, ranges = model._seq, model.module_ranges
    data = model.data_preprocessor(batch, True)
    inputs, samples = data['inputs'], data['data_samples']
    # inputs of every module and the stage outputs, without a graph
    xs, outs = [], {}
    with torch.no_grad():
        x = inputs
        for k, (start, end) in enumerate(ranges):
            xs.append(x)
            h = seq.forward_stem(x, outs) if k == 0 else x
            x = seq.forward_blocks(h, start, end, outs)
    last_start = ranges[-1][0]
    produced_early = {s: o for s, o in outs.items()
                      if s in set(seq.block_stage[:last_start])}
    retained = _bytes(produced_early.values())
    params = [p for p in model.parameters() if p.requires_grad]
    grads = _bytes(params)
    acts = []
    for k, (start, end) in enumerate(ranges):
        model.zero_grad(set_to_none=True)
        # copies made outside the meter: inputs and retained outputs are
        # counted once, in their own terms
        early = {s: o.clone() for s, o in produced_early.items()}
        x_k = xs[k].clone()
        with PeakMemoryMeter(device) as meter:
            if k < len(ranges) - 1:
                h = seq.forward_stem(x_k, {}) if k == 0 else x_k
                h = seq.forward_blocks(h, start, end, {})
                loss, _ = model.parse_losses(
                    model.aux_nets[k].loss(h, inputs, samples))
            else:
                with model._backbone_runs_last_module(x_k, start, early):
                    loss, _ = model.parse_losses(
                        model.model.loss(inputs, samples))
            loss.backward()
            del loss
        created = _bytes(p.grad for p in params if p.grad is not None)
        acts.append(max(0, int(meter.peak_bytes) - created))
    model.zero_grad(set_to_none=True)
    parts = dict(input=_bytes([inputs]), grads=grads, retained=retained,
                 modules=acts, largest_module=int(max(range(len(acts)),
                                                      key=acts.__getitem__)))
    parts['bytes'] = parts['input'] + grads + retained + max(acts)
    return parts


def run_mode(cfg, mode, input_shape, iters=3, warmup=1, device='cpu',
             task=None, num_classes=None, seed=0):
    """Build one mode's model and optimizer, warm up, measure.

    Returns a dict with ``peak_bytes``, ``time_s`` (median wall time),
    ``times_s``, ``cpu_time_s`` (median process CPU time),
    ``params_total``, ``params_trainable``, ``param_bytes``,
    ``optim_state_bytes``, ``phases``, ``end_bytes``, ``loss``, ``method``.
    Raises :class:`ModeUnavailable` when the mode does not apply.
    """
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    if iters < 1 or warmup < 0:
        raise ValueError(f'need iters >= 1 and warmup >= 0, got '
                         f'iters={iters} warmup={warmup}')
    plain = plain_model_cfg(cfg)
    task = task or detect_task(cfg, plain)
    num_classes = num_classes or find_num_classes(plain, task)
    input_shape = _check_shape(input_shape)
    model_cfg = mode_model_cfg(cfg, mode)

    init_default_scope(default_scope(cfg, task))
    torch.manual_seed(seed)
    model = build_train_model(model_cfg, device)
    optim_cfg = cfg.get('optim_wrapper', None) or FALLBACK_OPTIM_WRAPPER
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(optim_cfg))
    params = list(model.parameters())
    result = dict(
        available=True,
        params_total=sum(p.numel() for p in params),
        params_trainable=sum(p.numel() for p in params if p.requires_grad))
    del params

    # one batch per iteration, all made before measuring (same content)
    batches = [
        make_random_batch(input_shape, task, num_classes, seed=seed)
        for _ in range(warmup + iters + 1)
    ]
    has_phases = hasattr(model, 'phase_callback')
    if has_phases:
        model.phase_callback = None
    log_vars = None
    for _ in range(warmup):
        log_vars = model.train_step(batches.pop(0), optim_wrapper)
    del log_vars
    gc.collect()
    result.update(_static_bytes(model, optim_wrapper))

    # timed iterations: no meter, no phase marks (on CUDA every mark is a
    # device synchronisation, on the CPU the profiler slows every op)
    times, cpu_times = [], []
    for _ in range(iters):
        batch = batches.pop(0)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        log_vars = model.train_step(batch, optim_wrapper)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    del batch
    # then one more iteration under the meter, with the per-phase peaks
    meter = PeakMemoryMeter(device)
    try:
        with meter:
            if has_phases:
                model.phase_callback = meter.mark
            log_vars = model.train_step(batches.pop(0), optim_wrapper)
            if has_phases:
                meter.mark(REST_PHASE)
    finally:
        if has_phases:
            model.phase_callback = None
    phases = {k: v for k, v in meter.phases.items() if k != 'tail'} \
        if has_phases else {}
    if phases and list(phases) == [REST_PHASE]:
        phases = {}  # the model never called its phase_callback
    result.update(
        peak_bytes=int(meter.peak_bytes),
        end_bytes=int(meter.end_bytes),
        time_s=statistics.median(times),
        times_s=times,
        # CPU time of this process (all its threads): on a shared CPU the
        # robust figure (other jobs stretch wall time, not our CPU time)
        cpu_time_s=statistics.median(cpu_times),
        phases=phases,
        loss=_loss_value(log_vars),
        method=meter.method)
    if mode == 'local' and len(getattr(model, 'module_ranges', ())) > 1:
        result['lower_bound'] = local_lower_bound(
            model, make_random_batch(input_shape, task, num_classes,
                                     seed=seed), device)
        result['lb_ratio'] = result['peak_bytes'] / \
            result['lower_bound']['bytes']
    del model, optim_wrapper, batches, log_vars
    gc.collect()
    return result


def run_benchmark(cfg, modes=MODES, input_shape=None, iters=3, warmup=1,
                  device=None, seed=0, cfg_options=None, verbose=False):
    """Benchmark ``modes`` of a config; see the module docstring.

    Args:
        cfg (str | Config | dict): Config path, ``mmdet::``/``mmseg::`` name
            or config.
        modes (Sequence[str]): Any of ``'e2e'``, ``'local'``,
            ``'checkpoint'``.
        input_shape (tuple, optional): ``(N, C, H, W)``; defaults to
            ``2x3x800x1333`` for detection and ``2x3x<crop size>`` for
            segmentation.
        iters (int): Timed iterations (median time); the peak memory is
            measured on one more iteration.
        warmup (int): Unmeasured iterations before (create optimizer state).
        device (str, optional): ``'cpu'`` or ``'cuda'``; CUDA if available.

    Returns:
        dict: Run metadata and ``modes: {mode: result}``. A mode that does not
        apply or fails has ``available=False`` and a ``reason`` (and
        ``error=True`` when it raised).
    """
    source = cfg if isinstance(cfg, str) else getattr(cfg, 'filename', None)
    cfg = load_config(cfg, cfg_options)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    plain = plain_model_cfg(cfg)
    task = detect_task(cfg, plain)
    num_classes = find_num_classes(plain, task)
    if input_shape is None:
        input_shape = default_input_shape(task, plain)
    input_shape = _check_shape(input_shape)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f'unknown mode {mode!r}; choose from {MODES}')

    report = dict(
        config=source, task=task, num_classes=num_classes,
        input_shape=list(input_shape),
        model_input_shape=list(model_input_shape(plain, input_shape)),
        input=describe_input(plain, input_shape), iters=iters,
        warmup=warmup, device=str(device),
        method=PeakMemoryMeter(device).method,
        torch=torch.__version__, modes={})
    for mode in modes:
        if verbose:
            print(f'[benchmark_memory] {mode} ...', flush=True)
        try:
            res = run_mode(cfg, mode, input_shape, iters=iters,
                           warmup=warmup, device=device, task=task,
                           num_classes=num_classes, seed=seed)
        except ModeUnavailable as e:
            res = dict(available=False, reason=str(e))
        except Exception as e:  # report, go on with the other modes
            traceback.print_exc()
            res = dict(available=False, error=True,
                       reason=f'{type(e).__name__}: {e}')
        gc.collect()
        report['modes'][mode] = res

    ref = report['modes'].get('e2e')
    for res in report['modes'].values():
        if res.get('available') and ref and ref.get('available'):
            res['mem_ratio'] = res['peak_bytes'] / ref['peak_bytes'] \
                if ref['peak_bytes'] else None
            res['time_ratio'] = res['time_s'] / ref['time_s'] \
                if ref['time_s'] else None
        elif res.get('available'):
            res['mem_ratio'] = res['time_ratio'] = None
    return report


# ------------------------------------------------------------------- output
def _shape(shape):
    return 'x'.join(map(str, shape))


def _ratio(x):
    return '-' if x is None else f'{x:.2f}x'


def format_table(report):
    lines = [
        f"config: {report['config']}  task: {report['task']}  "
        f"input: {report.get('input') or _shape(report['input_shape'])}",
        f"device: {report['device']}  memory method: {report['method']}  "
        f"iters: {report['iters']} (warmup {report['warmup']})  "
        f"torch {report['torch']}",
        'peak = peak live tensor memory during a training iteration above '
        'the level before it; static = parameters+buffers and optimizer '
        'state (not in peak)',
    ]
    header = ('mode', 'peak', 'mem ratio', 'time/iter', 'time ratio',
              'static', 'trainable / total params')
    rows = []
    for mode, r in report['modes'].items():
        if not r.get('available'):
            rows.append((mode, 'n/a', '', '', '', '', ''))
            continue
        rows.append((
            mode, format_bytes(r['peak_bytes']), _ratio(r.get('mem_ratio')),
            f"{r['time_s']:.3f} s", _ratio(r.get('time_ratio')),
            format_bytes(r['param_bytes'] + r['optim_state_bytes']),
            f"{r['params_trainable'] / 1e6:.2f}M / "
            f"{r['params_total'] / 1e6:.2f}M"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = '  '.join(f'{{:<{w}}}' for w in widths)
    lines.append(fmt.format(*header))
    lines.append('  '.join('-' * w for w in widths))
    lines.extend(fmt.format(*row) for row in rows)
    for mode, r in report['modes'].items():
        if not r.get('available'):
            kind = 'failed' if r.get('error') else 'unavailable'
            lines.append(f'{mode}: {kind}: {r["reason"]}')
        elif r.get('phases'):
            parts = ', '.join(f'{k} {format_bytes(v)}'
                              for k, v in r['phases'].items())
            lines.append(f'{mode} per-phase peaks: {parts}')
        if r.get('lower_bound'):
            lb = r['lower_bound']
            mods = ', '.join(format_bytes(v) for v in lb['modules'])
            lines.append(
                f"{mode} lower bound {format_bytes(lb['bytes'])} "
                f"(peak = {r['lb_ratio']:.2f}x bound) = input "
                f"{format_bytes(lb['input'])} + grads "
                f"{format_bytes(lb['grads'])} + retained outputs "
                f"{format_bytes(lb['retained'])} + largest module "
                f"(module{lb['largest_module']}) of [{mods}]")
    return '\n'.join(lines)


def save_plot(report, out_file):
    """Bar chart: peak memory (and time) per mode, per-phase peaks."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    avail = [(m, r) for m, r in report['modes'].items() if r.get('available')]
    with_phases = [(m, r) for m, r in avail if r.get('phases')]
    ncols = 2 + bool(with_phases)
    fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 4))
    names = [m for m, _ in avail]
    gib = 2**30
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']

    ax = axes[0]
    peaks = [r['peak_bytes'] / gib for _, r in avail]
    bars = ax.bar(names, peaks, color=colors[:len(names)])
    for bar, (_, r) in zip(bars, avail):
        label = f"{r['peak_bytes'] / gib:.2f}"
        if r.get('mem_ratio') is not None:
            label += f"\n({r['mem_ratio']:.2f}x)"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()),
                    ha='center', va='bottom', fontsize=8)
    ax.set_ylabel('peak training memory [GiB]')
    ax.set_title('peak memory per iteration')
    ax.margins(y=0.25)

    ax = axes[1]
    bars = ax.bar(names, [r['time_s'] for _, r in avail],
                  color=colors[:len(names)])
    for bar, (_, r) in zip(bars, avail):
        label = f"{r['time_s']:.2f}"
        if r.get('time_ratio') is not None:
            label += f"\n({r['time_ratio']:.2f}x)"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()),
                    ha='center', va='bottom', fontsize=8)
    ax.set_ylabel('time per iteration [s]')
    ax.set_title('median iteration time')
    ax.margins(y=0.25)

    if with_phases:
        ax = axes[2]
        offset = 0
        ticks, labels = [], []
        for i, (mode, r) in enumerate(with_phases):
            keys = list(r['phases'])
            xs = [offset + j for j in range(len(keys))]
            ax.bar(xs, [r['phases'][k] / gib for k in keys],
                   color=colors[names.index(mode) % len(colors)],
                   label=mode)
            ax.axhline(r['peak_bytes'] / gib, ls='--', lw=0.8,
                       color=colors[names.index(mode) % len(colors)])
            ticks += xs
            labels += keys
            offset += len(keys) + 1
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=45, ha='right', fontsize=8)
        ax.set_ylabel('phase peak [GiB]')
        ax.set_title('per-module peaks (dashed: overall)')
        ax.legend(fontsize=8)

    title = osp.basename(str(report['config'] or ''))
    fig.suptitle(f"{title}  {'x'.join(map(str, report['input_shape']))}  "
                 f"{report['device']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=120)
    plt.close(fig)


def save_json(report, out_file):
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    with open(out_file, 'w') as f:
        json.dump(report, f, indent=2)


# ----------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Peak training memory and iteration time of e2e, local '
        'learning and gradient checkpointing',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'config', help='config file, or an upstream name such as '
        'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py')
    parser.add_argument('--modes', nargs='+', default=list(MODES),
                        choices=MODES, help='modes to run')
    parser.add_argument(
        '--input-shape', nargs='+', type=int, default=None,
        help='N C H W of the random batch (default 2 3 800 1333 for '
        'detection, 2 3 <crop size> for segmentation)')
    parser.add_argument('--iters', type=int, default=3,
                        help='timed iterations (then one for memory)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='iterations before measuring')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default=None,
                        help='default: cuda if available')
    parser.add_argument('--json', help='write the results as JSON here')
    parser.add_argument('--plot', help='write a bar chart (PNG) here')
    parser.add_argument(
        '--cuda-like-focal-loss', action='store_true',
        help='on the CPU, let the sigmoid focal loss keep only what '
        'mmcv\'s CUDA op keeps (cuda_like_focal_loss.py): peaks as on a '
        'GPU for RetinaNet-style heads')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value (see tools/train.py)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available')
    with cuda_like_focal_loss(args.cuda_like_focal_loss):
        report = run_benchmark(
            args.config, modes=args.modes, input_shape=args.input_shape,
            iters=args.iters, warmup=args.warmup, device=args.device,
            seed=args.seed, cfg_options=args.cfg_options, verbose=True)
    report['cuda_like_focal_loss'] = args.cuda_like_focal_loss
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        print(f'results written to {args.json}')
    if args.plot:
        save_plot(report, args.plot)
        print(f'plot written to {args.plot}')
    failed = [m for m, r in report['modes'].items() if r.get('error')]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
