"""Early checks of a training/testing config, before the Runner is built.

mmengine builds datasets lazily, so a wrong ``data_root`` or ``ann_file``
would otherwise surface only after the model is built and weights are
initialised, as a bare ``FileNotFoundError`` from deep inside a dataset.
"""
import os.path as osp

_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def _is_url(path):
    return '://' in str(path)


def _dataset_cfgs(dataset, prefix):
    """Yield ``(option_path, dataset_cfg)`` through dataset wrappers."""
    if dataset is None:
        return
    if isinstance(dataset, (list, tuple)):
        for i, d in enumerate(dataset):
            yield from _dataset_cfgs(d, f'{prefix}[{i}]')
        return
    if not hasattr(dataset, 'get'):
        return
    yield prefix, dataset
    if dataset.get('dataset') is not None:  # RepeatDataset, ClassBalanced...
        yield from _dataset_cfgs(dataset['dataset'], f'{prefix}.dataset')
    if dataset.get('datasets') is not None:  # ConcatDataset
        yield from _dataset_cfgs(dataset['datasets'], f'{prefix}.datasets')


def check_data_paths(cfg, loaders=_LOADERS):
    """Fail early when a dataset's ``data_root`` or ``ann_file`` is missing.

    Args:
        cfg (mmengine.Config): The full config.
        loaders (Sequence[str]): Dataloader keys to check; absent or ``None``
            loaders are skipped.

    Raises:
        FileNotFoundError: Naming the config option and the path.
    """
    for key in loaders:
        loader = cfg.get(key)
        if not loader:
            continue
        for option, dataset in _dataset_cfgs(loader.get('dataset'),
                                             f'{key}.dataset'):
            data_root = dataset.get('data_root')
            if data_root and not _is_url(data_root) \
                    and not osp.isdir(data_root):
                raise FileNotFoundError(
                    f'{option}.data_root={data_root!r} is not a directory. '
                    'Prepare the dataset or fix the path (e.g. with '
                    f'--cfg-options {option}.data_root=PATH).')
            ann_file = dataset.get('ann_file')
            if ann_file and not _is_url(ann_file):
                path = ann_file
                if data_root and not osp.isabs(ann_file):
                    path = osp.join(data_root, ann_file)
                # mmseg datasets may leave ann_file empty or use a folder
                if not osp.exists(path):
                    raise FileNotFoundError(
                        f'{option}.ann_file={ann_file!r} not found '
                        f'(looked for {path!r}).')
