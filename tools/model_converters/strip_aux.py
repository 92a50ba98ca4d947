"""Turn an mmlocal training checkpoint into a stock mmdet/mmseg checkpoint.

A ``LocalLearner`` checkpoint holds the wrapped model under ``model.`` and
the training-only auxiliary nets under ``aux_nets.``. The output keeps only
the wrapped model's weights with their stock keys (``backbone.``, ``neck.``,
``bbox_head.`` ...), so it loads into the plain mmdet/mmseg model with no
mmlocal import and no missing or unexpected keys. Optimizer state and
message hub are dropped; ``meta`` is kept (with a note of the conversion).

Usage::

    python tools/model_converters/strip_aux.py IN.pth OUT.pth [--config CFG]

``--config`` (the training config) additionally builds the stock model and
checks that the stripped state dict loads into it strictly. An existing
``OUT.pth`` is never overwritten (use a new name or ``--force``).
"""
import argparse
import os
import os.path as osp
import sys
from collections import OrderedDict

import torch

PREFIX = 'model.'
AUX_PREFIXES = ('aux_nets.', )


def strip_state_dict(state_dict):
    """Split a LocalLearner state dict into (stock state dict, dropped keys).

    A checkpoint without ``model.`` keys is a plain model already and is
    returned unchanged.
    """
    if not any(k.startswith(PREFIX) for k in state_dict):
        return OrderedDict(state_dict), []
    kept, dropped = OrderedDict(), []
    for key, value in state_dict.items():
        if key.startswith(PREFIX):
            kept[key[len(PREFIX):]] = value
        else:
            dropped.append(key)
    return kept, dropped


def convert(src, dst, force=False):
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
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f'{src!r} has no state_dict')
    kept, dropped = strip_state_dict(state_dict)
    unknown = [k for k in dropped if not k.startswith(AUX_PREFIXES)]
    if unknown:
        print(f'warning: dropping keys that are neither model nor aux '
              f'weights: {unknown[:5]}{" ..." if len(unknown) > 5 else ""}')
    meta = dict(ckpt.get('meta', {}) or {})
    meta['mmlocal_stripped_from'] = osp.basename(src)
    meta['mmlocal_dropped_keys'] = len(dropped)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    tmp = dst + '.tmp'
    torch.save(dict(meta=meta, state_dict=kept), tmp)
    os.replace(tmp, dst)
    return kept, dropped


def check_loads(config, state_dict):
    """Build the stock model of ``config`` and load ``state_dict`` strictly."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model
    if str(model_cfg.get('type', '')).endswith('LocalLearner'):
        model_cfg = model_cfg.model
    model = MODELS.build(model_cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f'stripped checkpoint does not match the stock '
                           f'model: missing={missing[:5]} '
                           f'unexpected={unexpected[:5]}')
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='mmlocal training checkpoint')
    parser.add_argument('dst', help='output checkpoint for the stock model')
    parser.add_argument('--config', help='check the result loads into the '
                        'stock model of this config')
    parser.add_argument('--force', action='store_true',
                        help='overwrite an existing output file')
    args = parser.parse_args(argv)
    try:
        kept, dropped = convert(args.src, args.dst, force=args.force)
        if args.config:
            sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
                osp.abspath(__file__)))))
            check_loads(args.config, kept)
    except (FileNotFoundError, FileExistsError, ValueError,
            RuntimeError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    print(f'wrote {args.dst}: {len(kept)} model tensors kept, '
          f'{len(dropped)} training-only tensors dropped')
    return 0


if __name__ == '__main__':
    sys.exit(main())
