from .auglocal import AugLocalAux, pyramid_depth, uniform_layer_indices
from .base import BaseLocalAux, LocalModuleInfo, interpolate_weight
from .cascade import CascadeLocalAux
from .dgl import DGLAux
from .hpff import HPFFAux
from .infopro import InfoProAux
from .mlaan import MLAANAux
from .momentum import MomentumAux

__all__ = [
    'BaseLocalAux', 'LocalModuleInfo', 'interpolate_weight', 'DGLAux',
    'InfoProAux', 'MomentumAux', 'CascadeLocalAux', 'HPFFAux', 'MLAANAux',
    'AugLocalAux', 'uniform_layer_indices', 'pyramid_depth'
]
