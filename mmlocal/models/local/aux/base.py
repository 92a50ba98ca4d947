import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from mmlocal.registry import MODELS
from mmlocal.utils.compile import CompiledMethods, check_compile_option
from ..heads.recon_decoder import padding_mask


# per batch (the preprocessed inputs, while they live): reconstruction
# targets made once for all aux nets (BaseLocalAux.recon_inputs)
_RECON_INPUTS = WeakIdKeyDictionary()


def release_recon_inputs(inputs):
    """Drop the reconstruction targets of the batch ``inputs`` once its
    last aux net has run: otherwise they (a copy of the image batch) live
    as long as ``inputs``, through the last module's phase."""
    _RECON_INPUTS.pop(inputs, None)


@dataclass
class LocalModuleInfo:
    """What an auxiliary network knows about the module it trains.

    Attributes:
        index (int): ``k``, the module index (0-based).
        num_modules (int): ``K``; module ``K-1`` is trained by the model's own
            loss and has no auxiliary network.
        in_channels (int): Channels of the module output ``h_k``.
        stride (int): Stride of ``h_k`` w.r.t. the input image.
        task (str): ``'det'`` or ``'seg'``.
        num_classes (int): Classes of the wrapped model.
        next_block (nn.Module, optional): The first block of module k+1
            (MAN's EMA source); not owned by the aux net.
        next_out_channels, next_stride (int, optional): Its output channels
            and stride.
        img_mean, img_std (Tensor): ``(3, 1, 1)`` normalisation of the
            wrapped model's data preprocessor, to recover the image.
        ignore_index (int): Ignored label of a segmentor.
    """
    index: int
    num_modules: int
    in_channels: int
    stride: int
    task: str
    num_classes: int
    next_block: Optional[nn.Module] = None
    next_out_channels: Optional[int] = None
    next_stride: Optional[int] = None
    img_mean: Optional[torch.Tensor] = None
    img_std: Optional[torch.Tensor] = None
    ignore_index: int = 255
    extra: dict = field(default_factory=dict)


def _drop_counter_on_load(module, state_dict, prefix, *args):
    """A BN layer without step counter ignores one in a checkpoint (older
    checkpoints have it; ``_NormBase`` also adds one to a state dict
    whose metadata is older than version 2, before this hook runs)."""
    state_dict.pop(prefix + 'num_batches_tracked', None)


def drop_bn_step_counters(module, keep=None):
    """Remove the ``num_batches_tracked`` step counter of every BN layer of
    ``module`` that has a ``momentum`` (a layer with ``momentum=None``
    averages with ``1 / num_batches_tracked`` and keeps it).

    The counter is read only where ``momentum`` is None; otherwise it is
    a step count nobody uses, and incrementing it costs one kernel per BN
    layer and training forward (``num_batches_tracked.add_(1)``). An aux
    net is training-only, so its BN layers need no such count. The state
    dict loses the ``*.num_batches_tracked`` keys of these layers;
    checkpoints that have them still load (strict too): the key is
    dropped on load. ``keep``: a submodule whose layers keep theirs (a
    momentum copy, which mirrors its source's buffers).
    """
    kept = set() if keep is None else {id(m) for m in keep.modules()}
    for m in module.modules():
        if id(m) not in kept and isinstance(m, _BatchNorm) and \
                m.track_running_stats and m.momentum is not None and \
                m.num_batches_tracked is not None:
            m.num_batches_tracked = None
            m.register_load_state_dict_pre_hook(_drop_counter_on_load)


def reset_norm(bn):
    """``bn.reset_parameters()``, also for a BN layer without step counter
    (:func:`drop_bn_step_counters`; ``reset_running_stats`` needs it)."""
    if bn.num_batches_tracked is not None or not bn.track_running_stats:
        bn.reset_parameters()
        return
    bn.running_mean.zero_()
    bn.running_var.fill_(1)
    if bn.affine:
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)


def reset_parameters(module):
    """``reset_parameters()`` of every submodule of ``module`` that has one
    (BN layers through :func:`reset_norm`)."""
    for m in module.modules():
        if m is module or not hasattr(m, 'reset_parameters'):
            continue
        if isinstance(m, _BatchNorm):
            reset_norm(m)
        else:
            m.reset_parameters()


def interpolate_weight(weight, index, num_modules):
    """InfoPro's linear schedule of a loss weight across local modules.

    ``lambda_k = v1 * (1 - r) + v2 * r`` with ``r = k / (K - 2)``: ``v1`` at
    the first module, ``v2`` at the last one that has an auxiliary net
    (``K-2``).

    Args:
        weight (float | tuple[float, float]): A constant or ``(v1, v2)``.
    """
    if isinstance(weight, (int, float)):
        return float(weight)
    v1, v2 = weight
    ratio = index / (num_modules - 2) if num_modules > 2 else 0.0
    return float(v1) * (1 - ratio) + float(v2) * ratio


class BaseLocalAux(BaseModule):
    """Base of every auxiliary family: ``y = transform(h)`` -> local loss.

    A family differs from another only in :meth:`build_transform` (what turns
    the module output ``h`` into the auxiliary input ``y``) and in which loss
    terms it weights how; the task-aware heads are shared:

    - detection: :class:`DetAuxHead` (a light dense head with its own priors,
      mmdet assigner and losses) on ``y``;
    - segmentation: :class:`SegAuxHead` (FCN + CE) on ``y``;
    - optionally (InfoPro and its descendants) a :class:`ReconDecoder`.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        task_weight (float | tuple): Weight of the task loss, constant or
            ``(first, last)`` interpolated as InfoPro does. Default 1.
        recon_weight (float | tuple, optional): Weight of the reconstruction
            loss; ``None`` or 0 builds no decoder.
        det_head (dict, optional): Overrides for :class:`DetAuxHead`.
        seg_head (dict, optional): Overrides for :class:`SegAuxHead`.
        recon (dict, optional): Overrides for :class:`ReconDecoder`.
        with_cp (bool): Activation checkpointing *inside* the aux net: the
            transform (each of its blocks where it is a stack), the task
            head and the decoder are separate segments that keep only their
            inputs and are recomputed one at a time during the local
            backward, so module k's step holds its own activations plus the
            largest segment instead of the whole aux net. Same losses and
            gradients; one extra aux forward per step. (BN layers inside a
            segment see the batch twice: their running statistics, which
            the aux net never uses for training, move twice.)
            Default False.
        compile (bool | dict): Run the convolutional parts (the transform,
            the task head's convs, the decoder; static shapes) under
            ``torch.compile`` (:mod:`mmlocal.utils.compile`: ``True`` for
            inductor's defaults; a dict of ``torch.compile`` arguments, not
            ``mode='reduce-overhead'``: CUDA graphs would overwrite one aux
            net's gradients with the next one's). Anchor targets and losses stay eager. Fewer kernel
            launches per step once compiled; values and gradients equal
            up to floating-point reassociation. Not with ``with_cp``.
            Default False.
    """

    def __init__(self,
                 module_info,
                 task_weight=1.0,
                 recon_weight=None,
                 det_head=None,
                 seg_head=None,
                 recon=None,
                 with_cp=False,
                 compile=False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        compile_options = check_compile_option(compile, cudagraphs=False)
        if compile_options is not None and with_cp:
            raise ValueError(f'compile={compile!r} and with_cp=True: choose '
                             'one (checkpointed segments are not compiled)')
        self.compiled = CompiledMethods(compile_options)
        if module_info.task not in ('det', 'seg'):
            raise ValueError(f'unknown task {module_info.task!r}')
        if not isinstance(with_cp, bool):
            raise ValueError(f'with_cp={with_cp!r} must be True or False')
        self.with_cp = with_cp
        self.index = module_info.index
        self.num_modules = module_info.num_modules
        self.task = module_info.task
        self.task_weight = interpolate_weight(task_weight, self.index,
                                              self.num_modules)
        recon_w = interpolate_weight(recon_weight or 0.0, self.index,
                                     self.num_modules)
        self.recon_weight = recon_w
        if module_info.img_mean is not None:
            self.register_buffer('img_mean', module_info.img_mean.clone(),
                                 persistent=False)
            self.register_buffer('img_std', module_info.img_std.clone(),
                                 persistent=False)
            self._norm_key = (tuple(self.img_mean.flatten().tolist()),
                              tuple(self.img_std.flatten().tolist()))
        else:
            self.img_mean = self.img_std = None

        y_channels, y_stride = self.build_transform(module_info)
        if self.task == 'det':
            cfg = dict(type='mmlocal.DetAuxHead', in_channels=y_channels,
                       stride=y_stride, num_classes=module_info.num_classes)
            cfg.update(copy.deepcopy(det_head or {}))
        else:
            cfg = dict(type='mmlocal.SegAuxHead', in_channels=y_channels,
                       num_classes=module_info.num_classes,
                       ignore_index=module_info.ignore_index)
            cfg.update(copy.deepcopy(seg_head or {}))
        cfg.setdefault('compile', compile)
        self.task_head = MODELS.build(cfg)
        self.recon = None
        if recon_w > 0:
            if self.img_mean is None:
                raise ValueError('recon_weight > 0 needs the data '
                                 'preprocessor mean/std of the model')
            rcfg = dict(type='mmlocal.ReconDecoder', in_channels=y_channels,
                        stride=y_stride)
            rcfg.update(copy.deepcopy(recon or {}))
            rcfg.setdefault('compile', compile)
            self.recon = MODELS.build(rcfg)
        # training-only BN layers: no step counter (one kernel fewer each
        # per step; see drop_bn_step_counters); a momentum copy (MAN's
        # EMA) keeps its source's buffers
        drop_bn_step_counters(self, keep=getattr(self, 'ema', None))

    # -- what a family changes -------------------------------------------
    def build_transform(self, module_info):
        """Build the ``h -> y`` transform; return ``(channels, stride)``."""
        return module_info.in_channels, module_info.stride

    def transform(self, h):
        """``y`` from the module output ``h``. Default: ``y = h``."""
        return h

    def before_transform(self):
        """Host-side bookkeeping run eagerly before :meth:`transform` (mode
        switches, warnings): kept out of a compiled ``transform``, whose
        graph it would break or guard. Default: nothing."""

    # -- shared ------------------------------------------------------------
    def segment(self, fn, *args):
        """``fn(*args)``, as a checkpointed segment when ``with_cp`` and a
        gradient will flow through it."""
        if self.with_cp and torch.is_grad_enabled() and any(
                torch.is_tensor(a) and a.requires_grad for a in args):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    #: families whose ``transform`` makes its own segments (a stack of
    #: blocks: one segment each) set this
    transform_segments = False

    def _transform_segments(self):
        return self.transform_segments or \
            type(self).transform is BaseLocalAux.transform  # identity

    def run_stack(self, stack, x):
        """``stack(x)`` for an ``nn.Sequential``, one segment per layer."""
        for layer in stack:
            x = self.segment(layer, x)
        return x

    def image01(self, inputs):
        """The input image back in [0, 1] (InfoPro's reconstruction target)."""
        return (inputs * self.img_std + self.img_mean) / 255.0

    def recon_inputs(self, inputs, data_samples):
        """``(image01(inputs), padding_mask(...))``, made once per batch
        and shared by the aux nets of a learner (same normalisation): the
        decoders of all modules then also share their pooled target."""
        per_batch = _RECON_INPUTS.get(inputs)
        if per_batch is None:
            per_batch = _RECON_INPUTS[inputs] = {}
        key = (self._norm_key, id(data_samples))
        if key not in per_batch:  # (data_samples kept: its id stays valid)
            per_batch[key] = (self.image01(inputs),
                              padding_mask(data_samples, inputs),
                              data_samples)
        return per_batch[key][:2]

    def loss(self, h, inputs, data_samples):
        """Local losses of module ``k`` (already weighted).

        Args:
            h (Tensor): The module output (attached to module k's graph).
            inputs (Tensor): The preprocessed batch (normalised images).
            data_samples (list): mmdet/mmseg data samples with the GT.

        Returns:
            dict[str, Tensor]: loss terms; their sum is back-propagated.
        """
        y = self.aux_input(h)
        losses = self.task_losses(y, inputs, data_samples)
        if self.recon is not None:
            losses['loss_recon'] = self.recon_loss(y, inputs, data_samples)
        return losses

    def aux_input(self, h):
        """``transform(h)`` (compiled, or in checkpointed segments, as the
        options say)."""
        self.before_transform()
        if self.compiled.enabled and \
                type(self).transform is not BaseLocalAux.transform:
            return self.compiled(self, 'transform', h)
        if self._transform_segments():
            return self.transform(h)
        return self.segment(self.transform, h)

    def task_losses(self, y, inputs, data_samples):
        """The task head's loss terms on ``y``, times ``task_weight``."""
        losses = {}
        for name, value in self.segment(self.task_head.loss, y, inputs,
                                        data_samples).items():
            # x * 1.0 is x: no kernel (and no backward one) for weight 1
            losses[name] = value if self.task_weight == 1.0 else \
                value * self.task_weight
        return losses

    def recon_loss(self, y, inputs, data_samples):
        """``recon_weight`` times the decoder's BCE on ``y``."""
        return self.recon_weight * self.segment(
            self.recon.loss, y, *self.recon_inputs(inputs, data_samples))
