"""Fold a Replacement Learning (RepL) checkpoint into a stock checkpoint.

A model with an ``mmlocal.RepLBackbone`` has no parameters for its replaced
blocks: they are synthesised from the neighbouring blocks by learnable
transforms. This tool builds the training model from its config, loads the
checkpoint, materialises every synthesised tensor and writes a checkpoint of
the **stock** model (``RepLBackbone`` replaced by its inner backbone,
``LocalLearner`` by its model, auxiliary nets and transforms dropped) whose
keys are exactly the stock ones (``backbone.layer2.1.conv1.weight``...), so
it loads strictly into the plain mmdet/mmseg model without mmlocal. With
``layer='light'`` the layers a light replaced block skips are written as
identities (Dirac ``conv2`` and identity ``bn2`` in a Bottleneck, zero
attention projections in a ViT layer), so the stock block computes the light
operator exactly.

Usage::

    python tools/model_converters/repl_fold.py IN.pth OUT.pth \\
        [--config CFG] [--out-config STOCK_CFG.py] [--backbone-only] \\
        [--verify] [--force]

- ``--config``: the training config (default: the one mmengine stored in the
  checkpoint's ``meta.cfg``).
- ``--out-config``: also write the stock config (the training config with
  the model unwrapped) for ``tools/test.py`` / deployment.
- ``--backbone-only``: write only the backbone's state dict (stock backbone
  keys, e.g. for ``init_cfg=dict(type='Pretrained', ...)``).
- ``--verify``: run the RepL model and the stock model (eval mode) on a
  random batch and fail if their features (backbone + neck) differ by more
  than ``--atol`` (default 1e-5).

The stock model is always built and loaded with ``strict=True`` before the
file is written. An existing ``OUT.pth`` is never overwritten without
``--force``.
"""
import argparse
import copy
import os
import os.path as osp
import sys
from collections import OrderedDict

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _load_cfg(config, ckpt):
    from mmengine.config import Config
    if config is not None:
        if not osp.isfile(config):
            raise FileNotFoundError(f'--config {config!r} not found')
        return Config.fromfile(config)
    text = (ckpt.get('meta') or {}).get('cfg')
    if not text:
        raise ValueError('the checkpoint stores no config (meta.cfg); pass '
                         '--config')
    return Config.fromstring(text, file_format='.py')


def _build(model_cfg, scope):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(scope)
    return MODELS.build(copy.deepcopy(model_cfg))


def _without_pretrained(model_cfg):
    """No pretrained download while building (weights come from the
    checkpoint)."""

    def walk(node):
        if isinstance(node, dict):
            out = type(node)()
            for k, v in node.items():
                if k == 'pretrained' and isinstance(v, str):
                    v = None
                elif k == 'init_cfg' and isinstance(v, dict) and \
                        v.get('type') == 'Pretrained':
                    v = None
                out[k] = walk(v)
            return out
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(model_cfg)


def _features(model, x):
    feats = model.extract_feat(x)
    if torch.is_tensor(feats):
        feats = [feats]
    return [f for f in feats]


def fold_checkpoint(src,
                    dst,
                    config=None,
                    out_config=None,
                    backbone_only=False,
                    verify=False,
                    atol=1e-5,
                    force=False,
                    input_size=64):
    """Convert ``src`` (RepL training checkpoint) into ``dst``.

    Returns:
        tuple: ``(stock state dict written, stock model config, max feature
        difference or None)``.
    """
    sys.path.insert(0, REPO)
    from mmlocal.models.repl import (RepLBackbone, fold_repl_state_dict,
                                     stock_model_cfg)
    if not osp.isfile(src):
        raise FileNotFoundError(f'input checkpoint {src!r} not found')
    if osp.abspath(src) == osp.abspath(dst):
        raise ValueError('output must differ from the input checkpoint')
    if osp.exists(dst) and not force:
        raise FileExistsError(
            f'{dst!r} exists; refusing to overwrite it (pass --force)')
    # the user's own checkpoint: trusted, may hold numpy/mmengine objects
    ckpt = torch.load(src, map_location='cpu', weights_only=False)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{src!r} is not an mmengine checkpoint (a dict)')
    state_dict = ckpt.get('state_dict', ckpt)
    state_dict = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in state_dict.items())
    cfg = _load_cfg(config, ckpt)
    scope = cfg.get('default_scope', None) or 'mmdet'

    model = _build(_without_pretrained(cfg.model), scope)
    model.load_state_dict(state_dict, strict=True)
    root = getattr(model, 'model', model) \
        if type(model).__name__ == 'LocalLearner' else model
    if not any(isinstance(m, RepLBackbone) for m in root.modules()):
        raise ValueError(f'the model of {src!r} has no RepLBackbone; nothing '
                         'to fold (use strip_aux.py for LocalLearner)')
    folded = fold_repl_state_dict(root)

    stock_cfg = stock_model_cfg(cfg.model)
    stock = _build(_without_pretrained(stock_cfg), scope)
    missing, unexpected = stock.load_state_dict(folded, strict=False)
    if missing or unexpected:
        raise RuntimeError(f'folded state dict does not match the stock '
                           f'model: missing={missing[:5]} '
                           f'unexpected={unexpected[:5]}')

    diff = None
    if verify:
        root.eval()
        stock.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, input_size, input_size, generator=g)
        with torch.no_grad():
            a = _features(root, x)
            b = _features(stock, x)
        diff = max((u - v).abs().max().item() for u, v in zip(a, b))
        if diff > atol:
            raise RuntimeError(f'stock model features differ from the RepL '
                               f'model by {diff:.3g} > atol={atol}')

    out = folded
    if backbone_only:
        out = OrderedDict((k[len('backbone.'):], v) for k, v in folded.items()
                          if k.startswith('backbone.'))
    meta = dict(ckpt.get('meta', {}) or {})
    meta.pop('cfg', None)
    meta['mmlocal_repl_folded_from'] = osp.basename(src)
    meta['mmlocal_repl_replaced'] = {
        name: m.replaced_blocks
        for name, m in root.named_modules() if isinstance(m, RepLBackbone)
    }
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    tmp = dst + '.tmp'
    torch.save(dict(meta=meta, state_dict=out), tmp)
    os.replace(tmp, dst)
    if out_config:
        cfg.model = stock_cfg
        cfg.dump(out_config)
    return out, stock_cfg, diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='RepL training checkpoint')
    parser.add_argument('dst', help='output checkpoint for the stock model')
    parser.add_argument(
        '--config',
        help='training config (default: the '
        "checkpoint's meta.cfg)")
    parser.add_argument('--out-config', help='write the stock config here')
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help='write only the backbone state dict')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='compare RepL and stock features')
    parser.add_argument('--atol', type=float, default=1e-5)
    parser.add_argument(
        '--input-size',
        type=int,
        default=64,
        help='side of the random image for --verify')
    parser.add_argument(
        '--force',
        action='store_true',
        help='overwrite an existing output file')
    args = parser.parse_args(argv)
    try:
        out, _, diff = fold_checkpoint(
            args.src,
            args.dst,
            config=args.config,
            out_config=args.out_config,
            backbone_only=args.backbone_only,
            verify=args.verify,
            atol=args.atol,
            force=args.force,
            input_size=args.input_size)
    except (FileNotFoundError, FileExistsError, ValueError,
            RuntimeError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    msg = f'wrote {args.dst}: {len(out)} stock tensors'
    if diff is not None:
        msg += f'; max feature difference vs RepL model {diff:.3g}'
    print(msg)
    return 0


if __name__ == '__main__':
    sys.exit(main())
