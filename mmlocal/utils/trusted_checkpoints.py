"""Import this module to load *trusted* local checkpoints with torch >= 2.6.

For stock mmdet/mmseg tools::

    custom_imports = dict(imports=['mmlocal.utils.trusted_checkpoints'])

See :mod:`mmlocal.utils.checkpoint` for why and what it changes.
"""
from .checkpoint import enable_trusted_checkpoints

enable_trusted_checkpoints()
