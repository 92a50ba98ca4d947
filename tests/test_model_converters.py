"""tools/model_converters/resnet_to_mm.py on torchvision and seed layouts."""
import copy

import pytest
import torch
import torchvision
from mmengine.config import ConfigDict
from mmengine.registry import DefaultScope

from tool_server import run_tool_fast
from local_utils import TINY_RETINANET, small_aux
from mmlocal.registry import MODELS

TOOL = 'tools/model_converters/resnet_to_mm.py'


def _convert(src, dst, *extra):
    return run_tool_fast([TOOL, str(src), str(dst), *extra], check=False,
                         timeout=300)


def _seed_layout(tv_state):
    """An InfoPro/MAN-style ImageNet checkpoint: DDP prefix + aux keys."""
    state = {f'module.{k}': v for k, v in tv_state.items()}
    state['module.decoder_0.0.weight'] = torch.zeros(128, 128, 1, 1)
    state['module.aux_classifier_0.head.0.weight'] = torch.zeros(4, 4)
    state['module.LB.0.conv1.weight'] = torch.zeros(8, 8, 1, 1)
    state['module.EMA_Net.0.conv1.weight'] = torch.zeros(8, 8, 1, 1)
    return {'epoch': 90, 'state_dict': state, 'best_acc': 0.0}


@pytest.mark.parametrize('layout', ['torchvision', 'seed'])
def test_convert_and_load_into_split_backbone(tmp_path, layout):
    tv = torchvision.models.resnet18()
    for p in tv.parameters():
        torch.nn.init.normal_(p)
    tv_state = tv.state_dict()
    ckpt = tv_state if layout == 'torchvision' else _seed_layout(tv_state)
    src, dst = tmp_path / 'in.pth', tmp_path / 'out.pth'
    torch.save(ckpt, src)
    proc = _convert(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert 'dropped fc.weight' in proc.stdout or \
        'dropped module.fc.weight' in proc.stdout
    if layout == 'seed':
        assert 'dropped module.EMA_Net.0.conv1.weight' in proc.stdout
        assert 'dropped module.decoder_0.0.weight' in proc.stdout

    model = copy.deepcopy(TINY_RETINANET)
    model['backbone'].pop('base_channels')  # the real ResNet-18 widths
    model['neck']['in_channels'] = [128, 256, 512]
    model['backbone']['init_cfg'] = dict(type='Pretrained',
                                         checkpoint=str(dst))
    with DefaultScope.overwrite_default_scope('mmdet'):
        learner = MODELS.build(dict(type='mmlocal.LocalLearner',
                                    model=ConfigDict(model), num_modules=4,
                                    aux=small_aux()))
    learner.init_weights()
    loaded = learner.model.backbone.state_dict()
    for key, value in tv_state.items():
        if key.startswith('fc.'):
            continue
        assert torch.equal(loaded[key], value), key


def test_wrong_shapes_and_foreign_checkpoints_are_reported(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(
        "default_scope = 'mmdet'\n"
        "model = dict(type='RetinaNet', backbone=dict(type='ResNet', "
        "depth=50, init_cfg=None))\n")
    tv = torchvision.models.resnet18()  # wrong depth for ResNet-50
    src = tmp_path / 'r18.pth'
    torch.save(tv.state_dict(), src)
    proc = _convert(src, tmp_path / 'out.pth', '--config', str(cfg))
    assert proc.returncode == 1
    assert 'wrong shape' in proc.stderr or 'missing' in proc.stderr
    assert not (tmp_path / 'out.pth').exists()

    foreign = tmp_path / 'vit.pth'
    torch.save({'blocks.0.attn.qkv.weight': torch.zeros(3, 3)}, foreign)
    proc = _convert(foreign, tmp_path / 'x.pth')
    assert proc.returncode == 1 and 'no ResNet backbone keys' in proc.stderr

    existing = tmp_path / 'keep.pth'
    existing.write_bytes(b'user data')
    proc = _convert(src, existing)
    assert proc.returncode == 1 and 'refusing to overwrite' in proc.stderr
    assert existing.read_bytes() == b'user data'
