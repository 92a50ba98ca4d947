from .repl_backbone import (RepLBackbone, fold_repl_state_dict,
                            stock_model_cfg)
from .transforms import (BaseRepLTransform, RepLChannelMix, RepLLowRankMix,
                         RepLScalarMix)

__all__ = [
    'RepLBackbone', 'BaseRepLTransform', 'RepLScalarMix', 'RepLChannelMix',
    'RepLLowRankMix', 'fold_repl_state_dict', 'stock_model_cfg'
]
