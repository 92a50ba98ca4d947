import contextlib
import copy
import functools
import inspect

import torch

from mmlocal.registry import MODELS
from .infopro import InfoProAux
from .pff import (grouped_batch_norm, image_patches, iter_patches,
                  release_patch_layouts, stack_patches)


class LocalLogs(dict):
    """Detached logged terms of a module's local loss; ``total``: the
    loss itself, detached (the learner logs it as ``loss_local{k}``
    instead of summing the terms again), or None."""
    total = None


@contextlib.contextmanager
def _grouped_loss(head, groups):
    """Within the context ``head.loss(...)`` is ``head.loss(...,
    groups=groups)``: each of the ``groups`` interleaved groups of the batch
    normalised alone, the groups averaged."""
    saved = head.__dict__.get('loss')  # a wrapper of the instance's own
    head.loss = functools.partial(
        saved if saved is not None else type(head).loss.__get__(head),
        groups=groups)
    try:
        yield
    finally:
        if saved is None:
            del head.loss
        else:
            head.loss = saved


class CascadeLocalAux(InfoProAux):
    """Base of the two-stream families: independent + cascade local modules.

    HPFF's HiLo (Su et al., ECCV 2024) and MLAAN's multilaminar local
    modules (Zhang et al., AAAI 2025) train module ``k`` with two losses:

    .. math::
        \\mathcal{L}_k = w_x \\, \\mathcal{L}_{ind}(g_k(f_k(sg(h_{k-1}))))
          + w_y \\, \\mathcal{L}_{cas}\\big(a_k(f_k \\circ \\dots \\circ
            f_s(sg(h_{s-1})))\\big),\\qquad s = \\max(0, k - w + 1)

    The **independent** loss (a light task head ``g_k``) reaches module ``k``
    only; the **cascade** loss (InfoPro-style task head + optional
    reconstruction ``a_k``, after the family's :meth:`transform`) reaches the
    ``w = cascade_span`` modules of the window ``s..k``. ``LocalLearner``
    runs the windows (:meth:`LocalLearner._train_cascade_modules`); this
    class computes the two losses on module ``k``'s output and
    back-propagates them to two detached copies of it
    (:meth:`backward_streams`).

    **Patch Feature Fusion** (``patch_grid=P > 1``): the cascade aux input
    is cut into a P x P grid; each patch is processed by the aux net against
    the ground truth of its image region, and the patch losses are averaged
    (``patch_reduction='mean'``): ``L_cas = 1/P^2 sum_p L_cas(a_k(h_p),
    GT_p)``, or summed (``'sum'``, the reference's scale for its
    reconstruction term). By default (``patch_batch=False``) patches are
    processed one after the other and each patch's share is back-propagated
    at once, so the aux net's activations exist for one patch at a time
    (the gradient is that of the reduced loss; :meth:`loss` computes the
    same loss in one graph). ``patch_batch=True`` stacks the ``P^2``
    patches along the batch and runs the cascade aux net once: the same
    losses and gradients (each BN layer normalises every patch group with
    its own statistics, each patch's loss is normalised as if alone) from
    one forward and one backward instead of ``P^2``, at the memory of no
    PFF (all patches' aux activations alive at once).

    What is cut into patches (``patch_parts``): ``'all'`` (default) runs
    the whole cascade aux (task head and decoder) on each patch; ``'recon'``
    only the reconstruction decoder, as the HPFF reference does (its
    classifier sees the whole ``z``): ``L_cas = lambda_2 L_task(c(z)) +
    lambda_1 R_p BCE(D(z_p), x_p)`` with ``R_p`` the patch mean or sum. The
    task head then shares the batch's full-image anchor targets with the
    other aux heads; only the decoder's activations are per patch.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        cascade_span (int): ``w``, modules per cascade window, in
            ``[1, K]``. Default 2.
        independent_weight (float): ``w_x``. Default 0.001 (reference).
        cascade_weight (float): ``w_y``. Default 0.999 (reference).
        independent_det_head (dict, optional): Overrides of the independent
            :class:`DetAuxHead` (default: light, 64 channels, one level at
            stride >= 32; HPFF's reference uses the cascade classifier's
            architecture, its '2c2f' conv head, for both streams).
        independent_seg_head (dict, optional): Overrides of the independent
            :class:`SegAuxHead` (default: light, one 1x1 conv to 64
            channels).
        patch_grid (int): ``P``; 1 = no PFF. Default 1.
        patch_remainder (str): ``'error'`` (P must divide the feature map)
            or ``'uneven'`` (patches differ by at most one row/column).
        patch_reduction (str): ``'mean'`` (default) or ``'sum'`` of the
            patch losses.
        patch_parts (str): ``'all'`` (default): task head and decoder on
            the patches; ``'recon'``: only the decoder (the reference's
            PFF), the task head on the whole input. A family without
            decoder (``recon_weight`` 0 at module k) then cuts nothing.
        patch_batch (bool): Run the ``P^2`` patches as one stacked batch
            (fewer kernel launches, no PFF memory saving) instead of one
            after the other; patches of unequal size (``'uneven'``) as one
            stack per size (up to 4). With ``patch_parts='all'`` it needs
            task heads whose ``loss`` takes ``groups``
            (:class:`DetAuxHead`, :class:`SegAuxHead`); always
            neither ``with_cp`` nor ``compile``. Default False.
        **kwargs: :class:`InfoProAux` options of the cascade aux
            (``recon_weight``, ``task_weight``, heads).
    """

    def __init__(self,
                 module_info,
                 cascade_span=2,
                 independent_weight=0.001,
                 cascade_weight=0.999,
                 independent_det_head=None,
                 independent_seg_head=None,
                 patch_grid=1,
                 patch_remainder='error',
                 patch_reduction='mean',
                 patch_parts='all',
                 patch_batch=False,
                 **kwargs):
        num_modules = module_info.num_modules
        if isinstance(cascade_span, bool) or not isinstance(
                cascade_span, int) or not 1 <= cascade_span <= num_modules:
            raise ValueError(
                f'cascade_span={cascade_span!r} must be an int in [1, K] '
                f'(K={num_modules} modules)')
        if isinstance(patch_grid, bool) or not isinstance(
                patch_grid, int) or patch_grid < 1:
            raise ValueError(f'patch_grid={patch_grid!r} must be an int '
                             '>= 1 (1 = no patch feature fusion)')
        if patch_remainder not in ('error', 'uneven'):
            raise ValueError(f"patch_remainder={patch_remainder!r} must be "
                             "'error' or 'uneven'")
        if patch_reduction not in ('mean', 'sum'):
            raise ValueError(f"patch_reduction={patch_reduction!r} must be "
                             "'mean' or 'sum'")
        if patch_parts not in ('all', 'recon'):
            raise ValueError(f"patch_parts={patch_parts!r} must be 'all' "
                             "or 'recon'")
        if not isinstance(patch_batch, bool):
            raise ValueError(f'patch_batch={patch_batch!r} must be a bool')
        for name, value in (('independent_weight', independent_weight),
                            ('cascade_weight', cascade_weight)):
            if not value >= 0:
                raise ValueError(f'{name}={value} must be >= 0')
        self.cascade_span = cascade_span
        self.independent_weight = float(independent_weight)
        self.cascade_weight = float(cascade_weight)
        self.patch_grid = patch_grid
        self.patch_remainder = patch_remainder
        self.patch_reduction = patch_reduction
        self.patch_parts = patch_parts
        self.patch_batch = patch_batch
        self.in_stride = module_info.stride
        super().__init__(module_info, **kwargs)
        if patch_batch and patch_grid > 1:
            if self.with_cp:
                raise ValueError('patch_batch=True does not support '
                                 'with_cp=True (the recomputed segments '
                                 'would normalise the patches together)')
            compiled = getattr(self, 'compiled', None)
            if getattr(compiled, 'enabled', False):
                raise ValueError('patch_batch=True does not support '
                                 'compile (the compiled graphs would not '
                                 'see the per-patch BN statistics)')
            if patch_parts == 'all' and 'groups' not in inspect.signature(
                    self.task_head.loss).parameters:
                raise ValueError(
                    'patch_batch=True needs a task head whose loss takes '
                    f'`groups`; {type(self.task_head).__name__} does not')
        if self.task == 'det':
            cfg = dict(type='mmlocal.DetAuxHead',
                       in_channels=module_info.in_channels,
                       stride=module_info.stride,
                       num_classes=module_info.num_classes,
                       feat_channels=64, num_levels=1, min_stride=32)
            cfg.update(copy.deepcopy(independent_det_head or {}))
        else:
            cfg = dict(type='mmlocal.SegAuxHead',
                       in_channels=module_info.in_channels,
                       num_classes=module_info.num_classes,
                       ignore_index=module_info.ignore_index, channels=64,
                       head=dict(kernel_size=1))
            cfg.update(copy.deepcopy(independent_seg_head or {}))
        self.independent_head = MODELS.build(cfg)

    # -- the two streams ---------------------------------------------------
    def independent_loss(self, h, inputs, data_samples):
        """Task loss of the light head on module k's own output."""
        return self.segment(self.independent_head.loss, h, inputs,
                            data_samples)

    def cascade_loss(self, h, inputs, data_samples):
        """InfoPro-style loss on ``transform(h)`` (``h``: window output)."""
        return InfoProAux.loss(self, h, inputs, data_samples)

    def patches(self, h, inputs, data_samples):
        """The PFF grid over ``h``: ``(h_p, inputs_p, samples_p)``."""
        return list(iter_patches(h, inputs, data_samples, self.patch_grid,
                                 self.in_stride, self.task,
                                 self.patch_remainder))

    def stacked_patches(self, h, inputs, data_samples):
        """The PFF grid stacked along the batch, one stack per patch size
        (:func:`stack_patches`)."""
        return stack_patches(h, inputs, data_samples, self.patch_grid,
                             self.in_stride, self.task, self.patch_remainder)

    @property
    def _patch_scale(self):
        """Factor of each patch's loss: ``1/P^2`` (mean) or 1 (sum)."""
        return 1.0 / self.patch_grid**2 if self.patch_reduction == 'mean' \
            else 1.0

    def batched_cascade_loss(self, stacks):
        """The cascade loss of the stacked patches (:meth:`stacked_patches`),
        reduced over the patches (``patch_reduction``).

        Each stack of ``G_s`` equal-sized patches runs the aux net once:
        every BN layer normalises each patch with its own statistics and
        each patch's task loss is normalised alone (the heads' ``groups``),
        and the reconstruction BCE, a mean over equal-sized patches, is the
        mean of theirs; so the result equals the reduced per-patch losses
        of :meth:`cascade_loss` up to float reassociation, and its gradient
        their gradient. BN running statistics get the same updates; with
        patches of several sizes (several stacks) in stack order rather
        than patch order (the aux nets never read them in training).
        """
        losses = {}
        for h_b, inputs_b, samples_b, groups in stacks:
            scale = groups * self._patch_scale  # sum of the stack's shares
            with grouped_batch_norm(self, groups), \
                    _grouped_loss(self.task_head, groups):
                part = self.cascade_loss(h_b, inputs_b, samples_b)
            for name, value in part.items():
                # x * 1.0 is x (one stack of all P^2 patches, 'mean')
                value = value if scale == 1.0 else value * scale
                losses[name] = losses[name] + value if name in losses \
                    else value
        return losses

    def recon_patches(self, h, inputs, data_samples, batch=False):
        """``patch_parts='recon'``: the PFF grid over ``h`` with the
        matching regions of the reconstruction target's image and padding
        mask (:func:`image_patches`; no ground truth is cropped): per patch
        ``(h_p, image_p, valid_p)``, or with ``batch`` the stacks
        ``(h_b, image_b, valid_b, groups)``."""
        image, valid = self.recon_inputs(inputs, data_samples)
        return image_patches(h, inputs, image, valid, self.patch_grid,
                             self.in_stride, self.patch_remainder, batch)

    def recon_patch_loss(self, h, image, valid, scale=1.0, groups=1):
        """``patch_parts='recon'``: the reconstruction term of one patch or
        stack of ``groups`` patches (:meth:`recon_patches`) times
        ``recon_weight * scale``."""
        return (self.recon_weight * scale) * self.segment(
            self.recon.loss, self.aux_input(h), image, valid, groups)

    def batched_recon_loss(self, stacks):
        """``patch_parts='recon'``: the reconstruction term of the stacked
        patches, reduced over the patches (``patch_reduction``); each BN
        layer normalises every patch group alone, as in
        :meth:`batched_cascade_loss`."""
        total = None
        for h_b, image_b, valid_b, groups in stacks:
            scale = groups * self._patch_scale
            with grouped_batch_norm(self, groups):
                value = self.recon_patch_loss(h_b, image_b, valid_b, scale,
                                              groups)
            total = value if total is None else total + value
        return total

    def _cascade(self, h, inputs, data_samples, stacked):
        """The reduced cascade terms in one graph (``stacked``: the
        patches of :meth:`_batched`, or None)."""
        if self.patch_grid == 1:
            return self.cascade_loss(h, inputs, data_samples)
        if self.patch_parts == 'recon':
            cascade = self.task_losses(self.aux_input(h), inputs,
                                       data_samples)
            if self.recon is None:
                return cascade
            if stacked is not None:
                cascade['loss_recon'] = self.batched_recon_loss(stacked)
                return cascade
            recon = 0.
            for patch in self.recon_patches(h, inputs, data_samples):
                recon = recon + self.recon_patch_loss(*patch,
                                                      self._patch_scale)
            cascade['loss_recon'] = recon
            return cascade
        if stacked is not None:
            return self.batched_cascade_loss(stacked)
        cascade = {}
        for patch in self.patches(h, inputs, data_samples):
            for name, value in self.cascade_loss(*patch).items():
                cascade[name] = cascade.get(name, 0.) + \
                    value * self._patch_scale
        return cascade

    def _batched(self, h, inputs, data_samples):
        """The stacked patches when ``patch_batch`` applies, else None."""
        if not self.patch_batch or self.patch_grid == 1:
            return None
        if self.patch_parts == 'recon':
            return None if self.recon is None else self.recon_patches(
                h, inputs, data_samples, batch=True)
        return self.stacked_patches(h, inputs, data_samples)

    @staticmethod
    def _total(losses):
        """Sum of the terms from the first one (no ``0 +``: one kernel
        fewer, the same value)."""
        values = list(losses.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total

    @staticmethod
    def _cascade_name(name):
        """``loss_cls`` -> ``loss_cas_cls`` (logged next to ``loss_ind``)."""
        return 'loss_cas_' + name[len('loss_'):] if \
            name.startswith('loss_') else 'cas_' + name

    def _weighted(self, independent, cascade, ind=None):
        """``loss_ind`` (times ``w_x``; ``ind`` if given: that product,
        already computed) and ``loss_cas_*`` (times ``w_y``); their sum is
        the local loss of module k."""
        losses = {'loss_ind': self.independent_weight *
                  self._total(independent) if ind is None else ind}
        for name, value in cascade.items():
            losses[self._cascade_name(name)] = self.cascade_weight * value
        return losses

    def _weight_matrix(self, num_ind, num_cas, like):
        """``(1 + num_cas, num_ind + num_cas)``: row 0 sums the independent
        terms times ``w_x``, row ``1 + i`` is cascade term ``i`` times
        ``w_y``; on ``like``'s device and dtype, made once (not a kernel
        per step)."""
        cache = self.__dict__.setdefault('_weight_matrices', {})
        key = (num_ind, num_cas, self.independent_weight,
               self.cascade_weight, like.device, like.dtype)
        if key not in cache:
            matrix = torch.zeros(1 + num_cas, num_ind + num_cas,
                                 dtype=like.dtype, device=like.device)
            matrix[0, :num_ind] = self.independent_weight
            for i in range(num_cas):
                matrix[1 + i, num_ind + i] = self.cascade_weight
            cache[key] = matrix
        return cache[key]

    def _weighted_sum(self, independent, cascade):
        """The local loss ``w_x sum(ind) + w_y sum(cas)`` and its detached
        logs (those of :meth:`_weighted`).

        The terms are stacked and mapped to the logged parts ``[w_x
        sum(ind), w_y cas_1, ...]`` by one matrix-vector product, whose sum
        is the loss: three kernels forward and one backward instead of a
        product per weight, a sum per term and their backward. Each term's
        gradient is ``w * upstream`` exactly (one non-zero weight per
        column); values may differ from the sum of products by float
        reassociation.
        """
        terms = list(independent.values()) + list(cascade.values())
        if not (independent and cascade and all(
                torch.is_tensor(t) and t.dim() == 0 for t in terms)):
            ind = self.independent_weight * self._total(independent)
            return (ind + self.cascade_weight * self._total(cascade),
                    self._detached(independent, cascade, ind))
        stacked = torch.stack(terms)
        parts = torch.mv(
            self._weight_matrix(len(independent), len(cascade), stacked),
            stacked)
        loss = parts.sum()
        values = parts.detach().unbind()
        logs = LocalLogs(loss_ind=values[0])
        for name, value in zip(cascade, values[1:]):
            logs[self._cascade_name(name)] = value
        logs.total = loss.detach()
        return loss, logs

    def loss(self, h, inputs, data_samples):
        """Both streams on the same ``h``, in one graph: the local objective
        of a window of one module (with PFF, the patch average).

        Returns:
            dict[str, Tensor]: ``loss_ind`` and ``loss_cas_*``, weighted,
            attached.
        """
        independent = self.independent_loss(h, inputs, data_samples)
        cascade = self._cascade(h, inputs, data_samples,
                                self._batched(h, inputs, data_samples))
        return self._weighted(independent, cascade)

    def backward_streams(self, h_independent, h_cascade, inputs,
                         data_samples, backward, forward_context):
        """Compute both losses of module k and back-propagate them now.

        Args:
            h_independent, h_cascade (Tensor): Two detached leaves holding
                module k's output (values of both streams are equal within
                an iteration); their ``.grad`` is what ``LocalLearner``
                sends down module k and the cascade window.
            inputs (Tensor): Preprocessed images.
            data_samples (list): GT.
            backward (callable): ``backward(loss)`` back-propagates a scalar
                now, scaled like the model's loss (``local_backward``).
            forward_context (callable): Returns the context to run forwards
                in (AMP autocast).

        Returns:
            dict[str, Tensor]: Detached weighted loss terms (for logging).
        """
        try:
            return self._backward_streams(h_independent, h_cascade, inputs,
                                          data_samples, backward,
                                          forward_context)
        finally:
            if self.index == self.num_modules - 2:
                # the last aux net of the batch: its patch layouts (shared
                # by the modules, pff._LAYOUTS) are not needed any more
                release_patch_layouts(inputs)

    def _backward_streams(self, h_independent, h_cascade, inputs,
                          data_samples, backward, forward_context):
        with forward_context():
            independent = self.independent_loss(h_independent, inputs,
                                                data_samples)
        stacked = self._batched(h_cascade, inputs, data_samples)
        if self.patch_grid == 1 or stacked is not None:
            with forward_context():
                cascade = self._cascade(h_cascade, inputs, data_samples,
                                        stacked)
            del stacked
            loss, logs = self._weighted_sum(independent, cascade)
            backward(loss)
            return logs
        if self.patch_parts == 'recon':
            return self._backward_recon_patches(
                independent, h_cascade, inputs, data_samples, backward,
                forward_context)
        ind = self.independent_weight * self._total(independent)
        backward(ind)
        cascade = {}
        patches = self.patches(h_cascade, inputs, data_samples)
        share = self.cascade_weight * self._patch_scale
        for patch in patches:
            with forward_context():
                losses = self.cascade_loss(*patch)
            # this patch's share now: its aux activations are freed before
            # the next patch runs; h_cascade.grad accumulates the sum
            backward(share * self._total(losses))
            for name, value in losses.items():  # (logs) sum, scaled below
                cascade[name] = cascade[name] + value.detach() \
                    if name in cascade else value.detach()
            del losses, patch
        if self._patch_scale != 1.0:
            cascade = {name: value * self._patch_scale
                       for name, value in cascade.items()}
        return self._detached(independent, cascade, ind)

    def _backward_recon_patches(self, independent, h_cascade, inputs,
                                data_samples, backward, forward_context):
        """``patch_parts='recon'``, one patch at a time: the independent
        and the cascade task terms (whole input) back-propagated together,
        then each patch's reconstruction share at once (its decoder
        activations freed before the next patch runs)."""
        with forward_context():
            whole = self.task_losses(self.aux_input(h_cascade), inputs,
                                     data_samples)
        loss, logs = self._weighted_sum(independent, whole)
        backward(loss)
        del loss, whole
        if self.recon is None:
            return logs
        share = self.cascade_weight * self._patch_scale
        recon = None
        for patch in self.recon_patches(h_cascade, inputs, data_samples):
            with forward_context():
                value = self.recon_patch_loss(*patch)
            backward(share * value)
            value = value.detach()
            recon = value if recon is None else recon + value
            del patch
        recon = share * recon
        logs[self._cascade_name('loss_recon')] = recon
        if getattr(logs, 'total', None) is not None:
            logs.total = logs.total + recon
        return logs

    def _detached(self, independent, cascade, ind=None):
        return {name: value.detach() for name, value in self._weighted(
            independent, cascade, ind).items()}
