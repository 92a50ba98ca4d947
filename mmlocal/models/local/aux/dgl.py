import torch.nn as nn
from mmcv.cnn import ConvModule

from mmlocal.registry import MODELS
from .base import BaseLocalAux


@MODELS.register_module()
class DGLAux(BaseLocalAux):
    """Decoupled Greedy Learning auxiliary net (Belilovsky et al., ICML 2020).

    Each module k is trained only by a supervised loss on its own output:

    .. math::  \\theta_k \\leftarrow \\theta_k - \\eta \\nabla_{\\theta_k}
               \\mathcal{L}_{task}(g_k(h_k), y),\\quad
               h_k = f_k(\\mathrm{sg}(h_{k-1}))

    where ``sg`` stops the gradient. DGL's ImageNet auxiliary ("MLP-SR")
    spatially averages the feature, applies ``n`` 1x1 conv + BN + ReLU
    layers, then classifies. For dense tasks the spatial map is kept (a
    detector/segmentor head needs it): ``y`` = ``num_convs`` x [1x1 conv +
    BN + ReLU] of ``h``, optionally after an average pool by ``pool``; the
    task head then gives the loss. No reconstruction term.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        channels (int): Width of the 1x1 convs. Default 128.
        num_convs (int): Number of 1x1 conv layers. Default 2.
        pool (int): Average-pooling factor before the convs (1 = none).
    """

    def __init__(self, module_info, channels=128, num_convs=2, pool=1,
                 **kwargs):
        self.channels = channels
        self.num_convs = num_convs
        self.pool = pool
        kwargs.setdefault('recon_weight', None)
        super().__init__(module_info, **kwargs)

    def build_transform(self, module_info):
        layers = []
        if self.pool > 1:
            layers.append(nn.AvgPool2d(self.pool, ceil_mode=True))
        in_ch = module_info.in_channels
        for _ in range(self.num_convs):
            layers.append(
                ConvModule(in_ch, self.channels, 1, norm_cfg=dict(type='BN')))
            in_ch = self.channels
        self.mlp = nn.Sequential(*layers)
        return in_ch, module_info.stride * self.pool

    def transform(self, h):
        return self.mlp(h)
