"""Tiny local-learning models and random batches for tests."""
import torch
from mmengine.optim import OptimWrapper
from torch.utils._python_dispatch import TorchDispatchMode

TINY_RETINANET = dict(
    type='mmdet.RetinaNet',
    data_preprocessor=dict(
        type='mmdet.DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='mmdet.ResNet', depth=18, num_stages=4, out_indices=(1, 2, 3),
        base_channels=16, frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False, style='pytorch', init_cfg=None),
    neck=dict(type='mmdet.FPN', in_channels=[32, 64, 128],
              out_channels=32, start_level=0, add_extra_convs='on_input',
              num_outs=3),
    bbox_head=dict(
        type='mmdet.RetinaHead', num_classes=2, in_channels=32,
        stacked_convs=1, feat_channels=32,
        anchor_generator=dict(type='mmdet.AnchorGenerator',
                              octave_base_scale=4, scales_per_octave=2,
                              ratios=[1.0], strides=[8, 16, 32]),
        bbox_coder=dict(type='mmdet.DeltaXYWHBBoxCoder',
                        target_means=[.0, .0, .0, .0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
                      alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='mmdet.L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='mmdet.MaxIoUAssigner', pos_iou_thr=0.5,
                      neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        sampler=dict(type='mmdet.PseudoSampler'), allowed_border=-1,
        pos_weight=-1, debug=False),
    test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.0,
                  nms=dict(type='nms', iou_threshold=0.5), max_per_img=20))

TINY_FCN = dict(
    type='mmseg.EncoderDecoder',
    data_preprocessor=dict(
        type='mmseg.SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
        seg_pad_val=255, size=(64, 64)),
    backbone=dict(
        type='mmseg.ResNetV1c', depth=18, num_stages=4,
        out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1), norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False, style='pytorch', contract_dilation=True),
    decode_head=dict(
        type='mmseg.FCNHead', in_channels=512, in_index=3, channels=16,
        num_convs=1, concat_input=False, dropout_ratio=0.0, num_classes=3,
        norm_cfg=dict(type='BN', requires_grad=True), align_corners=False,
        loss_decode=dict(type='mmseg.CrossEntropyLoss', use_sigmoid=False,
                         loss_weight=1.0)),
    auxiliary_head=dict(
        type='mmseg.FCNHead', in_channels=256, in_index=2, channels=8,
        num_convs=1, concat_input=False, dropout_ratio=0.0, num_classes=3,
        norm_cfg=dict(type='BN', requires_grad=True), align_corners=False,
        loss_decode=dict(type='mmseg.CrossEntropyLoss', use_sigmoid=False,
                         loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))


def det_batch(n=2, size=64, seed=0):
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        xy = torch.randint(0, size // 2, (3, 2), generator=g).float()
        wh = torch.randint(8, size // 2, (3, 2), generator=g).float()
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            scale_factor=(1., 1.), pad_shape=(size, size)))
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, (xy + wh).clamp(max=size)], 1),
            labels=torch.randint(0, 2, (3, ), generator=g))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def seg_batch(n=2, size=64, seed=0, num_classes=3, ignore=True):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, size, size), generator=g)
        if ignore:
            label[:, :4] = 255
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


class KeepGradsOptimWrapper(OptimWrapper):
    """Never steps or zeroes: gradients stay for inspection."""

    def step(self, **kwargs):
        pass

    def zero_grad(self, **kwargs):
        pass


def grads(module):
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in module.named_parameters() if p.requires_grad
    }


def assert_same_step(logs, g, logs_other, g_other, rtol=1e-4, atol=1e-6):
    """Two training steps logged the same losses and left the same
    gradients (``grads`` dicts), up to float reassociation."""
    assert logs.keys() == logs_other.keys()
    for name in logs:
        torch.testing.assert_close(logs_other[name], logs[name], msg=name)
    assert g.keys() == g_other.keys()
    for name in g:
        torch.testing.assert_close(g_other[name], g[name], rtol=rtol,
                                   atol=atol, msg=name)


def module_phase_peak(learner, batch, phase='module0'):
    """Peak of one local-learning phase of a step (CPU meter), after a
    warm-up step; SGD with lr 0 keeps the weights."""
    import warnings
    from mmlocal.utils.memory import PeakMemoryMeter
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # EMA copies without their hook
        learner.train_step(batch, ow)
        with PeakMemoryMeter('cpu') as meter:
            learner.phase_callback = meter.mark
            try:
                learner.train_step(batch, ow)
            finally:
                learner.phase_callback = None
    return meter.phases[phase]


def small_aux(type='mmlocal.InfoProAux', **kwargs):
    """An auxiliary config with narrow heads (fast tests, no dropout)."""
    cfg = dict(
        type=type,
        det_head=dict(feat_channels=16),
        seg_head=dict(channels=16, head=dict(dropout_ratio=0.0)),
        recon=dict(channels=16))
    if type.endswith('DGLAux'):
        cfg['channels'] = 16
    cfg.update(kwargs)
    return cfg


TINY_YOLOX = dict(
    type='mmdet.YOLOX',
    data_preprocessor=dict(type='mmdet.DetDataPreprocessor',
                           pad_size_divisor=32),
    backbone=dict(type='mmdet.CSPDarknet', deepen_factor=0.33,
                  widen_factor=0.125, out_indices=(2, 3, 4),
                  use_depthwise=False, spp_kernal_sizes=(5, 9, 13),
                  norm_cfg=dict(type='BN', momentum=0.03, eps=0.001),
                  act_cfg=dict(type='Swish')),
    neck=dict(type='mmdet.YOLOXPAFPN', in_channels=[32, 64, 128],
              out_channels=32, num_csp_blocks=1,
              norm_cfg=dict(type='BN', momentum=0.03, eps=0.001),
              act_cfg=dict(type='Swish')),
    bbox_head=dict(type='mmdet.YOLOXHead', num_classes=2, in_channels=32,
                   feat_channels=32, stacked_convs=1, strides=(8, 16, 32),
                   norm_cfg=dict(type='BN', momentum=0.03, eps=0.001),
                   act_cfg=dict(type='Swish')),
    train_cfg=dict(assigner=dict(type='mmdet.SimOTAAssigner',
                                 center_radius=2.5)),
    test_cfg=dict(score_thr=0.01, nms=dict(type='nms', iou_threshold=0.65)))


def gn_fcn_learner_cfg():
    """A tiny FCN LocalLearner with GroupNorm everywhere.

    Without BatchNorm a step on a batch split over ranks equals a step on the
    whole batch (the losses average over equal numbers of pixels), which is
    what the distributed tests compare.
    """
    import copy
    gn = dict(type='GN', num_groups=4, requires_grad=True)
    model = copy.deepcopy(TINY_FCN)
    model['data_preprocessor']['size'] = (32, 32)
    model['backbone'].update(norm_cfg=gn, base_channels=16, stem_channels=16)
    model['decode_head'].update(in_channels=128, norm_cfg=gn)
    model['auxiliary_head'].update(in_channels=64, norm_cfg=gn)
    aux = small_aux('mmlocal.InfoProAux',
                    seg_head=dict(channels=16, norm_cfg=gn,
                                  head=dict(dropout_ratio=0.0)),
                    recon=dict(channels=16, norm_cfg=gn))
    return dict(type='mmlocal.LocalLearner', model=model, num_modules=2,
                aux=aux)


def cpu_bf16_amp_wrapper(monkeypatch, params):
    """mmengine's AmpOptimWrapper (bf16) on the CPU: it insists on CUDA, so
    the check is patched; the GradScaler disables itself (its warning is
    expected)."""
    import pytest
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_mod
    monkeypatch.setattr(amp_mod, 'is_cuda_available', lambda: True)
    with pytest.warns(UserWarning):
        return amp_mod.AmpOptimWrapper(
            optimizer=torch.optim.SGD(params, lr=0.01), dtype='bfloat16')


class HostReads(TorchDispatchMode):
    """Counts ops dispatched while active (``ops``) and those that read a
    tensor's value on the host (``count``: ``.item()``, ``bool(t)``,
    ``nonzero``), each a wait for the device's queue on a GPU; both counts
    are device independent."""
    READS = ('_local_scalar_dense', 'nonzero', 'is_nonzero')

    def __init__(self):
        super().__init__()
        self.count = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.count += func.overloadpacket.__name__ in self.READS
        return func(*args, **(kwargs or {}))


def parsed_config(path):
    """``mmengine.config.Config.fromfile(path)``, parsed once per test
    session (0.2-0.5 s a file; several test files parse the same configs);
    each call returns a deep copy, which the caller may change."""
    import copy
    import os.path as osp
    return copy.deepcopy(_parsed_config(osp.abspath(path)))


def _parsed_config(path, _cache={}):
    if path not in _cache:
        from mmengine.config import Config
        _cache[path] = Config.fromfile(path)
    return _cache[path]


def spy_anchor_target_passes(monkeypatch):
    """Count the shared anchor-target passes: returns the list that gets,
    per ``multi_anchor_targets`` call, the number of heads it served."""
    import mmlocal.models.local.heads.anchor_targets as at
    calls = []
    real = at.multi_anchor_targets

    def spy(requests, *args, **kwargs):
        calls.append(len(requests))
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(at, 'multi_anchor_targets', spy)
    return calls
