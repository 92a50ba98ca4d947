"""Minimal build arguments of the HPFF / MLAAN / AugLocal aux families."""
import torch


def _info(task='det', num_modules=4, module_range=(0, 2)):
    """Module 0 of a tiny 8-block ResNet-18 cut into ``num_modules``."""
    from mmdet.models.backbones import ResNet
    from mmlocal.models.local.aux import LocalModuleInfo
    from mmlocal.models.local.split import build_block_sequence
    seq = build_block_sequence(ResNet(depth=18, base_channels=8,
                                      out_indices=(1, 2, 3)))
    end = module_range[1]
    return LocalModuleInfo(
        index=0, num_modules=num_modules,
        in_channels=seq.block_out_channels[end - 1],
        stride=seq.block_strides[end - 1], task=task, num_classes=3,
        img_mean=torch.zeros(3, 1, 1), img_std=torch.ones(3, 1, 1),
        extra=dict(block_sequence=seq, module_range=module_range))


BUILD_CFGS = {
    ('MODELS', 'SyncFreeL1Loss'): lambda: dict(loss_weight=2.0),
    ('MODELS', 'SyncFreeSmoothL1Loss'): lambda: dict(beta=0.5),
    ('MODELS', 'SyncFreeCrossEntropyLoss'): lambda: dict(avg_non_ignore=True),
    ('MODELS', 'FusedFocalLoss'): lambda: dict(gamma=2.0, alpha=0.25),
    ('MODELS', 'HPFFAux'): lambda: dict(
        module_info=_info(), det_head=dict(feat_channels=8),
        independent_det_head=dict(feat_channels=8)),
    ('MODELS', 'MLAANAux'): lambda: dict(
        module_info=_info('seg'), cascade_span=3,
        seg_head=dict(channels=8), independent_seg_head=dict(channels=8)),
    ('MODELS', 'AugLocalAux'): lambda: dict(
        module_info=_info(), aux_depth=3, det_head=dict(feat_channels=8)),
}
