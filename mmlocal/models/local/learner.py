import copy
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn as nn
from mmengine.model import BaseModel, ModuleList

from mmlocal.engine.optim_wrappers import (check_local_optim_wrapper,
                                           local_backward)
from mmlocal.registry import MODELS
from .aux.base import LocalModuleInfo
from .split import build_block_sequence, module_output_info, plan_split


def _task_of(model):
    """``'det'`` for mmdet detectors, ``'seg'`` for mmseg segmentors."""
    try:
        from mmdet.models.detectors import BaseDetector
        if isinstance(model, BaseDetector):
            return 'det'
    except ImportError:  # pragma: no cover - mmdet is a requirement
        pass
    try:
        from mmseg.models.segmentors import BaseSegmentor
        if isinstance(model, BaseSegmentor):
            return 'seg'
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f'LocalLearner wraps mmdet detectors and mmseg segmentors; got '
        f'{type(model).__name__}')


def _first(head):
    return head[0] if isinstance(head, (list, tuple, nn.ModuleList)) else head


def _num_classes(model, task):
    if task == 'seg':
        head = _first(model.decode_head)
        return head.num_classes, getattr(head, 'ignore_index', 255)
    for path in ('bbox_head', 'roi_head.bbox_head', 'rpn_head'):
        obj = model
        for name in path.split('.'):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        obj = _first(obj) if obj is not None else None
        if obj is not None and hasattr(obj, 'num_classes'):
            return obj.num_classes, 255
    raise ValueError(f'cannot find num_classes in {type(model).__name__}')


@MODELS.register_module()
class LocalLearner(BaseModel):
    """Supervised local learning for any mmdet detector or mmseg segmentor.

    The backbone of ``model`` is viewed as K gradient-isolated modules
    ``f_0 .. f_{K-1}`` (block granularity). For ``k < K-1``:

    .. math::  h_k = f_k(\\mathrm{sg}(h_{k-1})), \\qquad
               \\theta_{f_k}, \\theta_{g_k} \\leftarrow
               \\nabla \\mathcal{L}_k(g_k(h_k))

    where ``g_k`` is module k's auxiliary net and ``sg`` stops the gradient.
    ``L_k`` is back-propagated **at once**, which frees module k's graph
    before module k+1 runs: that is where the memory saving comes from. The
    last module (the rest of the backbone, the neck and the heads) is trained
    by the model's own losses. One optimizer step per iteration.

    Stage outputs of earlier modules reach the neck detached (MAN++'s COCO
    setting) unless listed in ``attach_stages``; an attached one keeps its
    module's graph until the model's loss has been back-propagated (gradient
    from the neck reaches that module; memory is spent on it).

    Validation, test and inference run the wrapped model unchanged; the
    auxiliary nets are training-only (``tools/model_converters/strip_aux.py``
    writes a checkpoint of the plain model).

    Args:
        model (dict | nn.Module): The stock detector/segmentor (config).
        num_modules (int, optional): K, split evenly by trainable blocks.
        split_points (list[int], optional): Block indices that start a new
            module (instead of ``num_modules``).
        stage_aligned (bool): Split only at stage boundaries.
        aux (dict): Config of the auxiliary family, e.g.
            ``dict(type='mmlocal.InfoProAux')``; each module's copy gets a
            :class:`LocalModuleInfo` as ``module_info``.
        attach_stages (Sequence[int]): Stage indices (backbone
            ``out_indices`` numbering) whose outputs reach the neck attached.
    """

    def __init__(self,
                 model,
                 num_modules=None,
                 split_points=None,
                 stage_aligned=False,
                 aux=dict(type='mmlocal.InfoProAux'),
                 attach_stages=(),
                 init_cfg=None):
        if isinstance(model, dict):
            model = copy.deepcopy(model)
            # 'mmdet.RetinaNet' -> build (and nested builds) in mmdet's scope,
            # whatever the caller's default scope is
            mtype = model.get('type', '')
            if '_scope_' not in model and isinstance(mtype, str) \
                    and '.' in mtype:
                model['_scope_'] = mtype.split('.')[0]
            inner = MODELS.build(model)
        else:
            inner = model
        if not hasattr(inner, 'backbone'):
            raise TypeError(f'model {type(inner).__name__} has no backbone '
                            'to split')
        super().__init__(
            data_preprocessor=inner.data_preprocessor, init_cfg=init_cfg)
        self.model = inner
        self.task = _task_of(inner)
        if num_modules is None and split_points is None:
            raise ValueError('LocalLearner needs num_modules or split_points')
        self._seq = build_block_sequence(inner.backbone)
        self.module_ranges = plan_split(
            self._seq, num_modules=num_modules, split_points=split_points,
            stage_aligned=stage_aligned)
        self.num_modules = len(self.module_ranges)
        stages = set(getattr(inner.backbone, 'out_indices', ()))
        bad = [s for s in attach_stages if s not in stages]
        if bad:
            raise ValueError(f'attach_stages={list(attach_stages)}: {bad} '
                             f'not in the backbone out_indices '
                             f'{sorted(stages)}')
        self.attach_stages = tuple(attach_stages)
        self.phase_callback = None

        num_classes, ignore_index = _num_classes(inner, self.task)
        mean = getattr(self.data_preprocessor, 'mean', None)
        std = getattr(self.data_preprocessor, 'std', None)
        if mean is None or std is None:  # no normalisation: raw 0..255
            mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
        infos = module_output_info(self._seq, self.module_ranges)
        if self.num_modules > 1 and not (isinstance(aux, dict)
                                         and 'type' in aux):
            raise ValueError(f'aux must be a config dict with a type, got '
                             f'{aux!r}')
        aux_nets = []
        for k in range(self.num_modules - 1):
            info = LocalModuleInfo(
                index=k,
                num_modules=self.num_modules,
                in_channels=infos[k]['out_channels'],
                stride=infos[k]['stride'],
                task=self.task,
                num_classes=num_classes,
                next_block=infos[k]['next_block'],
                next_out_channels=infos[k]['next_out_channels'],
                next_stride=infos[k]['next_stride'],
                img_mean=mean,
                img_std=std,
                ignore_index=ignore_index)
            cfg = copy.deepcopy(aux)
            cfg['module_info'] = info
            try:
                aux_nets.append(MODELS.build(cfg))
            except KeyError as exc:
                if str(cfg['type']).split('.')[-1] in str(exc):
                    raise ValueError(
                        f'aux.type={aux["type"]!r} is not a registered '
                        'auxiliary family (e.g. mmlocal.InfoProAux, '
                        'mmlocal.DGLAux)') from exc
                raise
        # mmengine's ModuleList: init_weights reaches the aux heads' init_cfg
        self.aux_nets = ModuleList(aux_nets)

    # ------------------------------------------------------------------
    # inference: exactly the wrapped model
    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.model(inputs, data_samples, mode=mode)

    def val_step(self, data):
        return self.model.val_step(data)

    def test_step(self, data):
        return self.model.test_step(data)

    # ------------------------------------------------------------------
    @contextmanager
    def _backbone_runs_last_module(self, x, start, outs):
        """Make ``model.backbone(...)`` run only blocks ``start..end``.

        The wrapped model's own ``loss`` (any mmdet detector / mmseg
        segmentor) then trains the last module, the neck and the heads with
        nothing re-implemented.
        """
        backbone = self.model.backbone
        seq = self._seq

        def forward(_ignored_inputs):
            seq.forward_blocks(x, start, seq.num_blocks, outs)
            return seq.collect(outs)

        backbone.forward = forward
        try:
            yield
        finally:
            del backbone.forward

    def train_step(self, data, optim_wrapper):
        """One iteration: K-1 local backward passes, then the model's loss.

        Returns:
            dict[str, Tensor]: ``loss`` (sum of all terms), the model's loss
            terms, ``loss_local{k}`` per module and ``local{k}.<term>``.
        """
        check_local_optim_wrapper(optim_wrapper)
        with optim_wrapper.optim_context(self):
            data = self.data_preprocessor(data, True)
        inputs, data_samples = data['inputs'], data['data_samples']
        if self.num_modules == 1:
            with optim_wrapper.optim_context(self):
                losses = self.model.loss(inputs, data_samples)
            loss, log_vars = self.parse_losses(losses)
            optim_wrapper.update_params(loss)
            self._mark('module0')
            return log_vars

        seq = self._seq
        outs = {}
        local_logs = OrderedDict()
        local_total = 0.
        x = inputs
        for k, (start, end) in enumerate(self.module_ranges[:-1]):
            produced = set()
            with optim_wrapper.optim_context(self):
                h = seq.forward_stem(x, outs) if k == 0 else x
                before = set(outs)
                h = seq.forward_blocks(h, start, end, outs)
                produced = set(outs) - before
                local_losses = self.aux_nets[k].loss(h, inputs, data_samples)
            loss_k, logs_k = self.parse_losses(local_losses)
            keep = any(s in self.attach_stages for s in produced)
            local_backward(optim_wrapper, loss_k, retain_graph=keep)
            for s in produced:
                if s not in self.attach_stages:
                    outs[s] = outs[s].detach()
            x = h.detach()
            del h, local_losses
            local_logs[f'loss_local{k}'] = loss_k.detach()
            for name, value in logs_k.items():
                if name != 'loss':
                    local_logs[f'local{k}.{name}'] = value
            local_total = local_total + loss_k.detach()
            self._mark(f'module{k}')

        start = self.module_ranges[-1][0]
        with optim_wrapper.optim_context(self):
            with self._backbone_runs_last_module(x, start, outs):
                losses = self.model.loss(inputs, data_samples)
        loss, log_vars = self.parse_losses(losses)
        optim_wrapper.update_params(loss)
        self._mark(f'module{self.num_modules - 1}')

        log_vars['loss'] = log_vars['loss'] + local_total
        log_vars.update(local_logs)
        return log_vars

    def _mark(self, name):
        if self.phase_callback is not None:
            self.phase_callback(name)
