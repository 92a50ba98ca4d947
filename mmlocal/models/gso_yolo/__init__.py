from .backbone import YOLOv8CSPDarknet
from .c2f import C2f, C2fBottleneck
from .gom import GAMAttention
from .head import YOLOv8Head
from .neck import YOLOv8PAFPN
from .scm import EMAttention
from .sppf import SPPF

__all__ = [
    'YOLOv8CSPDarknet', 'YOLOv8PAFPN', 'YOLOv8Head', 'GAMAttention',
    'EMAttention', 'C2f', 'C2fBottleneck', 'SPPF'
]
