# Copyright (c) mmlocal contributors.
"""List every malformed entry of the datasets of a config, then exit.

Training stops at the first malformed file of a SODA, MOCS or CIS dataset
(``on_error='raise'``). Run this once after downloading a dataset to see all
of them: each dataset of the config's ``{train,val,test}_dataloader`` is
loaded with ``on_error='skip'`` (no pipeline), and every problem is printed
with its file and entry. The exit status is 1 when anything was malformed.

Examples::

    python tools/data/check_dataset.py \\
        configs/_base_/datasets/soda_detection.py
    python tools/data/check_dataset.py \\
        configs/_base_/datasets/mocs_instance.py \\
        --data-root /datasets/MOCS/ --splits train val
"""
import argparse
import os.path as osp
import sys
import warnings

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import DATASETS, init_default_scope  # noqa: E402

CHECKED_TYPES = ('SODADataset', 'MOCSDataset', 'CISDataset')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='List the malformed entries of the datasets of a config')
    parser.add_argument('config', help='config file with *_dataloader')
    parser.add_argument(
        '--splits',
        nargs='+',
        default=['train', 'val', 'test'],
        help='dataloaders to check (default: train val test)')
    parser.add_argument(
        '--data-root', help='use this data_root for every dataset')
    parser.add_argument(
        '--no-image-check',
        action='store_true',
        help='do not check that every image exists (faster)')
    parser.add_argument(
        '--max-print',
        type=int,
        default=50,
        help='print at most this many problems per dataset (default: 50)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, xxx=yyy format')
    return parser.parse_args(argv)


def leaf_datasets(cfg):
    """The dataset configs inside wrappers (``dataset``/``datasets`` keys)."""
    if 'dataset' in cfg:
        return leaf_datasets(cfg['dataset'])
    if 'datasets' in cfg:
        return [leaf for sub in cfg['datasets'] for leaf in leaf_datasets(sub)]
    return [cfg]


def check(dataset_cfg, args):
    """Load one dataset with ``on_error='skip'``.

    Returns:
        tuple[int, list[str]]: Number of loaded images and the problems.
    """
    dataset_cfg = dict(
        dataset_cfg, on_error='skip', pipeline=[], lazy_init=False)
    dataset_cfg.pop('filter_cfg', None)  # count images the filter would drop
    if args.data_root is not None:
        dataset_cfg['data_root'] = args.data_root
    if args.no_image_check:
        dataset_cfg['check_image_exists'] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        dataset = DATASETS.build(dataset_cfg)
    problems = [
        str(w.message) for w in caught if issubclass(w.category, UserWarning)
        and 'on_error="skip"' in str(w.message)
    ]
    return len(dataset), problems


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))

    num_problems, seen = 0, set()
    for split in args.splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            print(f'{split}: no {split}_dataloader in the config')
            continue
        for dataset_cfg in leaf_datasets(loader['dataset']):
            dataset_cfg = dataset_cfg.to_dict() if hasattr(
                dataset_cfg, 'to_dict') else dict(dataset_cfg)
            name = str(dataset_cfg.get('type', '')).split('.')[-1]
            key = (name, dataset_cfg.get('ann_file'), args.data_root
                   or dataset_cfg.get('data_root'))
            if name not in CHECKED_TYPES:
                print(f'{split}: {name} is not an mmlocal checked dataset, '
                      'skipped')
                continue
            if key in seen:  # e.g. test_dataloader = val_dataloader
                continue
            seen.add(key)
            where = f'{split}: {name} {osp.join(key[2] or "", key[1] or "")}'
            try:
                num_images, problems = check(dataset_cfg, args)
            except (ValueError, FileNotFoundError) as err:
                # a file-level problem: nothing of this dataset loads
                print(f'{where}: cannot be loaded: {err}')
                num_problems += 1
                continue
            num_problems += len(problems)
            print(f'{where}: {num_images} images loaded, {len(problems)} '
                  'malformed entries')
            for problem in problems[:args.max_print]:
                print(f'  {problem}')
            if len(problems) > args.max_print:
                print(f'  ... and {len(problems) - args.max_print} more')
    return 1 if num_problems else 0


if __name__ == '__main__':
    sys.exit(main())
