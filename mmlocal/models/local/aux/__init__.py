from .base import BaseLocalAux, LocalModuleInfo, interpolate_weight
from .dgl import DGLAux
from .infopro import InfoProAux
from .momentum import MomentumAux

__all__ = [
    'BaseLocalAux', 'LocalModuleInfo', 'interpolate_weight', 'DGLAux',
    'InfoProAux', 'MomentumAux'
]
