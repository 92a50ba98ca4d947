"""Measure where a LocalLearner's training memory goes and print the split
points that balance it (an InfoPro*-style split by memory, not by count).

For the config's model and an input shape it measures, once:

- ``c_b``: bytes of the activations each backbone block saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), and
  the stem's;
- ``a(e)``: the peak of the config's auxiliary family at every allowed split
  point ``e`` (forward + backward from a detached input, measured with
  :class:`mmlocal.utils.memory.PeakMemoryMeter`; parameter gradients
  excluded, they are counted once for the whole step);
- ``c_head``: the peak of the neck, heads and the model's loss.

and prints the estimated module peaks of the config's split and of the
balanced one (:func:`mmlocal.models.local.balance.balanced_split_points`).
Blocks in the config's ``checkpoint_blocks`` cost their input (what the
checkpoint keeps), which the estimate counts for every block of a module
(a module's last block is recomputed at the start of its backward, so for
it the estimate is optimistic).
Put the printed ``split_points`` in the config (``model.split_points``,
instead of ``num_modules``), then check with ``benchmark_memory.py``.
Activations scale with the number of pixels, so a plan made at one input
size holds at others of the same aspect.

Example::

    python tools/analysis/plan_split.py \\
        configs/local/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py \\
        --input-shape 2 3 800 1333 --json work_dirs/plan.json
"""
import argparse
import copy
import json
import os.path as osp
import sys

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from benchmark_memory import (default_input_shape, default_scope,  # noqa
                              describe_input, detect_task, find_num_classes,
                              is_local_learner, load_config,
                              make_random_batch, plain_model_cfg,
                              sanitize_model_cfg)
from mmlocal.models.local.balance import (balanced_split_points,  # noqa
                                          module_costs)
from mmlocal.utils.memory import PeakMemoryMeter, format_bytes  # noqa: E402
from cuda_like_focal_loss import cuda_like_focal_loss  # noqa: E402


def saved_bytes(fn, exclude):
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs,
    without those whose storage is in ``exclude`` (parameters)."""
    seen = set()
    total = [0]

    def pack(t):
        if t.device.type != 'meta':
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in exclude and key not in seen:
                seen.add(key)
                total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _zero_grads(params):
    """Allocate every gradient now, so that a measured backward accumulates
    into existing tensors (as in a training step, where gradients are
    counted once for the whole step) and its peak holds only activations
    and temporaries."""
    for p in params:
        p.grad = torch.zeros_like(p)


def measure_costs(learner, batch, device='cpu'):
    """Costs of a :class:`LocalLearner` built with one module per allowed
    split point (so ``aux_nets[k]`` is the aux net at point
    ``module_ranges[k][1]``).

    Returns:
        dict: ``stem``, ``blocks`` (list), ``aux`` (point -> bytes),
        ``head``, ``input``.
    """
    seq = learner._seq
    params = [p for p in learner.parameters() if p.requires_grad]
    exclude = {p.untyped_storage().data_ptr()
               for p in learner.parameters()}
    data = learner.data_preprocessor(batch, True)
    inputs, samples = data['inputs'], data['data_samples']

    outs = {}
    x, stem = saved_bytes(lambda: seq.forward_stem(inputs, outs), exclude)
    features, blocks = [], []
    for b in range(seq.num_blocks):
        x = x.detach()
        block_input = x
        x, cost = saved_bytes(
            lambda: seq.forward_blocks(x, b, b + 1, outs), exclude)
        if b in seq.checkpointed:
            # the checkpoint keeps the block's input (outside autograd's
            # saved tensors, so not seen by saved_bytes)
            cost += block_input.numel() * block_input.element_size()
        blocks.append(cost)
        features.append(x.detach())
    outs = {s: o.detach() for s, o in outs.items()}

    aux = {}
    for k, (_, end) in enumerate(learner.module_ranges[:-1]):
        net = learner.aux_nets[k]
        _zero_grads(params)
        h = features[end - 1].clone()
        with PeakMemoryMeter(device) as meter:
            if hasattr(net, 'backward_streams'):
                h2 = h.clone().requires_grad_()
                net.backward_streams(
                    h.requires_grad_(), h2, inputs, samples,
                    backward=lambda loss: loss.backward(),
                    forward_context=torch.enable_grad)
                del h2
            else:
                loss, _ = learner.parse_losses(
                    net.loss(h.requires_grad_(), inputs, samples))
                loss.backward()
                del loss
        aux[end] = int(meter.peak_bytes)
        del h

    _zero_grads(params)
    last = seq.out_stages[-1]
    outs[last] = outs[last].clone().requires_grad_()
    with PeakMemoryMeter(device) as meter:
        with learner._backbone_runs_last_module(features[-1],
                                                seq.num_blocks, outs):
            loss, _ = learner.parse_losses(
                learner.model.loss(inputs, samples))
        loss.backward()
        del loss
    head = int(meter.peak_bytes)
    learner.zero_grad(set_to_none=True)
    return dict(stem=stem, blocks=blocks, aux=aux, head=head,
                input=inputs.numel() * inputs.element_size())


def plan(cfg, input_shape=None, num_modules=None, device='cpu', seed=0):
    """Measure and balance; see the module docstring.

    Returns:
        dict: the measured costs, ``num_modules``, ``span``, ``current``
        and ``balanced`` (each ``split_points`` + per-module ``costs``).
    """
    from mmengine.registry import MODELS, init_default_scope
    if not is_local_learner(cfg.model):
        raise ValueError(f'cfg.model.type={cfg.model.get("type")!r} is not '
                         'a LocalLearner: nothing to split')
    plain = plain_model_cfg(cfg)
    task = detect_task(cfg, plain)
    num_classes = find_num_classes(plain, task)
    input_shape = tuple(input_shape or default_input_shape(task, plain))
    init_default_scope(default_scope(cfg, task))
    torch.manual_seed(seed)

    current_cfg = sanitize_model_cfg(cfg.model)
    current = MODELS.build(copy.deepcopy(current_cfg))
    ranges = current.module_ranges
    span = current.cascade_span or 1
    num_frozen = current._seq.num_frozen_blocks
    num_blocks = current._seq.num_blocks
    if num_modules is None:
        num_modules = current.num_modules
    current_points = [s for s, _ in ranges[1:]]
    grads = sum(p.numel() * p.element_size() for p in current.parameters()
                if p.requires_grad)
    del current

    # one module per allowed point: every aux net at every boundary
    probe_cfg = copy.deepcopy(current_cfg)
    probe_cfg.pop('num_modules', None)
    probe_cfg['split_points'] = list(range(num_frozen + 1, num_blocks))
    probe_cfg['stage_aligned'] = False
    probe = MODELS.build(probe_cfg).to(device)
    probe.train()
    batch = make_random_batch(input_shape, task, num_classes, seed=seed)
    costs = measure_costs(probe, batch, device)
    costs['grads'] = grads  # of the configured split's model
    del probe

    def estimate(points):
        return module_costs(points, costs['blocks'], costs['aux'],
                            costs['head'], costs['stem'], span)

    balanced = balanced_split_points(costs['blocks'], costs['aux'],
                                     costs['head'], num_modules,
                                     costs['stem'], span)
    report = dict(
        config=getattr(cfg, 'filename', None), input_shape=list(input_shape),
        input=describe_input(plain, input_shape),
        num_modules=num_modules, span=span, costs=costs,
        fixed=costs['grads'] + costs['input'])
    if len(current_points) == num_modules - 1:
        report['current'] = dict(split_points=current_points,
                                 costs=estimate(current_points))
    report['balanced'] = dict(split_points=balanced,
                              costs=estimate(balanced))
    return report


def format_report(report):
    costs = report['costs']
    mib = format_bytes
    lines = [
        f"config: {report['config']}  input: "
        f"{report.get('input') or 'x'.join(map(str, report['input_shape']))}"
        "  "
        f"K={report['num_modules']}  cascade span={report['span']}",
        f"stem {mib(costs['stem'])}  neck+heads+loss {mib(costs['head'])}  "
        f"(+ parameter grads {mib(costs['grads'])} and input "
        f"{mib(costs['input'])} in every plan)",
        'block  saved activations  aux peak if a module ends here'
    ]
    for b, c in enumerate(costs['blocks']):
        a = costs['aux'].get(b + 1)
        a = mib(a) if a is not None else '-'
        lines.append(f'{b:5d}  {mib(c):>17}  {a}')
    for name in ('current', 'balanced'):
        if name in report:
            p = report[name]
            lines.append(
                f"{name:9s} split_points={p['split_points']}: estimated "
                f"module peaks [{', '.join(mib(c) for c in p['costs'])}], "
                f"largest {mib(max(p['costs']))}, step estimate "
                f"{mib(max(p['costs']) + report['fixed'])}")
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='memory-balanced split points for a LocalLearner config')
    parser.add_argument('config')
    parser.add_argument('--input-shape', type=int, nargs=4,
                        metavar=('N', 'C', 'H', 'W'))
    parser.add_argument('--num-modules', type=int,
                        help='K (default: the config\'s)')
    parser.add_argument('--device', choices=['cpu', 'cuda'])
    parser.add_argument('--json', help='write the report here')
    parser.add_argument(
        '--cuda-like-focal-loss', action='store_true',
        help='on the CPU, let the sigmoid focal loss keep only what '
        'mmcv\'s CUDA op keeps (cuda_like_focal_loss.py): peaks as on a '
        'GPU for RetinaNet-style heads')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    with cuda_like_focal_loss(args.cuda_like_focal_loss):
        report = plan(cfg, args.input_shape, args.num_modules, device)
    report['cuda_like_focal_loss'] = args.cuda_like_focal_loss
    print(format_report(report))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'report written to {args.json}')
    return report


if __name__ == '__main__':
    main()
