"""Loading trusted checkpoints with torch >= 2.6.

torch 2.6 changed ``torch.load``'s default to ``weights_only=True``. mmengine
0.10.7 calls ``torch.load`` without the argument, and the checkpoints its
Runner writes hold more than tensors (``message_hub`` with
``HistoryBuffer`` objects, numpy scalars, ``builtins.getattr``), so
``--resume`` and ``load_from`` fail with an ``UnpicklingError``.
Allow-listing those globals is not an option: it would have to include
``builtins.getattr``, which defeats the point of ``weights_only``.

What mmlocal does instead: it replaces mmengine's loader for **local files**
(the scheme with the empty prefix) by one that passes ``weights_only=False``.
A full unpickle can run code stored in the file, so this is only right for
checkpoints you trust - your own training runs and files you downloaded from
a source you trust. Remote schemes (``http://``, ``torchvision://``, ...)
keep mmengine's behaviour.

``mmlocal``'s ``tools/train.py`` and ``tools/test.py`` enable it; set
``MMLOCAL_WEIGHTS_ONLY=1`` to keep torch's safe default instead. From a stock
mmdet/mmseg tool, enable it with
``custom_imports = dict(imports=['mmlocal.utils.trusted_checkpoints'])``.
"""
import os
import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader

_ENABLED = False


def load_trusted_local_checkpoint(filename, map_location=None):
    """Load a local checkpoint file with a full unpickle (trusted files only).

    Args:
        filename (str): Path of the checkpoint file.
        map_location (str | torch.device, optional): As in ``torch.load``.

    Returns:
        dict | OrderedDict: The loaded checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file {filename!r} does not exist')
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=False)
    except Exception as exc:  # corrupt, truncated or not a checkpoint
        raise RuntimeError(
            f'cannot read checkpoint {filename!r}: {type(exc).__name__}: '
            f'{exc}') from exc


def trusted_checkpoints_enabled():
    """Whether :func:`enable_trusted_checkpoints` is in effect."""
    return _ENABLED


def enable_trusted_checkpoints(force=False):
    """Make mmengine load local checkpoints with ``weights_only=False``.

    Does nothing when the environment variable ``MMLOCAL_WEIGHTS_ONLY=1`` is
    set, unless ``force`` is true.

    Returns:
        bool: Whether trusted loading is enabled after the call.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if os.environ.get('MMLOCAL_WEIGHTS_ONLY', '0') == '1' and not force:
        return False
    # '' is the prefix mmengine uses for local paths.
    CheckpointLoader.register_scheme(prefixes='', force=True)(
        load_trusted_local_checkpoint)
    _ENABLED = True
    return True
