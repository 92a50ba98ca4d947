"""BlockSequence / plan_split / module_output_info on real mmdet and mmseg
backbones (CPU, tiny inputs)."""

import pytest
import torch
import torch.nn as nn

from mmlocal.models.local.split import (BlockSequence, build_block_sequence,
                                        module_output_info, plan_split)

SIZE = 64


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny inputs gain nothing from threads, and on a busy machine
    intra-op threads spin: run this file single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(scope, **cfg):
    if scope == 'mmdet':
        import mmdet.models  # noqa: F401  (registers the backbones)
        from mmdet.registry import MODELS
    else:
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
    # an explicit scope: another test may have left a global default scope
    return MODELS.build(dict(init_cfg=None, _scope_=scope, **cfg))


# id -> (scope, build cfg)
BACKBONES = {
    # norm_eval=False: BN trains, so train mode checks batch statistics too
    'r18': ('mmdet', dict(type='ResNet', depth=18, norm_eval=False)),
    'r50_frozen1':
    ('mmdet', dict(type='ResNet', depth=50, frozen_stages=1, norm_eval=False)),
    'r18_v1d': ('mmdet', dict(type='ResNetV1d', depth=18)),
    'x50_32x4d': ('mmdet',
                  dict(
                      type='ResNeXt',
                      depth=50,
                      groups=32,
                      base_width=4,
                      base_channels=16,
                      norm_eval=False)),
    'r18_with_cp':
    ('mmdet', dict(type='ResNet', depth=18, with_cp=True, norm_eval=False)),
    'seg_r50_v1c_d8': ('mmseg',
                       dict(
                           type='ResNetV1c',
                           depth=50,
                           strides=(1, 2, 1, 1),
                           dilations=(1, 1, 2, 4),
                           contract_dilation=True,
                           out_indices=(0, 1, 2, 3))),
    'seg_r50_plugin': ('mmseg',
                       dict(
                           type='ResNet',
                           depth=50,
                           base_channels=16,
                           out_indices=(1, 3),
                           plugins=[
                               dict(
                                   cfg=dict(type='ContextBlock', ratio=1. / 4),
                                   stages=(False, True, True, True),
                                   position='after_conv3')
                           ])),
    'cspdarknet': ('mmdet',
                   dict(
                       type='CSPDarknet',
                       deepen_factor=0.33,
                       widen_factor=0.125,
                       out_indices=(0, 2, 3, 4))),
    'cspdarknet_dw': ('mmdet',
                      dict(
                          type='CSPDarknet',
                          deepen_factor=0.33,
                          widen_factor=0.125,
                          use_depthwise=True)),
    'cspnext_frozen1': ('mmdet',
                        dict(
                            type='CSPNeXt',
                            deepen_factor=0.167,
                            widen_factor=0.125,
                            frozen_stages=1)),
}


def build(key, train=True):
    """Build and set the mode (these backbones' ``train()`` returns None)."""
    scope, cfg = BACKBONES[key]
    backbone = _build(scope, **cfg)
    if train is not None:
        backbone.train(train)
    return backbone


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_split(seq, x, ranges, detach=True):
    outs = {}
    h = seq.forward_stem(x, outs)
    for start, end in ranges:
        h = seq.forward_blocks(h.detach() if detach else h, start, end, outs)
    return seq.collect(outs)


def _input(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize('key', sorted(BACKBONES))
def test_eval_forward_equals_backbone(key):
    backbone = build(key, train=False)
    seq = build_block_sequence(backbone)
    x = _input()
    with torch.no_grad():
        expected = backbone(x)
        assert _equal(seq.forward(x), expected)
        # any split, inputs detached between modules
        trainable = seq.num_blocks - seq.num_frozen_blocks
        for k in sorted({1, 2, 3, trainable}):
            ranges = plan_split(seq, num_modules=k)
            assert _equal(_run_split(seq, x, ranges), expected), (k, ranges)
        # every block's output has the announced channels and stride
        h = seq.forward_stem(x)
        assert h.shape[1] == seq.stem_out_channels
        assert h.shape[-1] == SIZE // seq.stem_stride
        for i in range(seq.num_blocks):
            h = seq.forward_blocks(h, i, i + 1, {})
            assert h.shape[1] == seq.block_out_channels[i], seq.block_names[i]
            assert h.shape[-1] == SIZE // seq.block_strides[i], \
                seq.block_names[i]


@pytest.mark.parametrize('key', sorted(BACKBONES))
def test_train_forward_equals_backbone(key):
    """Same outputs and the same BN running-stat updates as backbone(x)."""
    backbone = build(key)
    seq = build_block_sequence(backbone)
    x = _input(batch=2)
    before = _state(backbone)
    torch.manual_seed(0)
    expected = backbone(x)
    after_backbone = _state(backbone)
    backbone.load_state_dict(before)
    torch.manual_seed(0)
    assert _equal(seq.forward(x), expected)
    assert _same_state(_state(backbone), after_backbone)

    backbone.load_state_dict(before)
    torch.manual_seed(0)
    k = min(4, seq.num_blocks - seq.num_frozen_blocks)
    assert _equal(_run_split(seq, x, plan_split(seq, num_modules=k)), expected)
    assert _same_state(_state(backbone), after_backbone)


def test_with_cp_local_backward_matches_plain():
    """Module-by-module backward (detached inputs, immediate backward) gives
    the same gradients with and without checkpointing."""
    plain = _build('mmdet', type='ResNet', depth=18)
    ckpt = _build('mmdet', type='ResNet', depth=18, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x = _input(batch=2)
    for backbone in (plain, ckpt):
        seq = build_block_sequence(backbone)
        h = seq.forward_stem(x)
        for start, end in plan_split(seq, num_modules=4):
            h = seq.forward_blocks(h.detach(), start, end, {})
            h.square().mean().backward()  # a stand-in local loss
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if name.startswith('layer'):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        else:  # the stem feeds module 0 detached: no gradient
            assert p.grad is None and q.grad is None, name


def test_resnet50_layout():
    seq = build_block_sequence(_build('mmdet', type='ResNet', depth=50))
    assert isinstance(seq, BlockSequence)
    assert seq.num_blocks == 16
    assert seq.num_frozen_blocks == 0 and not seq.stem_frozen
    names = [
        f'layer{s + 1}.{j}' for s, n in enumerate((3, 4, 6, 3))
        for j in range(n)
    ]
    assert seq.block_names == names
    assert seq.block_stage == [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3
    assert seq.block_strides == [4] * 3 + [8] * 4 + [16] * 6 + [32] * 3
    assert seq.block_out_channels == ([256] * 3 + [512] * 4 + [1024] * 6 +
                                      [2048] * 3)
    assert (seq.stem_stride, seq.stem_out_channels) == (4, 64)
    assert seq.stage_starts == [3, 7, 13]
    for name, block in zip(seq.block_names, seq.blocks):
        assert seq.backbone.get_submodule(name) is block


def test_resnet18_and_frozen_layout():
    seq = build_block_sequence(build('r18'))
    assert seq.num_blocks == 8
    assert seq.block_out_channels == [64] * 2 + [128] * 2 + [256] * 2 + \
        [512] * 2
    seq = build_block_sequence(build('r50_frozen1'))
    assert seq.stem_frozen and seq.num_frozen_blocks == 3


def test_dilated_v1c_strides():
    seq = build_block_sequence(build('seg_r50_v1c_d8'))
    assert type(seq.backbone).__name__ == 'ResNetV1c'
    assert seq.block_strides == [4] * 3 + [8] * 13
    last_of_stage = [2, 6, 12, 15]
    assert [seq.block_strides[i] for i in last_of_stage] == [4, 8, 8, 8]
    assert [seq.block_out_channels[i] for i in last_of_stage] == \
        [256, 512, 1024, 2048]
    assert seq.stem_out_channels == 64  # deep stem


def test_csp_layout():
    seq = build_block_sequence(build('cspdarknet'))
    # stage i = (downsample conv, [SPP in the last stage], CSPLayer)
    assert seq.block_names == [
        'stage1.0', 'stage1.1', 'stage2.0', 'stage2.1', 'stage3.0', 'stage3.1',
        'stage4.0', 'stage4.1', 'stage4.2'
    ]
    assert type(seq.blocks[7]).__name__ == 'SPPBottleneck'
    assert type(seq.blocks[8]).__name__ == 'CSPLayer'
    assert seq.block_stage == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert seq.block_strides == [4, 4, 8, 8, 16, 16, 32, 32, 32]
    assert seq.block_out_channels == [16, 16, 32, 32, 64, 64, 128, 128, 128]
    assert (seq.stem_stage, seq.stem_stride, seq.stem_out_channels) == \
        (0, 2, 8)
    assert seq.out_stages == [0, 2, 3, 4]


def test_csp_frozen_stages_counted_before_train():
    """CSPDarknet/CSPNeXt freeze parameters only in train(); the frozen
    count follows frozen_stages either way."""
    backbone = build('cspnext_frozen1', train=None)
    assert all(p.requires_grad for p in backbone.parameters())
    seq = build_block_sequence(backbone)
    assert seq.stem_frozen and seq.num_frozen_blocks == 2
    backbone.train()
    assert not any(p.requires_grad for p in backbone.stage1.parameters())
    assert seq.num_frozen_blocks == 2
    assert plan_split(seq, num_modules=2) == [(0, 5), (5, 9)]


def test_frozen_from_requires_grad():
    backbone = build('r18')
    for p in backbone.layer1[0].parameters():
        p.requires_grad_(False)
    seq = build_block_sequence(backbone)
    assert seq.num_frozen_blocks == 1 and not seq.stem_frozen
    # not leading: does not count
    for p in backbone.layer2.parameters():
        p.requires_grad_(False)
    assert seq.num_frozen_blocks == 1


def test_no_side_effects():
    for key in ('r50_frozen1', 'seg_r50_v1c_d8', 'cspnext_frozen1'):
        backbone = build(key)
        state = _state(backbone)
        flags = [m.training for m in backbone.modules()]
        grads = [p.requires_grad for p in backbone.parameters()]
        seq = build_block_sequence(backbone)
        ranges = plan_split(seq, num_modules=3)
        module_output_info(seq, ranges)
        plan_split(seq, num_modules=3, stage_aligned=True)
        repr(seq)
        assert _same_state(_state(backbone), state), key
        assert [m.training for m in backbone.modules()] == flags, key
        assert [p.requires_grad for p in backbone.parameters()] == grads, key
        # the adapter is not an nn.Module: no parameter registered twice
        assert not isinstance(seq, nn.Module)


# ------------------------------------------------------------------ plan_split
@pytest.fixture(scope='module')
def r50():
    return build_block_sequence(_build('mmdet', type='ResNet', depth=50))


@pytest.fixture(scope='module')
def r50_frozen():
    return build_block_sequence(build('r50_frozen1'))


def _check_cover(ranges, n):
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(s < e for s, e in ranges)


def test_plan_k1_is_end_to_end(r50, r50_frozen):
    assert plan_split(r50, num_modules=1) == [(0, 16)]
    assert plan_split(r50_frozen, num_modules=1) == [(0, 16)]
    assert plan_split(r50, split_points=[]) == [(0, 16)]


def test_plan_even(r50):
    assert plan_split(
        r50, num_modules=4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    # K=8 cuts inside stages
    assert plan_split(
        r50, num_modules=8) == [(i, i + 2) for i in range(0, 16, 2)]
    # uneven: sizes differ by one, larger groups last
    ranges = plan_split(r50, num_modules=3)
    assert [e - s for s, e in ranges] == [5, 5, 6]
    for k in range(1, 17):
        ranges = plan_split(r50, num_modules=k)
        assert len(ranges) == k
        _check_cover(ranges, 16)
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)


def test_plan_frozen_prepended(r50_frozen):
    # 13 trainable blocks -> 3, 3, 3, 4; layer1 (3 frozen) joins module 0
    assert plan_split(
        r50_frozen, num_modules=4) == [(0, 6), (6, 9), (9, 12), (12, 16)]
    assert plan_split(r50_frozen, num_modules=13)[0] == (0, 4)
    assert len(plan_split(r50_frozen, num_modules=13)) == 13


def test_plan_stage_aligned(r50, r50_frozen):
    assert plan_split(r50, num_modules=4, stage_aligned=True) == \
        [(0, 3), (3, 7), (7, 13), (13, 16)]
    # best balance of stage cuts: 7/9 for K=2, 7/6/3 for K=3
    assert plan_split(r50, num_modules=2, stage_aligned=True) == \
        [(0, 7), (7, 16)]
    assert plan_split(r50, num_modules=3, stage_aligned=True) == \
        [(0, 7), (7, 13), (13, 16)]
    # frozen layer1 is not a stage of its own
    assert plan_split(r50_frozen, num_modules=3, stage_aligned=True) == \
        [(0, 7), (7, 13), (13, 16)]
    assert plan_split(r50_frozen, num_modules=2, stage_aligned=True) == \
        [(0, 7), (7, 16)]
    assert plan_split(r50, split_points=[3, 13], stage_aligned=True) == \
        [(0, 3), (3, 13), (13, 16)]


def test_plan_split_points(r50, r50_frozen):
    assert plan_split(
        r50, split_points=[1, 5, 15]) == [(0, 1), (1, 5), (5, 15), (15, 16)]
    assert plan_split(r50, split_points=(8, )) == [(0, 8), (8, 16)]
    assert plan_split(r50_frozen, split_points=[4]) == [(0, 4), (4, 16)]


@pytest.mark.parametrize('kwargs, option, words', [
    (dict(num_modules=0), 'num_modules', ['num_modules=0', '>= 1']),
    (dict(num_modules=-2), 'num_modules', ['num_modules=-2', '>= 1']),
    (dict(num_modules=20), 'num_modules', ['num_modules=20', '16 trainable']),
    (dict(num_modules=2.5), 'num_modules', ['num_modules=2.5', 'int']),
    (dict(num_modules=True), 'num_modules', ['int']),
    (dict(num_modules=5, stage_aligned=True), 'num_modules',
     ['num_modules=5', '4 trainable stages']),
    (dict(split_points=[4, 2]), 'split_points',
     ['split_points=[4, 2]', 'strictly increasing']),
    (dict(split_points=[4, 4]), 'split_points', ['strictly increasing']),
    (dict(split_points=[17]), 'split_points', ['split_points=[17]', '15']),
    (dict(split_points=[16]), 'split_points', ['out of range']),
    (dict(split_points=[0, 5]), 'split_points', ['out of range']),
    (dict(split_points=['a']), 'split_points', ['int']),
    (dict(split_points=5), 'split_points', ['split_points=5']),
    (dict(split_points=[5],
          stage_aligned=True), 'split_points', ['stage_aligned', '[5]']),
    (dict(), 'num_modules', ['split_points']),
    (dict(num_modules=2, split_points=[3]), 'num_modules', ['split_points']),
])
def test_plan_errors(r50, kwargs, option, words):
    with pytest.raises(ValueError) as err:
        plan_split(r50, **kwargs)
    msg = str(err.value)
    assert option in msg and 'ResNet' in msg, msg
    for word in words:
        assert word in msg, msg


@pytest.mark.parametrize('kwargs, words', [
    (dict(num_modules=14), ['num_modules=14', '13 trainable', '3 leading']),
    (dict(num_modules=4,
          stage_aligned=True), ['num_modules=4', '3 trainable stages']),
    (dict(split_points=[2]), ['split_points=[2]', 'frozen', '[4, 15]']),
    (dict(split_points=[3, 8]), ['split_points=[3, 8]', 'frozen']),
])
def test_plan_frozen_errors(r50_frozen, kwargs, words):
    with pytest.raises(ValueError) as err:
        plan_split(r50_frozen, **kwargs)
    msg = str(err.value)
    assert 'ResNet' in msg
    for word in words:
        assert word in msg, msg


# --------------------------------------------------------- module_output_info
def test_module_output_info(r50):
    ranges = plan_split(r50, num_modules=4)
    info = module_output_info(r50, ranges)
    assert [i['range'] for i in info] == ranges
    assert [i['out_channels'] for i in info] == [512, 1024, 1024, 2048]
    assert [i['stride'] for i in info] == [8, 16, 16, 32]
    assert [i['stage'] for i in info] == [1, 2, 2, 3]
    assert [i['next_block_name'] for i in info] == \
        ['layer2.1', 'layer3.1', 'layer3.5', None]
    backbone = r50.backbone
    assert info[0]['next_block'] is backbone.layer2[1]
    assert info[2]['next_block'] is backbone.layer3[5]
    assert info[3]['next_block'] is None

    info = module_output_info(
        r50, plan_split(r50, num_modules=4, stage_aligned=True))
    assert [i['next_block_name'] for i in info] == \
        ['layer2.0', 'layer3.0', 'layer4.0', None]
    assert info[0]['next_block'] is backbone.layer2[0]
    assert [i['out_channels'] for i in info] == [256, 512, 1024, 2048]

    with pytest.raises(ValueError, match='ranges'):
        module_output_info(r50, [(0, 4), (5, 16)])


# ------------------------------------------------------------ unsupported ones
def test_unknown_backbone():
    with pytest.raises(ValueError) as err:
        build_block_sequence(nn.Sequential(nn.Conv2d(3, 8, 3)))
    msg = str(err.value)
    assert 'Sequential' in msg
    for name in ('mmdet.ResNet', 'mmseg.ResNet', 'mmdet.CSPDarknet',
                 'mmdet.CSPNeXt'):
        assert name in msg, msg


def test_subclass_with_own_forward_is_rejected():
    # RegNet subclasses mmdet's ResNet but has no maxpool in its forward
    regnet = _build('mmdet', type='RegNet', arch='regnetx_400mf')
    with pytest.raises(ValueError, match='RegNet.*forward.*mmdet.ResNet'):
        build_block_sequence(regnet)


def test_forward_blocks_range_checked(r50):
    with pytest.raises(ValueError, match='block range'):
        r50.forward_blocks(torch.zeros(1), 3, 17, {})
    with pytest.raises(KeyError, match='not recorded'):
        r50.collect({})
