# Copyright (c) mmlocal contributors.
from .cis import CISDataset
from .mocs import MOCSDataset
from .soda import SODADataset

__all__ = ['CISDataset', 'MOCSDataset', 'SODADataset']
