"""mmlocal: memory- and parameter-efficient training for mmdet and mmseg.

Importing this package is deliberately cheap: the registries in
:mod:`mmlocal.registry` import model code lazily (mmengine ``locations``), so
``type='mmlocal.X'`` works from any mmdet or mmseg config without
``custom_imports``.
"""
from .version import __version__, version_info

__all__ = ['__version__', 'version_info']
