import torch.nn as nn
from mmcv.cnn import ConvModule, build_activation_layer
from mmdet.utils import ConfigType, OptMultiConfig
from mmengine.model import BaseModule
from torch import Tensor

from mmlocal.registry import MODELS


@MODELS.register_module()
class GAMAttention(BaseModule):
    r"""Global Attention Mechanism (GAM), the block of GSO-YOLO's Global
    Optimization Module (GOM).

    GSO-YOLO (Zhang et al., arXiv 2407.00906) places GOM before the SPPF of
    its YOLOv8 backbone to fuse global and local features with GAM (Liu et
    al., `Global Attention Mechanism: Retain Information to Enhance
    Channel-Spatial Interactions <https://arxiv.org/abs/2112.05561>`_).
    Channel attention runs an MLP over the channel vector of every position
    (the input permuted to (B, HW, C)); spatial attention two 7x7 convs
    that keep all channels (no pooling, unlike CBAM):

    .. math::
        M_c(F) = \sigma\big(W_2\,\delta(W_1 F^{\top})\big), \quad
        F_2 = M_c(F_1) \otimes F_1

    .. math::
        M_s(F) = \sigma\big(\mathrm{BN}(\mathrm{Conv}_{7\times7}^{C/r\to C}
            (\delta(\mathrm{BN}(\mathrm{Conv}_{7\times7}^{C\to C/r}(F)))))
            \big), \quad
        F_3 = M_s(F_2) \otimes F_2

    with :math:`W_1: C \to C/r`, :math:`W_2: C/r \to C`, :math:`\delta` the
    ReLU and :math:`\sigma` the sigmoid; the output has the input's shape.

    Args:
        channels (int): Channels of the input (and output).
        reduction (int): MLP and spatial-conv reduction ``r``.
            Defaults to 4.
        kernel_size (int): Kernel of the spatial convs. Defaults to 7.
        groups (int): Groups of the spatial convs; GAM's paper uses group
            convolutions to cut their cost on wide features. Defaults to 1.
        norm_cfg (dict): Norm of the spatial convs. Defaults to BN.
        act_cfg (dict): Activation of the MLP and between the spatial
            convs. Defaults to ReLU.
        init_cfg (dict or list[dict], optional): Initialization config.
    """

    def __init__(self,
                 channels: int,
                 reduction: int = 4,
                 kernel_size: int = 7,
                 groups: int = 1,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: ConfigType = dict(type='ReLU'),
                 init_cfg: OptMultiConfig = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(reduction, int) or reduction < 1 \
                or channels // reduction < 1:
            raise ValueError(f'reduction={reduction!r} must be an int in '
                             f'[1, channels={channels}]')
        hidden = channels // reduction
        if groups < 1 or channels % groups or hidden % groups:
            raise ValueError(
                f'groups={groups!r} must divide channels={channels} and '
                f'channels // reduction={hidden}')
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size={kernel_size!r} must be odd')
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden), build_activation_layer(act_cfg),
            nn.Linear(hidden, channels))
        self.spatial_conv1 = ConvModule(
            channels,
            hidden,
            kernel_size,
            padding=kernel_size // 2,
            groups=groups,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)
        self.spatial_conv2 = ConvModule(
            hidden,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=groups,
            norm_cfg=norm_cfg,
            act_cfg=None)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        channel_att = self.channel_mlp(tokens).transpose(1, 2)
        x = x * channel_att.reshape(b, c, h, w).sigmoid()
        spatial_att = self.spatial_conv2(self.spatial_conv1(x))
        return x * spatial_att.sigmoid()
