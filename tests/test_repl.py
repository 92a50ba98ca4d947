"""Replacement Learning: plans, parameter counts, exact gradients through
the synthesised operators, folding, training steps, LocalLearner."""
import copy
import importlib.util
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

from conftest import REPO
from local_utils import (TINY_RETINANET, KeepGradsOptimWrapper, det_batch,
                         seg_batch, small_aux)
from mmlocal.registry import MODELS

R18 = dict(
    type='mmdet.ResNet',
    depth=18,
    init_cfg=None,
    norm_eval=False,
    zero_init_residual=False)
R50 = dict(R18, depth=50)
VIT = dict(
    type='mmseg.VisionTransformer',
    img_size=(32, 32),
    patch_size=8,
    embed_dims=32,
    num_layers=4,
    num_heads=4,
    mlp_ratio=4,
    out_indices=(1, 3))
CSP = dict(
    type='mmdet.CSPDarknet',
    deepen_factor=0.33,
    widen_factor=0.125,
    out_indices=(2, 3, 4))
SCALAR = dict(type='mmlocal.RepLScalarMix')
CHANNEL = dict(type='mmlocal.RepLChannelMix')
LOWRANK = dict(type='mmlocal.RepLLowRankMix', rank=2)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny inputs gain nothing from threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scope(cfg):
    return 'mmseg' if 'mmseg.' in str(cfg.get('type')) else 'mmdet'


_STOCK = {}


def stock(backbone):
    """A fresh stock backbone (built once per config, then copied: building
    ResNet-50 or ViT-B is the slow part)."""
    key = repr(sorted(backbone.items()))
    if key not in _STOCK:
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope(_scope(backbone)):
            _STOCK[key] = MODELS.build(copy.deepcopy(backbone))
    return copy.deepcopy(_STOCK[key])


def repl(backbone, seed=0, from_cfg=False, **kwargs):
    """A RepLBackbone around ``backbone`` (a copy of the cached stock
    module, or built from the config with ``from_cfg``)."""
    cfg = dict(
        type='mmlocal.RepLBackbone',
        backbone=copy.deepcopy(backbone) if from_cfg else stock(backbone))
    cfg.update(kwargs)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(_scope(backbone)):
        return MODELS.build(cfg)


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def randomize(model, seed=1):
    """Non-trivial transforms and BN statistics (folding must carry them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'replacements.' in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                # tracked: the light layer does not recalibrate them
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(1)


def assert_close(got, expected, name='', rel=1e-7):
    """Equal up to ``rel`` of the tensor's scale (gradients of a randomly
    initialised ResNet reach 1e8)."""
    err = (got - expected).abs().max()
    assert err <= rel * expected.abs().max() + 1e-12, (name, err)


def outputs_loss(outs, seed=2):
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
               for o in outs)


# ------------------------------------------------------------------ plans
def test_resnet50_interval_plans_and_frozen_stages():
    model = repl(R50, interval=2, layer='full')
    assert model.replaced_blocks == [
        'layer1.1', 'layer2.1', 'layer2.3', 'layer3.1', 'layer3.3', 'layer3.5',
        'layer4.1'
    ]
    plan = {p['name']: p for p in model.plan}
    # block 1 reads e*p channels, block 0 the previous stage's: conv1 from
    # k+1 only; the last block of a stage mirrors k-1
    assert plan['layer2.1']['rules']['conv1.weight'] == 'next'
    assert plan['layer2.1']['rules']['conv2.weight'] == 'both'
    assert plan['layer2.3']['next'] is None
    assert set(plan['layer2.3']['rules'].values()) == {'prev'}
    assert model.kept_tensors == []
    # the light layer skips conv2/bn2 (identity when folded): no neighbour
    # needed, nothing synthesised for them
    light = {p['name']: p for p in repl(R50, interval=2).plan}
    assert light['layer2.1']['rules']['conv1.weight'] == 'next'
    assert light['layer2.1']['rules']['conv2.weight'] == 'unused'
    assert light['layer2.1']['rules']['bn2.bias'] == 'unused'
    assert light['layer3.3']['rules'][
        'conv3.weight'] == 'both'
    assert repl(
        R50, interval=3).replaced_blocks == [
            'layer1.2', 'layer2.2', 'layer3.2', 'layer3.5', 'layer4.2'
        ]
    frozen = repl(dict(R50, frozen_stages=1), interval=2)
    assert frozen.replaced_blocks[0] == 'layer2.1'
    # fusion=None: only blocks with two same-shaped neighbours
    assert repl(R50, interval=2, fusion=None).replaced_blocks == ['layer3.3']


def test_resnet18_keeps_unmatched_conv1():
    model = repl(R18, interval=2, layer='full')
    assert model.replaced_blocks == [
        'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1'
    ]
    assert model.kept_tensors == [
        'layer2.1.conv1.weight', 'layer3.1.conv1.weight',
        'layer4.1.conv1.weight'
    ]
    kept = model.backbone.layer2[1].conv1.weight
    assert isinstance(kept, torch.nn.Parameter) and kept.requires_grad
    # the light BasicBlock skips conv1: nothing is kept
    light = repl(R18, interval=2)
    assert light.kept_tensors == []
    assert 'layer2.1.conv1.weight' in light.skipped_tensors


@pytest.mark.parametrize('kwargs, match', [
    (dict(blocks=[0]), r'blocks=\[0\].*layer1\.0.*first block'),
    (dict(blocks=[3]), r'blocks=\[3\].*layer2\.0.*first block'),
    (dict(blocks=[99]), r'blocks=\[99\] out of range'),
    (dict(blocks=[-1]), r'blocks=\[-1\] out of range'),
    (dict(interval=1), r'interval=1 must be >= 2'),
    (dict(interval=0), r'interval=0 must be >= 2'),
    (dict(interval=True), r'interval=True must be an int'),
    (dict(interval=2, blocks=[1]), r'exactly one of interval and blocks'),
    (dict(), r'exactly one of interval and blocks'),
    (dict(blocks=[1, 2]), r'blocks=\[1, 2\].*neighbours'),
    (dict(blocks=[1, 1]), r'blocks=\[1, 1\] has duplicates'),
    (dict(blocks=[2], fusion=None), r'blocks: block layer1\.2.*fusion=None'),
    (dict(blocks=[1], fusion='nearest'), r"fusion='nearest'"),
    (dict(blocks=[1], transform=dict(type='Nope')), r"transform.type="),
    (dict(blocks=[1], layer='tiny'), r"layer='tiny' must be one of"),
])
def test_bad_plans_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        repl(R50, **kwargs)


def test_bad_plans_other_backbones():
    with pytest.raises(ValueError, match=r'blocks=\[1\].*frozen'):
        repl(dict(R50, frozen_stages=1), blocks=[1])
    with pytest.raises(
            ValueError, match=r'blocks=\[0\].*first transformer layer'):
        repl(VIT, blocks=[0])
    with pytest.raises(ValueError, match=r'blocks=\[0\].*first bottleneck'):
        repl(CSP, blocks=[0])
    with pytest.raises(
            ValueError, match=r"layer='light'.*DarknetBottleneck.*'full'"):
        repl(CSP, interval=2, layer='light')
    with pytest.raises(ValueError,
                       match=r"layer='light'.*layer1\.1.*affine BatchNorm"):
        repl(
            dict(R18, norm_cfg=dict(type='GN', num_groups=8)),
            blocks=[1],
            from_cfg=True)
    with pytest.raises(
            ValueError,
            match=r'backbone=MobileNetV2 is not '
            r'supported by RepLBackbone'):
        repl(dict(type='mmdet.MobileNetV2'), interval=2, from_cfg=True)


# ------------------------------------------------------- parameter counts
R50_STOCK = 23_508_032  # torchvision ResNet-50 without fc


def _bottleneck(p):
    # conv1 4p*p, conv2 9p^2, conv3 4p*p; three BN (p, p, 4p) x (w, b)
    return 17 * p * p + 12 * p


@pytest.mark.parametrize(
    'layer, transform, per_block',
    [
        ('full', SCALAR, lambda p: 2),
        ('full', CHANNEL, lambda p: 2 * 12 * p),  # 2(p + p + p + p + 4p + 4p)
        ('full', dict(type='mmlocal.RepLLowRankMix', rank=4),
         lambda p: 2 * 12 * p * (1 + 2 * 4)),
        # light: conv1, bn1, conv3, bn3 only -> 2 (p + p + 4p + 4p)
        ('light', SCALAR, lambda p: 2),
        ('light', CHANNEL, lambda p: 2 * 10 * p),
        ('light', dict(type='mmlocal.RepLLowRankMix', rank=4),
         lambda p: 2 * 10 * p * (1 + 2 * 4)),
    ])
def test_resnet50_trainable_params_analytic(layer, transform, per_block):
    assert trainable(stock(R50)) == R50_STOCK
    model = repl(R50, interval=2, transform=transform, layer=layer)
    # layer1.1, layer2.1, layer2.3, layer3.1, layer3.3, layer3.5, layer4.1
    planes = [64, 128, 128, 256, 256, 256, 512]
    expected = R50_STOCK - sum(_bottleneck(p) for p in planes) + \
        sum(per_block(p) for p in planes)
    assert trainable(model) == expected
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 1 - expected / R50_STOCK > 0.20


@pytest.mark.parametrize(
    'mode, transform, per_block',
    [
        ('full', SCALAR, lambda d: 2),
        ('full', CHANNEL,
         lambda d: 2 * 11 * d),  # ln1 D, qkv 3D, proj D, ln2 D, fc 4D+D
        ('full', LOWRANK, lambda d: 2 * 11 * d * (1 + 2 * 2)),
        # light (MLP only): ln2 D, fc1 4D, fc2 D
        ('light', SCALAR, lambda d: 2),
        ('light', CHANNEL, lambda d: 2 * 6 * d),
        ('light', LOWRANK, lambda d: 2 * 6 * d * (1 + 2 * 2)),
    ])
def test_vit_b_trainable_params_analytic(mode, transform, per_block):
    d, layers, tokens = 768, 12, 1 + (32 // 16)**2
    vit_b = dict(
        type='mmseg.VisionTransformer', img_size=(32, 32), patch_size=16)
    layer = 12 * d * d + 13 * d  # qkv 3D^2+3D, proj D^2+D, MLP 8D^2+5D, LN 4D
    stem = 3 * 16 * 16 * d + d + tokens * d  # patch conv (no bias), cls, pos
    model = repl(vit_b, interval=2, transform=transform, layer=mode)
    assert model.replaced_blocks == [
        f'layers.{i}' for i in (1, 3, 5, 7, 9, 11)
    ]
    expected = stem + (layers - 6) * layer + 6 * per_block(d)
    assert trainable(model) == expected
    assert trainable(model.backbone) == stem + (layers - 6) * layer
    assert 1 - expected / (stem + layers * layer) > 0.20


# -------------------------------------------------- gradients and folding
def _exact_grads(backbone, transform, seed=0, **kwargs):
    """RepL gradients == stock gradients pushed through the synthesis.

    With the scalar mix ``W_k = a W_{k-1} + b W_{k+1}`` and the folded stock
    model (``W_k`` a leaf) giving ``g_k = dL/dW_k``:
    ``dL/dW_{k-1} = own + a g_k``, ``dL/dW_{k+1} = own + b g_k``,
    ``dL/da = <g_k, W_{k-1}>``, ``dL/db = <g_k, W_{k+1}>`` (mirror: both
    coefficients on the one neighbour).

    ``layer='light'``: the light layer normalises with running statistics,
    so the folded stock blocks run their norms in eval mode; skipped layers
    fold to identities and get nothing.
    """
    model = repl(backbone, seed=seed, transform=transform, **kwargs)
    randomize(model)
    # float64: the identities are exact, rounding should not hide a miss
    model.double().train()
    ref = stock(backbone).double()
    ref.load_state_dict(model.fold_state_dict(), strict=True)
    ref.train()
    if model.layer == 'light':
        for name in model.replaced_blocks:
            for m in ref.get_submodule(name).modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
    x = torch.randn(
        2,
        3,
        32,
        32,
        generator=torch.Generator().manual_seed(3),
        dtype=torch.float64)
    outputs_loss(model(x)).backward()
    outputs_loss(ref(x)).backward()
    got = {n: p.grad for n, p in model.backbone.named_parameters()}
    ref_params = dict(ref.named_parameters())
    ref_grads = {n: p.grad for n, p in ref_params.items()}
    expected = {n: ref_grads[n].clone() for n in got}
    both = 0
    for rep, plan in zip(model.replacements.values(), model.plan):
        t = rep.transforms['block']
        a, b = t.a.detach(), t.b.detach()
        ga = gb = 0.
        for rel, rule in plan['rules'].items():
            g_k = ref_grads[f'{plan["name"]}.{rel}']
            prev = f'{plan["prev"]}.{rel}' if plan['prev'] else None
            nxt = f'{plan["next"]}.{rel}' if plan['next'] else None
            if rule == 'both':
                both += 1
                expected[prev] += a * g_k
                expected[nxt] += b * g_k
                ga += (g_k * ref_params[prev]).sum()
                gb += (g_k * ref_params[nxt]).sum()
            elif rule in ('prev', 'next'):
                src = prev if rule == 'prev' else nxt
                expected[src] += (a + b) * g_k
                ga += (g_k * ref_params[src]).sum()
                gb += (g_k * ref_params[src]).sum()
        assert_close(t.a.grad, ga)
        assert_close(t.b.grad, gb)
        assert t.a.grad.abs() > 0 and t.b.grad.abs() > 0
    assert both > 0  # some tensors really come from both neighbours
    for name in got:
        assert_close(got[name], expected[name], name)
    # removed weights: no parameter, nothing trained, shape-only placeholder
    synthesized = set(model._synthesized_keys())
    assert not synthesized & set(got)
    for key in synthesized:
        path, name = key.rsplit('.', 1)
        placeholder = getattr(model.backbone.get_submodule(path), name)
        assert placeholder.device.type == 'meta'
    return model


@pytest.mark.parametrize('layer', ['full', 'light'])
def test_gradients_reach_both_neighbours_and_transforms_resnet(layer):
    _exact_grads(R50, SCALAR, interval=2, layer=layer)


@pytest.mark.parametrize('layer', ['full', 'light'])
def test_gradients_reach_both_neighbours_and_transforms_vit(layer):
    _exact_grads(VIT, SCALAR, interval=2, layer=layer)


def test_grouped_vectors_get_their_own_storage():
    """Norm vectors mixed in one call are returned contiguous: PyTorch's CPU
    ``batch_norm`` gives a wrong input gradient for a 1x1 input with a
    strided weight (found with the exact-gradient test above; the layer4
    maps of a 32 px image are 1x1)."""
    model = repl(R50, interval=2, transform=SCALAR, layer='full')
    rep = model.replacements['layer4_1']
    tensors = rep.synthesize()
    vectors = {k: t for k, t in tensors.items() if t.dim() == 1}
    assert len(vectors) >= 4  # bn1/bn2 weight and bias share one call
    assert all(t.is_contiguous() and t.storage_offset() == 0
               for t in vectors.values())


def test_gradients_light_resnet18_lowrank():
    """Light BasicBlocks (conv1 skipped) with the low-rank transform: the
    gradients of every parameter equal those of the folded stock model,
    through autograd of the synthesis (not the scalar identities)."""
    model = repl(R18, interval=2, transform=LOWRANK)
    randomize(model)
    model.double().train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    ref = stock(R18).double()
    ref_params = dict(ref.named_parameters())
    folded = {
        k: v.clone().requires_grad_(k in ref_params)
        for k, v in model.fold_state_dict().items()
    }
    outputs_loss(model(x)).backward()
    # stock forward with the folded tensors as leaves, replaced blocks' norms
    # in eval mode; then push their gradients through the synthesis
    ref.train()
    for name in model.replaced_blocks:
        for m in ref.get_submodule(name).modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    out = torch.func.functional_call(ref, folded, (x, ))
    outputs_loss(out).backward()
    params = dict(model.backbone.named_parameters())
    expected = {n: folded[n].grad.clone() for n in params}
    leaves = [p for p in model.parameters()]
    synth = []
    for rep in model.replacements.values():
        for (path, name), t in rep.synthesize().items():
            synth.append((t, folded[f'{rep.block_name}.{path}.{name}'].grad))
    extra = torch.autograd.grad([t for t, _ in synth], leaves,
                                [g for _, g in synth], allow_unused=True)
    for (n, p), e in zip(model.named_parameters(), extra):
        want = (expected[n[len('backbone.'):]]
                if n.startswith('backbone.') else 0.) + \
            (e if e is not None else 0.)
        assert_close(p.grad, want, n)
        assert p.grad.abs().sum() > 0, n
    # the skipped conv1 of a light BasicBlock gets nothing, is no parameter
    assert 'layer2.1.conv1.weight' not in params


def test_gradients_csp():
    model = _exact_grads(CSP, SCALAR, interval=2, layer='full')
    assert model.replaced_blocks == ['stage2.1.blocks.1', 'stage3.1.blocks.1']


@pytest.mark.parametrize('backbone, transform, layer', [
    (R50, LOWRANK, 'full'),
    (R50, LOWRANK, 'light'),
    (dict(R50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)), CHANNEL,
     'light'),
    (R18, CHANNEL, 'full'),
    (R18, CHANNEL, 'light'),
    (VIT, LOWRANK, 'full'),
    (VIT, LOWRANK, 'light'),
    (dict(VIT, final_norm=True, with_cp=True), CHANNEL, 'full'),
    (dict(VIT, final_norm=True, with_cp=True), CHANNEL, 'light'),
    (CSP, CHANNEL, 'full'),
])
def test_fold_equivalence(backbone, transform, layer):
    model = repl(backbone, interval=2, transform=transform, layer=layer)
    randomize(model)
    ref = stock(backbone)
    folded = model.fold_state_dict()
    assert list(folded) == list(ref.state_dict())  # stock keys and order
    ref.load_state_dict(folded, strict=True)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            assert (a - b).abs().max() <= 1e-5
    # RepL state dict: no replaced weights, transforms under replacements.
    keys = model.state_dict()
    assert not {'backbone.' + k for k in model._synthesized_keys()} & set(keys)
    assert any(k.startswith('replacements.') for k in keys)


def test_with_cp_gives_the_same_gradients():
    grads = []
    for with_cp in (False, True):
        model = repl(dict(R50, with_cp=with_cp), interval=2, transform=CHANNEL)
        randomize(model)
        model.double().train()
        x = torch.randn(
            2,
            3,
            32,
            32,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(5))
        outputs_loss(model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, name)


def test_deepcopy_after_a_step_trains_the_copy():
    """EMA hooks and model wrappers deepcopy models: the copy's hooks must
    synthesise from the copy's neighbours into the copy's blocks."""
    model = repl(R18, interval=2, transform=CHANNEL)
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    outputs_loss(model(x)).backward()
    model.zero_grad()
    twin = copy.deepcopy(model)
    outputs_loss(twin(x)).backward()
    assert all(p.grad is None for p in model.parameters())
    t = twin.replacements['layer3_1'].transforms['conv2']
    assert t.a.grad is not None and t.a.grad.abs().sum() > 0
    assert twin.replacements['layer3_1'].block is twin.backbone.layer3[1]
    # the light forward is bound to the copy's replacement
    assert twin.backbone.layer3[1].forward.__self__ is \
        twin.replacements['layer3_1']


def test_replaced_norms_track_statistics_under_norm_eval():
    model = repl(dict(R18, norm_eval=True), interval=2)
    model.train()
    assert model.backbone.layer1[1].bn1.training
    assert not model.backbone.layer1[0].bn1.training
    frozen_norms = repl(
        dict(R18, norm_eval=True), interval=2, replaced_norm_eval=True)
    frozen_norms.train()
    assert not frozen_norms.backbone.layer1[1].bn1.training
    # light layer, frozen norms: statistics calibrated once, then fixed
    bn = frozen_norms.backbone.layer1[1].bn2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    frozen_norms(x)
    calibrated = bn.running_var.clone()
    assert not torch.all(calibrated == 1)
    frozen_norms(x * 3)
    assert torch.equal(bn.running_var, calibrated)


def _saved_bytes(model, module, x):
    """Bytes autograd keeps for backward in ``module(x)`` (distinct storages;
    the model's parameters and the input excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize('backbone, name, shape', [
    (R50, 'layer2.1', (2, 512, 32, 32)),
    (dict(VIT, img_size=(128, 128)), 'layers.1', (2, 257, 32)),
])
def test_light_layer_saves_activations(backbone, name, shape):
    """The light Bottleneck keeps its p-channel ReLU output and its output
    (5p channels) where the stock block keeps 12p (synthesised weights
    counted too); the light ViT layer keeps no attention matrices."""
    full = repl(backbone, interval=2, layer='full')
    light = repl(backbone, interval=2)
    x = torch.randn(*shape).relu_().requires_grad_()
    for m in (full, light):
        m.train()
        # calibrate the light layer's statistics on this input
        m.backbone.get_submodule(name)(x.detach())
    stock_block = name[:-1] + '2'  # a kept block of the same shapes
    stock_bytes = _saved_bytes(full, full.backbone.get_submodule(stock_block),
                               x)
    full_bytes = _saved_bytes(full, full.backbone.get_submodule(name), x)
    light_bytes = _saved_bytes(light, light.backbone.get_submodule(name), x)
    assert full_bytes >= stock_bytes  # full layer: same activations
    assert light_bytes < 0.55 * stock_bytes, (light_bytes, stock_bytes)


def test_light_statistics_calibrate_then_track():
    model = repl(R18, interval=2, transform=CHANNEL)
    model.init_weights()
    model.train()
    rep = model.replacements['layer2_1']
    block = model.backbone.layer2[1]
    seen = []
    block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))

    def batch_stats():
        weight = rep.synthesize()[('conv2', 'weight')].detach()
        z = torch.nn.functional.conv2d(seen[-1], weight, None, 1, 1)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=True)
        return mean, var

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    model(x)
    mean, var = batch_stats()
    # first batch: exact calibration (not the reset 0 / 1)
    assert_close(block.bn2.running_mean, mean, rel=1e-5)
    assert_close(block.bn2.running_var, var, rel=1e-5)
    assert int(block.bn2.num_batches_tracked) == 1
    old_mean = block.bn2.running_mean.clone()
    old_var = block.bn2.running_var.clone()
    model(x * 2)
    mean, var = batch_stats()
    m = block.bn2.momentum
    assert_close(block.bn2.running_mean, (1 - m) * old_mean + m * mean,
                 rel=1e-4)
    assert_close(block.bn2.running_var, (1 - m) * old_var + m * var,
                 rel=1e-4)
    # eval: nothing tracked
    model.eval()
    before = block.bn2.running_mean.clone()
    model(x)
    assert torch.equal(before, block.bn2.running_mean)


def test_light_statistics_recalibrate_after_reset_or_load():
    """The light layer reads ``num_batches_tracked`` (a host sync on a GPU)
    only until its statistics are set; a reset (``init_weights``) or a
    loaded checkpoint with reset statistics makes it calibrate again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            read = torch.ops.aten._local_scalar_dense
            Reads.n += func.overloadpacket is read
            return func(*args, **(kwargs or {}))

    model = repl(R18, interval=2, transform=CHANNEL)
    model.init_weights()
    model.train()
    fresh = copy.deepcopy(model.state_dict())
    bn = model.backbone.layer2[1].bn2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with Reads():
        model(x)
    assert Reads.n > 0 and int(bn.num_batches_tracked) == 1
    Reads.n = 0
    with Reads():
        model(x)
    assert Reads.n == 0  # statistics known to be set: no device read
    calibrated = bn.running_var.clone()
    assert not torch.allclose(calibrated, torch.ones_like(calibrated))

    model.load_state_dict(fresh)  # reset statistics come back
    assert int(bn.num_batches_tracked) == 0
    model(x)
    assert int(bn.num_batches_tracked) == 1
    assert_close(bn.running_var, calibrated, rel=1e-5)  # calibrated again

    model(x * 3)
    model.init_weights()
    model(x)
    assert int(bn.num_batches_tracked) == 1
    assert_close(bn.running_var, calibrated, rel=1e-5)


def test_light_vit_with_cp_gives_the_same_gradients():
    grads = []
    for with_cp in (False, True):
        model = repl(dict(VIT, with_cp=with_cp), interval=2,
                     transform=CHANNEL)
        randomize(model)
        model.double().train()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(5))
        outputs_loss(model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        assert_close(grads[1][name], g, name)


# --------------------------------------------------- pretrained weights
def test_pretrained_neighbours_load_replaced_dropped(tmp_path):
    src = stock(R18)
    randomize(src)
    path = str(tmp_path / 'r18.pth')
    torch.save(src.state_dict(), path)
    model = repl(
        dict(R18, init_cfg=dict(type='Pretrained', checkpoint=path)),
        interval=2,
        from_cfg=True)
    model.init_weights()
    for name, p in model.backbone.named_parameters():
        torch.testing.assert_close(p, src.state_dict()[name], msg=name)
    # replaced block: weights gone, BN statistics reset (not pretrained)
    bn = model.backbone.layer3[1].bn2
    assert 'weight' not in bn._parameters
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)

    # a stock-keyed detector state dict loads into a RepL detector
    det = _retinanet_cfg()
    with DefaultScope.overwrite_default_scope('mmdet'):
        stock_det = MODELS.build(TINY_RETINANET)
        repl_det = MODELS.build(det)
    missing, unexpected = repl_det.load_state_dict(
        stock_det.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all('.replacements.' in k for k in missing)
    torch.testing.assert_close(
        repl_det.backbone.backbone.layer1[0].conv1.weight,
        stock_det.backbone.layer1[0].conv1.weight)


# ------------------------------------------------------ training steps
def _retinanet_cfg(**kwargs):
    cfg = copy.deepcopy(TINY_RETINANET)
    # zero_init_residual would make every residual branch (and so the
    # transforms' gradient) zero at the first step
    cfg['backbone'] = dict(
        type='mmlocal.RepLBackbone',
        backbone=dict(cfg['backbone'], zero_init_residual=False),
        interval=2,
        transform=LOWRANK,
        **kwargs)
    return ConfigDict(cfg)


class StepKeepGrads(OptimWrapper):
    """Steps, never zeroes: the gradients of the step stay to inspect."""

    def zero_grad(self, **kwargs):
        pass


def _step_changes_transforms(model, batch, optim_wrapper):
    """One train_step: finite loss, every transform parameter gets a
    gradient (``v`` of the low-rank mix only from the second step, as ``u``
    starts at zero) and the step changes them."""
    before = {
        n: p.detach().clone()
        for n, p in model.named_parameters() if '.replacements.' in n
    }
    log_vars = model.train_step(batch, optim_wrapper)
    assert torch.isfinite(log_vars['loss'])
    for n, p in model.named_parameters():
        if n in before and not n.endswith(('.v_a', '.v_b')):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    changed = [
        n for n, p in model.named_parameters()
        if n in before and not torch.equal(p, before[n])
    ]
    assert changed
    return log_vars


def test_detector_train_step():
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(_retinanet_cfg())
    model.init_weights()
    optim = StepKeepGrads(torch.optim.SGD(model.parameters(), lr=0.01))
    _step_changes_transforms(model, det_batch(), optim)


def test_segmentor_train_step_vit():
    cfg = dict(
        type='mmseg.EncoderDecoder',
        data_preprocessor=dict(
            type='mmseg.SegDataPreProcessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            size=(32, 32)),
        backbone=dict(
            type='mmlocal.RepLBackbone',
            backbone=VIT,
            interval=2,
            transform=LOWRANK),
        decode_head=dict(
            type='mmseg.FCNHead',
            in_channels=32,
            in_index=1,
            channels=16,
            num_convs=1,
            num_classes=3,
            dropout_ratio=0.0,
            norm_cfg=dict(type='BN')),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        torch.manual_seed(0)
        model = MODELS.build(cfg)
    model.init_weights()
    optim = StepKeepGrads(torch.optim.SGD(model.parameters(), lr=0.01))
    _step_changes_transforms(model, seg_batch(size=32), optim)


def test_repl_inside_local_learner():
    cfg = dict(
        type='mmlocal.LocalLearner',
        model=_retinanet_cfg(),
        num_modules=2,
        aux=small_aux())
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        learner = MODELS.build(cfg)
    learner.init_weights()
    inner = learner.model.backbone
    # LocalLearner splits the inner ResNet; replaced blocks run through it
    assert learner._seq.backbone is inner.backbone
    assert inner.backbone.layer3[1] in learner._seq.blocks
    optim = KeepGradsOptimWrapper(
        torch.optim.SGD(learner.parameters(), lr=0.01))
    log_vars = learner.train_step(det_batch(), optim)
    assert torch.isfinite(log_vars['loss']) and 'loss_local0' in log_vars
    for name, p in inner.replacements.named_parameters():
        if name.endswith(('.a', '.b')):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------ converter
def _load_tool():
    path = osp.join(REPO, 'tools', 'model_converters', 'repl_fold.py')
    spec = importlib.util.spec_from_file_location('repl_fold', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fold_tool_writes_a_stock_checkpoint(tmp_path):
    cfg = Config(dict(model=_retinanet_cfg(), default_scope='mmdet'))
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    randomize(model)
    src, dst = str(tmp_path / 'repl.pth'), str(tmp_path / 'stock.pth')
    stock_cfg = str(tmp_path / 'stock_cfg.py')
    torch.save(
        dict(meta=dict(cfg=cfg.pretty_text), state_dict=model.state_dict()),
        src)
    tool = _load_tool()
    assert tool.main([src, dst, '--out-config', stock_cfg, '--verify']) == 0
    out, _, diff = tool.fold_checkpoint(src, dst, verify=True, force=True)
    assert diff <= 1e-5
    assert all('replacements' not in k for k in out)
    assert tool.main([src, dst]) == 1  # never overwrites silently

    # the stock model loads it strictly, in a process without mmlocal
    code = f"""
import sys, torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
cfg = Config.fromfile({stock_cfg!r})
init_default_scope('mmdet')
model = MODELS.build(cfg.model)
model.load_state_dict(torch.load({dst!r})['state_dict'], strict=True)
assert 'mmlocal' not in sys.modules and 'mmlocal' not in cfg.pretty_text
print('OK')
"""
    proc = subprocess.run([sys.executable, '-c', code],
                          cwd='/',
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'OK' in proc.stdout
