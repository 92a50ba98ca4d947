"""GSO-YOLO's SCM block (EMAttention): the group count at every config
width, and the block against Efficient Multi-scale Attention's equations."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope

from conftest import REPO
from local_utils import parsed_config
from mmlocal.models.gso_yolo.scm import EMAttention
from mmlocal.registry import MODELS

CONFIG_DIR = osp.join(REPO, 'configs', 'gso_yolo')


@pytest.mark.parametrize('size, channels', [('n', 256), ('s', 512),
                                            ('m', 576)])
def test_default_groups_divide_every_width(size, channels):
    """G = 32 (the EMA authors' default) is the block's and the configs'
    default, and it builds at the SCM input of GSO-YOLO n/s/m."""
    assert EMAttention(channels).groups == 32
    cfg = parsed_config(
        osp.join(CONFIG_DIR, f'gso-yolo_{size}_8xb16-300e_soda.py'))
    assert cfg.model.backbone.scm == dict(
        type='mmlocal.EMAttention', groups=32)
    import mmdet.registry  # noqa: F401
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(cfg.model.backbone)
    scm = backbone.stage4[-1]
    assert type(scm) is EMAttention and scm.groups == 32
    assert scm.conv3x3.in_channels == channels // 32  # 8, 16, 18
    x = torch.randn(2, channels, 3, 4)
    assert scm(x).shape == x.shape


def _ema_equations(block, x):
    """Efficient Multi-scale Attention written from its equations (Ouyang
    et al., ICASSP 2023) with the block's weights: per group, a 1x1 branch
    on the H- and W-pooled map, a 3x3 branch, cross-spatial weighting."""
    b, c, h, w = x.shape
    g = block.groups
    outs = []
    for i in range(b):
        for j in range(g):
            xg = x[i:i + 1, j * c // g:(j + 1) * c // g]
            a_h = F.conv2d(xg.mean(3, keepdim=True), block.conv1x1.weight,
                           block.conv1x1.bias)
            a_w = F.conv2d(xg.mean(2, keepdim=True), block.conv1x1.weight,
                           block.conv1x1.bias)
            x1 = block.norm(xg * a_h.sigmoid() * a_w.sigmoid())
            x2 = block.conv3x3(xg)
            d1 = x1.mean((2, 3)).softmax(1)  # (1, c/g)
            d2 = x2.mean((2, 3)).softmax(1)
            weights = torch.einsum('nc,nchw->nhw', d1, x2) + \
                torch.einsum('nc,nchw->nhw', d2, x1)
            outs.append(xg * weights.unsqueeze(1).sigmoid())
    return torch.cat([torch.cat(outs[i * g:(i + 1) * g], 1)
                      for i in range(b)], 0)


@pytest.mark.parametrize('groups', [32, 8])
def test_block_follows_the_equations(groups):
    torch.manual_seed(0)
    block = EMAttention(64, groups=groups)
    torch.nn.init.normal_(block.norm.weight)
    torch.nn.init.normal_(block.norm.bias)
    x = torch.randn(2, 64, 5, 6)
    torch.testing.assert_close(block(x), _ema_equations(block, x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('groups', [0, 3, 2.0])
def test_groups_must_divide_the_channels(groups):
    with pytest.raises(ValueError, match=f'groups={groups!r}'):
        EMAttention(50, groups=groups)
