import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch.utils.weak import WeakIdKeyDictionary

from mmlocal.registry import MODELS
from mmlocal.utils.compile import CompiledMethods, check_compile_option


# per image tensor (while it lives): pooled targets (ReconDecoder.target)
_TARGETS = WeakIdKeyDictionary()


def padding_mask(data_samples, inputs):
    """``(N, 1, H, W)`` mask of the pixels of ``inputs`` that are image, not
    the bottom/right padding the data preprocessor added to batch images of
    different sizes (``img_shape`` of each sample), or None when no sample
    is padded. Built on the device from Python ints (no host read)."""
    height, width = inputs.shape[-2:]
    shapes = []
    for sample in data_samples or ():
        shape = getattr(sample, 'metainfo', {}).get('img_shape')
        h, w = (height, width) if shape is None else shape[:2]
        shapes.append((min(int(h), height), min(int(w), width)))
    if len(shapes) != inputs.shape[0] or all(
            shape == (height, width) for shape in shapes):
        return None
    mask = inputs.new_zeros(inputs.shape[0], 1, height, width)
    for i, (h, w) in enumerate(shapes):
        mask[i, :, :h, :w] = 1
    return mask


@MODELS.register_module()
class ReconDecoder(BaseModule):
    """Image-reconstruction decoder of InfoPro (Wang et al., ICLR 2021).

    ``L_recons = BCE(sigmoid(D(y)), x_img)``, where ``x_img`` is the
    un-normalised input image in [0, 1]. A 1x1 projection to ``channels``
    (+ BN + ReLU), then ``x2 upsample -> 3x3 conv -> BN -> ReLU`` stages and
    a 3x3 conv to 3 channels.

    - Default layout: one stage per factor 2 between ``stride`` and
      ``out_stride``, widths halving from ``channels`` (at least 16), and the
      3x3 conv to RGB at the output resolution.
    - InfoPro's layout (its ImageNet ``Decoder`` and Cityscapes
      ``decoder_inter``: 128 -> 32 -> 12 -> 3 from stride 8, upsampling with
      ``align_corners=True``): ``widths=(32, 12), final_upsample=True,
      align_corners=True, out_stride=1`` at ``stride=8``. With
      ``final_upsample`` the last x2 upsample is followed directly by the
      conv to RGB, so there is one stage fewer.

    Convs followed by BN have no bias (InfoPro's have one, which BN's batch
    mean cancels in training).

    Deviation: the target is the image at ``1 / out_stride`` of the input
    resolution (average-pooled), not full resolution, so that the decoder's
    activations do not dominate a detector's memory at 800x1333 inputs;
    ``out_stride=1`` gives InfoPro's full-resolution target. Padding the
    data preprocessor added to a batch (``valid`` in :meth:`loss`) is left
    out of the target and of the mean; InfoPro trains on fixed-size crops,
    which have none.

    Args:
        in_channels (int): Channels of ``y``.
        stride (int): Stride of ``y``.
        out_stride (int): Stride of the reconstructed image. Default 4.
        channels (int): Width after the projection. Default 128.
        widths (Sequence[int], optional): Widths of the upsampling stages
            (one per stage). Default None: halving from ``channels``.
        final_upsample (bool): End with ``x2 upsample -> 3x3 conv to RGB``
            (InfoPro) instead of a conv-BN-ReLU stage and the conv to RGB.
            Default False.
        align_corners (bool): Of the bilinear upsampling. Default False
            (InfoPro: True).
        compile (bool | dict): Run :meth:`forward` under ``torch.compile``
            (:mod:`mmlocal.utils.compile`); the loss stays eager. Default
            False.
    """

    def __init__(self, in_channels, stride, out_stride=4, channels=128,
                 widths=None, final_upsample=False, align_corners=False,
                 norm_cfg=dict(type='BN'), compile=False, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        # the decoder's forward (convs) under torch.compile
        self.compiled = CompiledMethods(
            check_compile_option(compile, cudagraphs=False))
        if out_stride > stride or stride % out_stride:
            raise ValueError(f'out_stride={out_stride} must divide the '
                             f'feature stride {stride}')
        # x2 steps (a remaining factor is covered by resizing in loss())
        num_up = int(math.log2(stride // out_stride))
        if final_upsample and num_up == 0:
            raise ValueError('final_upsample=True needs out_stride < stride '
                             f'(got {out_stride}, {stride})')
        num_stages = num_up - int(bool(final_upsample))
        if widths is None:
            widths, width = [], channels
            for _ in range(num_stages):
                width = max(width // 2, 16)
                widths.append(width)
        elif len(widths) != num_stages or not all(
                isinstance(w, int) and w > 0 for w in widths):
            last = ', the last x2 going straight to the RGB conv' \
                if final_upsample else ''
            raise ValueError(
                f'widths={widths!r} must be {num_stages} positive ints (one '
                f'per upsampling stage from stride {stride} to '
                f'{out_stride}{last})')
        self.out_stride = out_stride
        self.align_corners = align_corners
        self.proj = ConvModule(in_channels, channels, 1, norm_cfg=norm_cfg)
        ups = []
        width = channels
        for nxt in widths:
            ups += [self._upsample(),
                    ConvModule(width, nxt, 3, padding=1, norm_cfg=norm_cfg)]
            width = nxt
        if final_upsample:
            ups.append(self._upsample())
        self.ups = nn.Sequential(*ups)
        self.to_rgb = nn.Conv2d(width, 3, 3, padding=1)

    def _upsample(self):
        return nn.Upsample(scale_factor=2, mode='bilinear',
                           align_corners=self.align_corners)

    def forward(self, y):
        return self.to_rgb(self.ups(self.proj(y)))

    def target(self, image01, valid=None, groups=1):
        """``(target, weight)`` of :meth:`loss`: the image pooled to
        ``out_stride`` (over image pixels only with ``valid``), in [0, 1],
        fp32, and the pooled ``valid`` divided by what :meth:`loss`
        averages over (or None). Made once per ``image01`` tensor,
        ``valid``, ``groups`` and ``out_stride``: decoders of several
        modules given the same image share it."""
        per_image = _TARGETS.get(image01)
        if per_image is None:
            per_image = _TARGETS[image01] = {}
        key = (self.out_stride, groups, None if valid is None else id(valid))
        if key not in per_image:  # (valid kept: its id stays valid)
            target, weight = self._make_target(image01, valid)
            if weight is not None:
                weight = self._normalise(weight, groups, target.shape[1])
            per_image[key] = (target, weight, valid)
        return per_image[key][:2]

    @staticmethod
    def _normalise(weight, groups, channels):
        """``weight / (channels * sum(weight))``, the sum per group of the
        sample-major batch (entries ``g, g + G, ...``) and divided by
        ``G`` with ``groups``: the weighted sum of the BCE is then its
        mean over image pixels (of each group, averaged)."""
        n = weight.shape[0] // groups
        total = weight.reshape(n, groups, -1).sum((0, 2)).clamp(min=1e-6)
        scale = (1.0 / (total * channels * groups)).repeat(n)
        return weight * scale.view(-1, 1, 1, 1)

    def _make_target(self, image01, valid):
        target, weight = image01, valid
        if self.out_stride > 1:
            if valid is None:
                target = F.avg_pool2d(target, self.out_stride, ceil_mode=True)
            else:
                weight = F.avg_pool2d(valid, self.out_stride, ceil_mode=True)
                target = F.avg_pool2d(
                    image01 * valid, self.out_stride,
                    ceil_mode=True) / weight.clamp(min=1e-6)
        target = target.float().clamp(0, 1)
        return target, None if weight is None else weight.float()

    def loss(self, y, image01, valid=None, groups=1):
        """BCE between the decoded image and ``image01`` (N, 3, H, W).

        Args:
            valid (Tensor, optional): ``(N, 1, H, W)``, 1 on image pixels and
                0 on batch padding (:func:`padding_mask`); those pixels are
                left out of the target (pooled over image pixels only) and
                of the mean. None: every pixel counts.
            groups (int): The batch is ``groups`` interleaved groups of
                equal-sized images (entries ``g, g + G, ...``; PFF's
                stacked patches): with ``valid``, the mean over image
                pixels is taken per group and the groups' means averaged
                (without ``valid`` that is the plain mean). Default 1.
        """
        logits = self.compiled(self, 'forward', y)
        target, weight = self.target(image01, valid, groups)
        if target.shape[-2:] != logits.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:],
                                   mode='bilinear',
                                   align_corners=self.align_corners)
        # logits version of BCE(sigmoid(.)) is the numerically safe one
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if weight is None:
                return F.binary_cross_entropy_with_logits(
                    logits.float(), target)
            # weight: normalised once per target (see target())
            return F.binary_cross_entropy_with_logits(
                logits.float(), target, reduction='none').mul(weight).sum()
