"""Convert an ImageNet ResNet checkpoint into an mmdet/mmseg backbone one.

Accepted layouts:

- torchvision (``conv1.weight``, ``bn1.*``, ``layer{1-4}.*``, ``fc.*``);
- the seed repositories' ImageNet ResNets (InfoPro, MAN/MAN++, HPFF,
  MLAAN): the same keys plus training-only auxiliary weights (decoders,
  auxiliary classifiers, ``LB``/``EMA_Net`` copies, ...), possibly nested
  under ``state_dict``/``model`` and prefixed with ``module.`` (DDP);
- mmdet/mmseg checkpoints of a whole model (``backbone.`` prefix).

The output holds only the backbone keys mmdet's ``ResNet`` (and mmseg's
``ResNet`` with ``deep_stem=False``) use, so it can be given to a backbone
as ``init_cfg=dict(type='Pretrained', checkpoint=OUT)`` — also inside
``mmlocal.LocalLearner``, whose split keeps the keys. Everything dropped is
listed. With ``--config`` the result is checked against the config's
backbone: a missing key or a shape mismatch is an error, never a silent
partial load.

Usage::

    python tools/model_converters/resnet_to_mm.py IN.pth OUT.pth [--config CFG]
"""
import argparse
import os
import os.path as osp
import re
import sys
from collections import OrderedDict

import torch

BACKBONE_KEY = re.compile(r'^(conv1|bn1|layer[1-4]\.\d+)\.')
NESTING = ('state_dict', 'model', 'model_state_dict', 'net')
PREFIXES = ('module.', 'backbone.', 'encoder.')


def unwrap(ckpt):
    """The tensor dict inside a checkpoint (``state_dict``/``model`` ...)."""
    while isinstance(ckpt, dict):
        for key in NESTING:
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
        else:
            return ckpt
    raise ValueError('no state dict found in the checkpoint')


def convert_state_dict(state_dict):
    """Return ``(kept, dropped)``: backbone tensors and the dropped keys."""
    kept, dropped = OrderedDict(), []
    for key, value in state_dict.items():
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    changed = True
        if torch.is_tensor(value) and BACKBONE_KEY.match(name):
            if name in kept:
                raise ValueError(f'two input keys map to {name!r}')
            kept[name] = value
        else:
            dropped.append(key)
    if not kept:
        raise ValueError('no ResNet backbone keys (conv1/bn1/layerN.*) '
                         'found; is this a ResNet checkpoint?')
    return kept, dropped


def check_against_backbone(kept, config):
    """Compare with the backbone of ``config``; raise on any mismatch."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model
    if str(model_cfg.get('type', '')).endswith('LocalLearner'):
        model_cfg = model_cfg.model
    backbone_cfg = model_cfg.backbone
    backbone_cfg.init_cfg = None
    backbone_cfg.pop('pretrained', None)
    backbone = MODELS.build(backbone_cfg)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in kept
               and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in kept if k not in expected]
    wrong = [f'{k}: {tuple(kept[k].shape)} vs {tuple(expected[k].shape)}'
             for k in kept
             if k in expected and kept[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f'missing {len(missing)}: {missing[:8]}')
    if unexpected:
        problems.append(f'unexpected {len(unexpected)}: {unexpected[:8]}')
    if wrong:
        problems.append(f'wrong shape {len(wrong)}: {wrong[:8]}')
    if problems:
        raise ValueError(f'converted weights do not fit the backbone of '
                         f'{config}: ' + '; '.join(problems))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='input checkpoint')
    parser.add_argument('dst', help='output backbone checkpoint')
    parser.add_argument('--config', help='check the output against the '
                        "backbone of this mmdet/mmseg/mmlocal config")
    parser.add_argument('--force', action='store_true',
                        help='overwrite an existing output file')
    args = parser.parse_args(argv)
    try:
        if not osp.isfile(args.src):
            raise FileNotFoundError(f'input {args.src!r} not found')
        if osp.exists(args.dst) and not args.force:
            raise FileExistsError(f'{args.dst!r} exists; refusing to '
                                  'overwrite it (pass --force)')
        # a download from the seed repositories holds only tensors, but
        # older ones pickle argparse namespaces: trusted files only
        ckpt = torch.load(args.src, map_location='cpu', weights_only=False)
        kept, dropped = convert_state_dict(unwrap(ckpt))
        if args.config:
            sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(
                osp.abspath(__file__)))))
            check_against_backbone(kept, args.config)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': kept,
                'meta': {'converted_from': osp.basename(args.src)}},
               args.dst)
    print(f'wrote {args.dst}: {len(kept)} backbone tensors kept, '
          f'{len(dropped)} keys dropped')
    for key in dropped:
        print(f'  dropped {key}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
