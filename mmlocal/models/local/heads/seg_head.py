import copy

import torch.nn as nn
from mmengine.model import BaseModule

from mmlocal.models.losses.sync_free_losses import sync_free_loss
from mmlocal.registry import MODELS
from mmlocal.utils.compile import CompiledMethods, check_compile_option


@MODELS.register_module()
class SegAuxHead(BaseModule):
    """FCN-style local segmentation head (InfoPro's Cityscapes design).

    InfoPro (Wang et al., ICLR 2021) trains its first DeepLabV3 module with
    ``Conv3x3 -> BN -> ReLU -> Dropout2d(0.1) -> Conv1x1`` on the module's
    feature and a pixel-wise cross-entropy (ignore index 255) on logits
    upsampled to the label size. That is mmseg's ``FCNHead`` with one conv,
    which is built here so mmseg's loss, resizing and ignore handling apply.

    Args:
        in_channels (int): Channels of ``y``.
        num_classes (int): Number of classes of the segmentor.
        channels (int): Width of the conv. Default 256, the width of mmseg's
            own FCN auxiliary head in its DeepLabV3 configs (InfoPro's
            ``head_inter``: 512).
        head (dict, optional): Overrides for the mmseg head config.
        norm_cfg (dict): Norm config. Default BN.
        align_corners (bool): Of the resize of the logits to the label.
            Default False, as mmseg's decode heads (InfoPro: True).
        ignore_index (int): Ignored label. Default 255.
        compile (bool | dict): Run the head's convs under ``torch.compile``
            (:mod:`mmlocal.utils.compile`); the loss stays eager. Default
            False.

    Stock ``mmseg.CrossEntropyLoss`` terms are used as
    :class:`~mmlocal.models.losses.SyncFreeCrossEntropyLoss` (same value and
    gradient, no host read of the non-ignored pixel count).
    """

    def __init__(self,
                 in_channels,
                 num_classes,
                 channels=256,
                 head=None,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 align_corners=False,
                 ignore_index=255,
                 compile=False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        # the head's forward (convs) under torch.compile
        self.compiled = CompiledMethods(
            check_compile_option(compile, cudagraphs=False))
        cfg = dict(
            type='mmseg.FCNHead',
            in_channels=in_channels,
            in_index=0,
            channels=channels,
            num_convs=1,
            concat_input=False,
            dropout_ratio=0.1,
            num_classes=num_classes,
            norm_cfg=norm_cfg,
            align_corners=align_corners,
            ignore_index=ignore_index,
            loss_decode=dict(
                type='mmseg.CrossEntropyLoss', use_sigmoid=False,
                loss_weight=1.0, avg_non_ignore=True))
        cfg.update(copy.deepcopy(head or {}))
        cfg.setdefault('_scope_', 'mmseg')
        self.head = MODELS.build(cfg)
        # mmseg's avg_non_ignore cross-entropy counts pixels with .item()
        if isinstance(self.head.loss_decode, nn.ModuleList):
            self.head.loss_decode = nn.ModuleList(
                sync_free_loss(loss) for loss in self.head.loss_decode)
        else:
            self.head.loss_decode = sync_free_loss(self.head.loss_decode)

    def loss(self, y, inputs, data_samples, groups=1):
        """Segmentation losses of ``y``. ``groups > 1``: the batch holds
        ``groups`` interleaved groups (image ``i`` in group ``i % groups``:
        HPFF's stacked patches); each term is the mean over the groups of
        the loss each group would get alone."""
        # mmseg's BaseDecodeHead.loss: forward, then loss_by_feat
        seg_logits = self.compiled(self.head, 'forward', [y])
        if groups == 1:
            losses = self.head.loss_by_feat(seg_logits, data_samples)
            # accuracy is a metric, not a loss: keep it out of the sum
            return {k: v for k, v in losses.items() if k.startswith('loss')}
        losses = {}
        for g in range(groups):
            part = self.head.loss_by_feat(seg_logits[g::groups],
                                          data_samples[g::groups])
            for name, value in part.items():
                if name.startswith('loss'):
                    losses[name] = losses.get(name, 0.) + value / groups
        return losses
