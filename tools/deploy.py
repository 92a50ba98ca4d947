"""Deploy an mmlocal training checkpoint as a stock mmdet/mmseg model.

One command turns any mmlocal training run (``LocalLearner`` with any
auxiliary family, ``RepLBackbone`` alone or inside a ``LocalLearner``, or a
plain model trained with mmlocal's tools) into the two files that mmdet's
``init_detector`` / mmseg's ``init_model`` (and their ``tools/test.py``)
need, **without mmlocal installed**:

- ``OUT_DIR/NAME.pth``: the stock checkpoint. Auxiliary nets are stripped
  (``tools/model_converters/strip_aux.py``), replaced RepL blocks are folded
  into plain weights (``tools/model_converters/repl_fold.py``); optimizer,
  scheduler, message hub and ``ema_state_dict`` are dropped, ``meta`` is
  kept (``dataset_meta`` gives the class names; ``meta.cfg`` becomes the
  stock config). With mmengine's ``EMAHook`` the checkpoint's
  ``state_dict`` already holds the averaged weights (mmengine swaps them
  in), so those are the ones deployed. The file loads with
  ``torch.load(weights_only=True)``.
- ``OUT_DIR/NAME.py``: the stock config. The training config with the
  model unwrapped (``LocalLearner`` -> its model, ``RepLBackbone`` -> its
  plain backbone, no pretrained pointers), ``default_scope`` and the
  model's ``_scope_`` set to ``mmdet``/``mmseg``, mmlocal entries removed
  from ``custom_imports`` and ``custom_hooks``, ``model_wrapper_cfg``
  dropped, mmlocal datasets replaced by their mmdet/mmseg base class. A
  config that still needs mmlocal (e.g. GSO-YOLO's modules) is refused.

Before anything is written, the training model is built from CONFIG and
loads CHECKPOINT strictly (a mismatch names the file and the keys), the
stock model is built from the stock config in mmdet's/mmseg's scope and
loads the stock state dict strictly, and both run (eval mode) on a random
batch: every output tensor of ``model(x, mode='tensor')`` must agree to
``--atol + --rtol * max|output|`` (defaults 1e-5 and 1e-5; folding BN into
convolutions in float32 leaves an error relative to the outputs' scale, as
in ``torch.allclose``).

Usage::

    python tools/deploy.py CONFIG CHECKPOINT OUT_DIR [--name NAME] \\
        [--force] [--no-verify] [--atol 1e-5] [--rtol 1e-5] \\
        [--input-size 64]

``NAME`` defaults to the config's file name without ``.py``. Existing
output files are never overwritten without ``--force``.
"""
import argparse
import copy
import os
import os.path as osp
import sys
from collections import OrderedDict

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
for _path in (REPO, osp.join(REPO, 'tools', 'model_converters')):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import repl_fold  # noqa: E402
import strip_aux  # noqa: E402

TRAINING_ONLY = ('optimizer', 'param_schedulers', 'message_hub',
                 'ema_state_dict', 'resumed_from')


class DeployError(RuntimeError):
    """Raised when a checkpoint/config pair cannot be deployed."""


# ---------------------------------------------------------------------------
# checkpoint and models
def load_training_checkpoint(path):
    """``(checkpoint dict, state dict)``; a DDP ``module.`` prefix is
    removed. The user's own file: loaded in full (may hold mmengine
    objects)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} not found')
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    if not isinstance(ckpt, dict):
        raise DeployError(f'{path!r} is not an mmengine checkpoint (a dict)')
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict) or not state or not all(
            torch.is_tensor(v) for v in state.values()):
        raise DeployError(f'{path!r} has no state_dict of tensors')
    state = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in state.items())
    return ckpt, state


def _task_scope(model):
    from mmdet.models.detectors import BaseDetector
    from mmseg.models.segmentors import BaseSegmentor
    if isinstance(model, BaseDetector):
        return 'mmdet'
    if isinstance(model, BaseSegmentor):
        return 'mmseg'
    raise DeployError(f'{type(model).__name__} is neither an mmdet detector '
                      'nor an mmseg segmentor; nothing to deploy')


def build_training_model(cfg, state_dict, checkpoint, config):
    """The training model of ``cfg`` with ``state_dict`` loaded strictly.

    Returns:
        tuple: ``(training model, stock model inside it)``.
    """
    scope = cfg.get('default_scope', None) or 'mmdet'
    model = repl_fold._build(repl_fold._without_pretrained(cfg.model), scope)
    where = (f'checkpoint {checkpoint!r} does not match the model of '
             f'config {config!r}')
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines()[1:]]
        raise DeployError(f'{where}: {len(lines)} problems, e.g. '
                          f'{"; ".join(lines[:3])}') from None
    if missing or unexpected:
        raise DeployError(
            f'{where}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}')
    root = model.model if type(model).__name__ == 'LocalLearner' else model
    return model, root


def stock_state_dict(root, state_dict):
    """The stock state dict of ``root`` (RepL folded) and the number of
    training-only tensors of the checkpoint that it leaves out."""
    from mmlocal.models.repl import fold_repl_state_dict
    kept, dropped = strip_aux.strip_state_dict(state_dict)
    folded = fold_repl_state_dict(root)
    removed = len(dropped) + len(set(kept) - set(folded))
    return OrderedDict((k, v.detach().clone()) for k, v in folded.items()), \
        removed


# ---------------------------------------------------------------------------
# config
def _walk(node, fn):
    """Apply ``fn`` to every dict of a config tree (children first)."""
    if isinstance(node, dict):
        out = type(node)()
        for k, v in node.items():
            out[k] = _walk(v, fn)
        return fn(out)
    if isinstance(node, (list, tuple)):
        return type(node)(_walk(v, fn) for v in node)
    return node


def _is_mmlocal(type_name):
    return isinstance(type_name, str) and type_name.startswith('mmlocal.')


def _stock_dataset_type(type_name, scope):
    """The mmdet/mmseg base class of an mmlocal dataset (by name)."""
    import importlib
    from mmlocal.registry import DATASETS
    cls = DATASETS.get(type_name)
    if cls is None:
        return None
    registry = importlib.import_module(f'{scope}.registry').DATASETS
    for base in cls.__mro__[1:]:
        if registry.get(base.__name__) is base:
            return base.__name__
    return None


def stock_config(cfg, scope):
    """The deployable config: see the module docstring."""
    from mmlocal.models.repl import stock_model_cfg
    out = copy.deepcopy(cfg)
    model = repl_fold._without_pretrained(stock_model_cfg(cfg.model))

    def unscope(node):
        t = node.get('type')
        if isinstance(t, str) and t.startswith(scope + '.'):
            node['type'] = t[len(scope) + 1:]
        node.pop('_scope_', None)
        return node

    model = _walk(model, unscope)
    model['_scope_'] = scope
    out.model = model
    out.default_scope = scope
    out.pop('model_wrapper_cfg', None)
    out.load_from = None
    out.resume = False

    imports = out.get('custom_imports')
    if imports:
        kept = [m for m in imports.get('imports', [])
                if not str(m).startswith('mmlocal')]
        if kept:
            out.custom_imports = dict(imports, imports=kept)
        else:
            out.pop('custom_imports')
    if out.get('custom_hooks'):
        out.custom_hooks = [h for h in out.custom_hooks
                            if not _is_mmlocal(h.get('type'))]

    def datasets(node):
        t = node.get('type')
        if _is_mmlocal(t) and t.endswith('Dataset'):
            base = _stock_dataset_type(t.split('.', 1)[1], scope)
            if base is not None:
                node['type'] = base
        return node

    for key in list(out.keys()):
        if key.endswith('_dataloader') or key.endswith('_dataset'):
            out[key] = _walk(out[key], datasets)
    left = [line.strip() for line in out.pretty_text.splitlines()
            if 'mmlocal' in line]
    if left:
        raise DeployError(
            'the stock config would still need mmlocal: ' + '; '.join(
                left[:5]) + ('; ...' if len(left) > 5 else ''))
    return out


# ---------------------------------------------------------------------------
# verification
def _flat_tensors(out):
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_tensors(v)]
    return []


def _random_batch(model, scope, size):
    """A preprocessed random batch of two ``size`` x ``size`` images."""
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, size, size), generator=g,
                          dtype=torch.uint8) for _ in range(2)]
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    meta = dict(img_shape=(size, size), ori_shape=(size, size),
                pad_shape=(size, size), scale_factor=(1., 1.))
    samples = [Sample(metainfo=meta) for _ in imgs]
    return model.data_preprocessor(dict(inputs=imgs, data_samples=samples),
                                   False)


@torch.no_grad()
def max_output_difference(trained, stock, scope, size=64):
    """Largest absolute difference between the raw outputs
    (``mode='tensor'``) of two models in eval mode on a random batch, and
    the largest absolute output of the stock model (the scale of the
    relative tolerance).

    Returns:
        tuple[float, float]: ``(difference, scale)``.
    """
    trained.eval()
    stock.eval()
    data = _random_batch(stock, scope, size)
    a = _flat_tensors(trained(data['inputs'], data['data_samples'],
                              mode='tensor'))
    b = _flat_tensors(stock(data['inputs'], data['data_samples'],
                            mode='tensor'))
    if len(a) != len(b) or not a:
        raise DeployError(f'the stock model returns {len(b)} tensors, the '
                          f'trained one {len(a)}')
    diff = max((u.float() - v.float()).abs().max().item()
               for u, v in zip(a, b))
    scale = max(v.float().abs().max().item() for v in b)
    return diff, scale


# ---------------------------------------------------------------------------
def _plain(value):
    """``value`` made of Python builtins (for ``weights_only`` loading), or
    ``None`` if it cannot be."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        if any(i is None and v is not None for i, v in zip(items, value)):
            return None
        return type(value)(items)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            p = _plain(v)
            if p is not None or v is None:
                out[str(k)] = p
        return out
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
        return value.item()  # numpy / torch scalars
    return None


def deploy(config, checkpoint, out_dir, name=None, force=False, verify=True,
           atol=1e-5, rtol=1e-5, input_size=64):
    """Write ``OUT_DIR/NAME.pth`` and ``OUT_DIR/NAME.py``.

    Returns:
        dict: ``checkpoint``, ``config`` (paths written), ``tensors``,
        ``dropped`` (training-only tensors left out), ``scope`` and ``diff``
        (max output difference, None without verification).
    """
    name = name or osp.splitext(osp.basename(config))[0]
    ckpt_out = osp.join(out_dir, name + '.pth')
    cfg_out = osp.join(out_dir, name + '.py')
    for path in (ckpt_out, cfg_out):
        if osp.exists(path) and not force:
            raise FileExistsError(
                f'{path!r} exists; refusing to overwrite it (pass --force)')
    if osp.abspath(ckpt_out) == osp.abspath(checkpoint):
        raise DeployError('the output checkpoint must differ from the input')
    ckpt, state = load_training_checkpoint(checkpoint)
    cfg = repl_fold._load_cfg(config, ckpt)
    trained, root = build_training_model(cfg, state, checkpoint, config)
    scope = _task_scope(root)
    stock_state, dropped = stock_state_dict(root, state)
    deploy_cfg = stock_config(cfg, scope)
    stock = repl_fold._build(deploy_cfg.model, scope)
    missing, unexpected = stock.load_state_dict(stock_state, strict=False)
    if missing or unexpected:
        raise DeployError(
            f'the stock state dict of {checkpoint!r} does not match the '
            f'stock model: missing={missing[:5]} unexpected={unexpected[:5]}')
    diff = None
    if verify:
        diff, scale = max_output_difference(root, stock, scope, input_size)
        if not diff <= atol + rtol * scale:
            raise DeployError(
                f'stock model outputs differ from the trained model by '
                f'{diff:.3g} > atol + rtol * max|output| = {atol} + {rtol} '
                f'* {scale:.3g}')

    meta = _plain(dict(ckpt.get('meta', {}) or {})) or {}
    meta['cfg'] = deploy_cfg.pretty_text
    meta['mmlocal_deployed_from'] = osp.basename(checkpoint)
    meta['mmlocal_dropped_tensors'] = dropped
    os.makedirs(out_dir, exist_ok=True)
    tmp = ckpt_out + '.tmp'
    torch.save(dict(meta=meta, state_dict=stock_state), tmp)
    torch.load(tmp, map_location='cpu', weights_only=True)  # stock loaders
    os.replace(tmp, ckpt_out)
    deploy_cfg.dump(cfg_out)
    return dict(checkpoint=ckpt_out, config=cfg_out, tensors=len(stock_state),
                dropped=dropped, scope=scope, diff=diff)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='training config')
    parser.add_argument('checkpoint', help='training checkpoint')
    parser.add_argument('out_dir', help='where NAME.pth and NAME.py go')
    parser.add_argument('--name', help="output file name (default: the "
                        "config's)")
    parser.add_argument('--force', action='store_true',
                        help='overwrite existing output files')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip the output comparison')
    parser.add_argument('--atol', type=float, default=1e-5)
    parser.add_argument('--rtol', type=float, default=1e-5,
                        help='tolerance relative to the largest output')
    parser.add_argument('--input-size', type=int, default=64,
                        help='side of the random images for the comparison')
    args = parser.parse_args(argv)
    try:
        result = deploy(args.config, args.checkpoint, args.out_dir,
                        name=args.name, force=args.force,
                        verify=not args.no_verify, atol=args.atol,
                        rtol=args.rtol,
                        input_size=args.input_size)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError,
            DeployError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    msg = (f'wrote {result["checkpoint"]} ({result["tensors"]} tensors, '
           f'{result["dropped"]} training-only tensors dropped) and '
           f'{result["config"]} (scope {result["scope"]})')
    if result['diff'] is not None:
        msg += f'; max output difference {result["diff"]:.3g}'
    print(msg)
    return 0


if __name__ == '__main__':
    sys.exit(main())
