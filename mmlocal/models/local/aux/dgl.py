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

    where ``sg`` stops the gradient. DGL's ImageNet auxiliary ("MLP-SR",
    ``auxillary_classifier2`` in ``eugenium/DGL``) average-pools the
    feature to a quarter of its height and width, applies ``n``
    (``--nlin``, default 3) 1x1 conv + BN + ReLU layers at the **input
    width**, pools to 2x2 and classifies with an MLP. For dense tasks the
    spatial map is kept (a detector/segmentor head needs it): ``y`` =
    ``num_convs`` x [1x1 conv + BN + ReLU] of ``h``, optionally after an
    average pool by ``pool``; the task head then gives the loss. No
    reconstruction term. The defaults (2 layers of 128 channels) keep the
    aux net light on a full-resolution detector feature (the reference
    convolves a 4x pooled map); ``num_convs=3, channels=None, pool=4`` is
    the reference's layer stack.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        channels (int, optional): Width of the 1x1 convs; None = the
            module's output width (the reference). Default 128.
        num_convs (int): Number of 1x1 conv layers (0 = none). Default 2
            (reference: 3).
        pool (int): Average-pooling factor before the convs (1 = none;
            reference: 4, an adaptive pool to a quarter of the size).
    """

    def __init__(self, module_info, channels=128, num_convs=2, pool=1,
                 **kwargs):
        if channels is not None and (isinstance(channels, bool) or
                                     not isinstance(channels, int)
                                     or channels < 1):
            raise ValueError(f'channels={channels!r} must be a positive int '
                             'or None (the input width)')
        if isinstance(num_convs, bool) or not isinstance(
                num_convs, int) or num_convs < 0:
            raise ValueError(f'num_convs={num_convs!r} must be an int >= 0')
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f'pool={pool!r} must be an int >= 1')
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
        width = in_ch if self.channels is None else self.channels
        for _ in range(self.num_convs):
            layers.append(
                ConvModule(in_ch, width, 1, norm_cfg=dict(type='BN')))
            in_ch = width
        self.mlp = nn.Sequential(*layers)
        return in_ch, module_info.stride * self.pool

    def transform(self, h):
        return self.mlp(h)
