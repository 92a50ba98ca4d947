"""Minimal build arguments of mmlocal's core registered names."""
import torch
from mmengine.config import ConfigDict

from local_utils import TINY_RETINANET, small_aux


def _info(task='det'):
    from mmlocal.models.local.aux import LocalModuleInfo
    return LocalModuleInfo(
        index=0, num_modules=2, in_channels=8, stride=8, task=task,
        num_classes=3, img_mean=torch.zeros(3, 1, 1),
        img_std=torch.ones(3, 1, 1))


BUILD_CFGS = {
    ('HOOKS', 'PeakMemoryHook'): lambda: dict(interval=5),
    ('MODELS', 'LocalLearner'): lambda: dict(
        model=ConfigDict(TINY_RETINANET), num_modules=2,
        aux=small_aux()),
    ('MODELS', 'InfoProAux'): lambda: dict(module_info=_info()),
    ('MODELS', 'DGLAux'): lambda: dict(module_info=_info('seg')),
    ('MODELS', 'DetAuxHead'): lambda: dict(
        in_channels=8, stride=4, num_classes=2, feat_channels=8),
    ('MODELS', 'SegAuxHead'): lambda: dict(
        in_channels=8, num_classes=2, channels=8),
    ('MODELS', 'ReconDecoder'): lambda: dict(in_channels=8, stride=8),
}


def _info_with_next():
    info = _info()
    info.next_block = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    info.next_out_channels, info.next_stride = 16, 16
    return info


BUILD_CFGS.update({
    ('MODELS', 'MomentumAux'): lambda: dict(
        module_info=_info_with_next(), learnable_scale=True),
    ('HOOKS', 'MomentumAuxHook'): lambda: dict(),
})


def _wrapped_model():
    return dict(module=torch.nn.Linear(2, 2))


BUILD_CFGS[('MODEL_WRAPPERS', 'LocalDistributedDataParallel')] = \
    _wrapped_model
