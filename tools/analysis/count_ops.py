"""Kernels and host synchronisations of one training step, per mode.

On a GPU a step whose kernels are small is bound by their launches, and
every op that reads a device value on the host (``.item()``, ``nonzero``,
``if tensor:``) makes the host wait until the device is idle, so whatever
the host does next (Python, the next launches) is no longer hidden. Both
counts are the same on every device, so this tool measures them on the CPU
(they are what local learning and RepL add to a step besides FLOPs):

- ``kernels``: ATen ops dispatched during ``train_step`` other than views
  and allocations (a kernel launch each on a GPU);
- ``syncs``: ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``)
  and ``nonzero`` calls;
- ``GFLOP``: ``torch.utils.flop_counter`` over the same step (matmuls and
  convolutions, forward and backward);
- ``ATen calls``: every ATen op of the same step, views and allocations
  included (each costs the host a dispatch even where it launches nothing);
- ``Python calls``: Python function calls (``cProfile``) in one more step,
  the optimizer's own ``step`` excluded. Where a GPU step is bound by the
  host rather than by the device or its launches (RetinaNet at 2 images per
  H200: a local step took 1.5-1.7x e2e's time with 1.2-1.3x its kernels),
  this and the ATen calls are the host work that the kernel count misses.

Modes: those of ``benchmark_memory.py`` and ``stock``: the model with every
``mmlocal.RepLBackbone`` replaced by its inner backbone (the baseline of a
RepL config). Ratios are against ``stock`` when given, else ``e2e``.

Each mode's model is built and trained one warm-up step as in
``benchmark_memory.py`` (same random batch); then one step is counted,
without the optimizer's own ``step`` (on CUDA a few multi-tensor launches;
on the CPU PyTorch loops over the parameters, and Adam reads its step
counter per parameter). On the CPU mmdet's focal loss takes another path
than on CUDA (``one_hot``: two syncs more per call here);
``--cuda-like-focal-loss`` makes it take the CUDA branch, so that the
syncs counted are those of a GPU step, and counts each call of mmcv's fused
focal-loss kernel (forward, backward) as one kernel, as on a GPU (on the CPU
a PyTorch stand-in runs it as ~15 ops per 32k anchor rows, which made the
count grow with the image size); the aux heads' ``FusedFocalLoss`` then
calls those kernels itself, as it does on a GPU).

``--parts PATTERN ...`` adds the kernels and FLOPs of the calls (``forward``,
or ``loss`` where a part has one) of the matching submodules (e.g.
``'aux_nets.*.*'``: each part of each aux net); backward is not attributed.

Example::

    python tools/analysis/count_ops.py \\
        configs/local/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py \\
        --modes e2e local --input-shape 2 3 64 96 --parts 'aux_nets.*.*'
"""
import argparse
import collections
import contextlib
import copy
import fnmatch
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import benchmark_memory as bm  # noqa: E402
import cuda_like_focal_loss as cuda_like_focal_loss_module  # noqa: E402
import torch  # noqa: E402
from cuda_like_focal_loss import cuda_like_focal_loss  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

NOT_KERNELS = frozenset({
    'view', 't', 'reshape', 'detach', 'select', 'slice', 'expand',
    'as_strided', 'unsqueeze', 'squeeze', 'permute', 'transpose',
    '_unsafe_view', 'alias', 'split', 'split_with_sizes', 'unbind',
    'narrow', 'lift_fresh', 'empty', 'empty_like', 'new_empty',
    '_reshape_alias', 'unfold', 'empty_strided'
})
SYNCS = frozenset({'_local_scalar_dense', 'nonzero', 'is_nonzero'})


class OpCounter(TorchDispatchMode):
    """Counts kernels and host syncs dispatched while active."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.syncs = 0
        self.dispatches = 0
        self.by_op = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused:
            self.dispatches += 1
        if self.paused:
            pass
        elif name not in NOT_KERNELS:
            self.kernels += 1
            self.by_op[name] += 1
        if name in SYNCS and not self.paused:
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def one_kernel(self, name):
        """What runs inside counts as one kernel ``name``: a CPU stand-in
        (several ATen ops) for what is one fused kernel on a GPU."""
        if self.paused:
            yield
            return
        self.paused = True
        try:
            yield
        finally:
            self.paused = False
            self.kernels += 1
            self.by_op[name] += 1


@contextlib.contextmanager
def fused_focal_kernels(counter, enabled=True):
    """``--cuda-like-focal-loss`` runs mmcv's fused sigmoid focal loss
    kernels as PyTorch code on the CPU (``tools/device/mmcv_ext_stub.py``:
    about 15 ops per 32k rows, forward and backward); count each call as
    the one kernel it is on CUDA. The aux heads' ``FusedFocalLoss``, which
    calls these kernels itself where they run (CUDA), calls them here too
    (``sync_free_losses.focal_kernel_runs``), as on a GPU."""
    if not enabled:
        yield
        return
    # the aux heads' FusedFocalLoss takes mmcv's kernels where they run
    # (CUDA): here too, where the CPU stand-in provides them
    from mmlocal.models.losses import sync_free_losses
    kernel_runs = sync_free_losses.focal_kernel_runs
    sync_free_losses.focal_kernel_runs = \
        lambda pred: pred.device.type == 'cpu' or kernel_runs(pred)
    stub = cuda_like_focal_loss_module._stub_module()
    names = ('sigmoid_focal_loss_forward', 'sigmoid_focal_loss_backward')
    saved = {n: getattr(stub, n) for n in names}

    def counted(name, fn):
        def run(*args, **kwargs):
            with counter.one_kernel(name):
                return fn(*args, **kwargs)
        return run

    for n in names:
        setattr(stub, n, counted(n, saved[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(stub, n, saved[n])
        sync_free_losses.focal_kernel_runs = kernel_runs


def _matches(name, pattern):
    """``fnmatch`` per dot-separated segment: ``'aux_nets.*.*'`` matches
    ``aux_nets.0.lb``, not ``aux_nets.0.lb.conv1``."""
    names, pats = name.split('.'), pattern.split('.')
    return len(names) == len(pats) and all(
        fnmatch.fnmatchcase(n, p) for n, p in zip(names, pats))


class PartCounter:
    """Kernels and FLOPs of the calls of the submodules whose qualified
    names match ``patterns`` (per segment, e.g. ``'aux_nets.*.*'``), summed
    over their calls: their ``forward`` and, where they have one, their
    ``loss`` (what ``LocalLearner`` calls on aux nets and heads). A part's
    count includes its children's. Backward work is not attributed (the
    autograd engine runs it outside the modules)."""

    def __init__(self, model, patterns, counter, flops):
        self.rows = collections.OrderedDict()
        self._handles, self._wrapped = [], []
        self._depth = {}
        self._counter, self._flops = counter, flops
        for name, module in model.named_modules():
            if not (name and any(_matches(name, p) for p in patterns)):
                continue
            self.rows[name] = [0, 0]
            self._depth[name] = [0, None]
            self._handles += [
                module.register_forward_pre_hook(
                    lambda m, a, name=name: self._enter(name)),
                module.register_forward_hook(
                    lambda m, a, o, name=name: self._exit(name))
            ]
            if callable(getattr(type(module), 'loss', None)):
                module.loss = self._wrap(name, module.loss)
                self._wrapped.append(module)

    def _now(self):
        return self._counter.kernels, self._flops.get_total_flops()

    def _enter(self, name):
        depth = self._depth[name]
        if depth[0] == 0:  # outermost call of this part (loss -> forward)
            depth[1] = self._now()
        depth[0] += 1

    def _exit(self, name):
        depth = self._depth[name]
        depth[0] -= 1
        if depth[0] == 0:
            kernels, flops = self._now()
            self.rows[name][0] += kernels - depth[1][0]
            self.rows[name][1] += flops - depth[1][1]

    def _wrap(self, name, method):
        def loss(*args, **kwargs):
            self._enter(name)
            try:
                return method(*args, **kwargs)
            finally:
                self._exit(name)
        return loss

    def remove(self):
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.loss


def count_mode(cfg, mode, input_shape, seed=0, parts=(),
               fused_focal=False, warmup=2):
    """``{'kernels', 'syncs', 'flops', 'top', 'parts'}`` of one
    ``train_step`` of ``mode``; ``parts``: name patterns of submodules whose
    forward kernels and FLOPs are reported (:class:`PartCounter`)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    if mode == 'stock':
        from mmlocal.models.repl import stock_model_cfg
        cfg = copy.deepcopy(cfg)
        cfg.model = stock_model_cfg(cfg.model)
        mode = 'e2e'
    plain = bm.plain_model_cfg(cfg)
    task = bm.detect_task(cfg, plain)
    num_classes = bm.find_num_classes(plain, task)
    model_cfg = bm.mode_model_cfg(cfg, mode)
    init_default_scope(bm.default_scope(cfg, task))
    torch.manual_seed(seed)
    model = bm.build_train_model(model_cfg)
    optim_wrapper = build_optim_wrapper(
        model,
        copy.deepcopy(
            cfg.get('optim_wrapper', None) or bm.FALLBACK_OPTIM_WRAPPER))
    shape = bm._check_shape(input_shape)
    for _ in range(warmup):
        model.train_step(
            bm.make_random_batch(shape, task, num_classes, seed=seed),
            optim_wrapper)
    batch = bm.make_random_batch(shape, task, num_classes, seed=seed)
    counter = OpCounter()
    optimizer = optim_wrapper.optimizer
    step = optimizer.step

    def uncounted_step(*args, **kwargs):
        counter.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            counter.paused = False

    optimizer.step = uncounted_step
    flops = FlopCounterMode(display=False)
    part_counter = PartCounter(model, parts, counter, flops)
    try:
        with flops, counter, fused_focal_kernels(counter, fused_focal):
            model.train_step(batch, optim_wrapper)
    finally:
        del optimizer.step
        part_counter.remove()
    py_calls = python_calls(
        model, bm.make_random_batch(shape, task, num_classes, seed=seed),
        optim_wrapper)
    return dict(kernels=counter.kernels, syncs=counter.syncs,
                dispatches=counter.dispatches, py_calls=py_calls,
                flops=flops.get_total_flops(),
                top=counter.by_op.most_common(8),
                parts={n: dict(kernels=k, flops=f)
                       for n, (k, f) in part_counter.rows.items()})


def python_calls(model, batch, optim_wrapper):
    """Python function calls (``cProfile``) of one ``train_step``, the
    optimizer's own ``step`` excluded."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    optimizer = optim_wrapper.optimizer
    step = optimizer.step

    def unprofiled_step(*args, **kwargs):
        prof.disable()
        try:
            return step(*args, **kwargs)
        finally:
            prof.enable()

    optimizer.step = unprofiled_step
    try:
        prof.enable()
        try:
            model.train_step(batch, optim_wrapper)
        finally:
            prof.disable()
    finally:
        del optimizer.step
    return sum(stat[1] for stat in pstats.Stats(prof).stats.values())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='kernels and host syncs of one training step',
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--modes', nargs='+', default=['e2e', 'local'],
                        choices=bm.MODES + ('stock', ))
    parser.add_argument('--input-shape', type=int, nargs=4,
                        default=[2, 3, 64, 96],
                        metavar=('N', 'C', 'H', 'W'))
    parser.add_argument(
        '--cuda-like-focal-loss', action='store_true',
        help='mmdet\'s FocalLoss takes its CUDA branch on the CPU (as on a '
        'GPU: no one_hot and its host reads); its fused kernel counts as '
        'one per call')
    parser.add_argument(
        '--parts', nargs='+', default=[], metavar='PATTERN',
        help='also report the kernels and FLOPs of the calls (forward, or '
        'loss where there is one; not backward) of the submodules '
        'matching these name patterns (fnmatch per dot-separated segment), '
        'e.g. "aux_nets.*.*" for '
        'every child of every aux net of a LocalLearner, '
        '"backbone.backbone.layer3.*" for RepL blocks')
    parser.add_argument(
        '--warmup', type=int, default=2, metavar='N',
        help='training steps before the counted one (default 2: a RepL '
        'model calibrates its statistics on its first step and makes its '
        'index tensors on the second; 1 gave the counts before 5 Dec 2026)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = bm.load_config(args.config, args.cfg_options)
    rows = {}
    with cuda_like_focal_loss(args.cuda_like_focal_loss):
        for mode in args.modes:
            try:
                rows[mode] = count_mode(
                    cfg, mode, args.input_shape, parts=args.parts,
                    fused_focal=args.cuda_like_focal_loss,
                    warmup=args.warmup)
            except bm.ModeUnavailable as exc:
                print(f'{mode}: unavailable ({exc})')
    plain = bm.plain_model_cfg(cfg)
    print(f'input: {bm.describe_input(plain, args.input_shape)}')
    base = rows.get('stock', rows.get('e2e'))
    base_name = 'stock' if 'stock' in rows else 'e2e'
    print(f'| mode | kernels | vs {base_name} | host syncs | GFLOP | vs '
          f'{base_name} | ATen calls | Python calls | vs {base_name} | '
          'most frequent |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---|')
    for mode, r in rows.items():
        ratio = f"{r['kernels'] / base['kernels']:.2f}x" if base else '-'
        fratio = f"{r['flops'] / base['flops']:.2f}x" \
            if base and base['flops'] else '-'
        pratio = f"{r['py_calls'] / base['py_calls']:.2f}x" if base else '-'
        top = ', '.join(f'{n} {c}' for n, c in r['top'][:4])
        print(f"| {mode} | {r['kernels']} | {ratio} | {r['syncs']} | "
              f"{r['flops'] / 1e9:.1f} | {fratio} | {r['dispatches']} | "
              f"{r['py_calls']} | {pratio} | {top} |")
    for mode, r in rows.items():
        if not r['parts']:
            continue
        print(f'\n{mode}: calls of each part (forward, or loss where the '
              'part has one; its backward is not attributed)\n')
        print('| part | kernels | GFLOP |')
        print('|---|---:|---:|')
        for name, part in r['parts'].items():
            print(f"| {name} | {part['kernels']} | "
                  f"{part['flops'] / 1e9:.2f} |")
    return rows


if __name__ == '__main__':
    main()
