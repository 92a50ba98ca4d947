from .det_head import DetAuxHead
from .recon_decoder import ReconDecoder
from .seg_head import SegAuxHead

__all__ = ['DetAuxHead', 'ReconDecoder', 'SegAuxHead']
