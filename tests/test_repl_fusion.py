"""RepL fusion across stage ends (``fusion='project'``) and the zero
gradient of ``zero_init_residual``."""
import pytest
import torch
from test_repl import (CHANNEL, LOWRANK, R18, R50, SCALAR, VIT, assert_close,
                       outputs_loss, randomize, repl, stock)

from mmlocal.models.repl.transforms import RepLProjection


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(seed=3, dtype=torch.float32):
    return torch.randn(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(seed),
        dtype=dtype)


# ------------------------------------------------------------ projection
def test_projection_reduce_and_expand_formula():
    g = torch.Generator().manual_seed(0)
    # reduce dim 0 (8 -> 4, m = 2), expand dim 1 (3 -> 6, m = 2)
    proj = RepLProjection({0: (8, 4), 1: (3, 6)})
    assert proj.alpha0.shape == (4, 2) and proj.alpha1.shape == (3, 2)
    assert torch.all(proj.alpha0 == 0.5) and torch.all(proj.alpha1 == 1)
    with torch.no_grad():
        proj.alpha0.normal_(generator=g)
        proj.alpha1.normal_(generator=g)
    w = torch.randn(8, 3, 3, 3, generator=g)
    got = proj(w)
    want = torch.zeros(4, 6, 3, 3)
    for c in range(4):
        for i in range(6):
            want[c, i] = sum(proj.alpha0[c, j] * w[c * 2 + j, i // 2] *
                             proj.alpha1[i // 2, i % 2] for j in range(2))
    assert_close(got, want.detach(), rel=1e-6)
    # a vector uses dim 0 only; a vector of ones stays ones at init
    fresh = RepLProjection({0: (8, 4), 1: (3, 6)})
    assert torch.equal(fresh(torch.ones(8)), torch.ones(4))
    with pytest.raises(ValueError, match=r'dim 0: 6 -> 4 channels'):
        RepLProjection({0: (6, 4)})
    with pytest.raises(ValueError, match=r'dim 0 of a \(5,\) tensor'):
        fresh(torch.ones(5))


# ----------------------------------------------------------------- plans
def test_project_plans_take_the_next_stage():
    plan = {
        p['name']: p
        for p in repl(R50, interval=2, fusion='project', layer='full').plan
    }
    # the last block of a stage: successor = next stage's first block
    assert plan['layer2.3']['next'] == 'layer3.0'
    assert plan['layer2.3']['rules']['conv2.weight'] == 'prev+proj(next)'
    assert plan['layer2.3']['rules']['bn3.bias'] == 'prev+proj(next)'
    # block 1's conv1: block 0's (previous stage's input width) projected
    assert plan['layer2.1']['rules']['conv1.weight'] == 'proj(prev)+next'
    assert plan['layer2.1']['rules']['conv2.weight'] == 'both'
    assert plan['layer3.5']['next'] == 'layer4.0'
    # the backbone's last block has no successor: mirrored
    last = repl(R50, interval=3, fusion='project')
    assert last.replaced_blocks[-1] == 'layer4.2'
    assert last.plan[-1]['next'] is None
    assert set(last.plan[-1]['rules'].values()) - {'unused'} == {'prev'}
    # ResNet-18 full: conv1 of block 1 from both neighbours, projected;
    # nothing stays trainable
    r18 = repl(R18, interval=2, fusion='project', layer='full')
    rules = {p['name']: p['rules'] for p in r18.plan}
    assert rules['layer2.1']['conv1.weight'] == 'proj(prev)+proj(next)'
    assert rules['layer4.1']['conv1.weight'] == 'proj(prev)'
    assert r18.kept_tensors == []
    # ViT: one stage, the last layer mirrors
    vit = repl(VIT, interval=2, fusion='project')
    assert vit.plan[-1]['next'] is None
    # mirror is unchanged: no successor at a stage end
    assert repl(R50, interval=2).plan[2]['next'] is None


def test_project_trainable_params_are_the_projections():
    mirror = repl(R18, interval=2)
    project = repl(R18, interval=2, fusion='project')
    extra = sum(p.numel() for n, p in project.named_parameters()
                if '.projections.' in n)
    # light BasicBlock: conv2 (C -> 2C on dims 0 and 1) and bn2 weight and
    # bias (dim 0) of layer{1,2,3}.1 from layer{2,3,4}.0; layer4.1 mirrors
    assert extra == sum(2 * c + 2 * c + 2 * c for c in (64, 128, 256))
    assert sum(p.numel() for p in project.parameters()) == sum(
        p.numel() for p in mirror.parameters()) + extra


# ------------------------------------------------------------- gradients
@pytest.mark.parametrize('fusion', ['mirror', 'project'])
def test_stage_end_coefficients(fusion):
    """At a stage end 'mirror' gives the two scalar coefficients identical
    gradients (both multiply the same tensor); 'project' does not, and the
    next stage's first block gets gradient from the replaced block."""
    model = repl(R18, interval=2, transform=SCALAR, fusion=fusion)
    randomize(model)
    model.train()
    outputs_loss(model(_x())).backward()
    t = model.replacements['layer1_1'].transforms['block']
    if fusion == 'mirror':
        assert torch.equal(t.a.grad, t.b.grad)
    else:
        assert not torch.allclose(t.a.grad, t.b.grad)
        proj = model.replacements['layer1_1'].projections
        assert set(proj) == {'conv2_next', 'bn2_next'}
        assert all(p.grad.abs().sum() > 0 for p in proj.parameters())


def test_project_gradients_equal_folded_stock():
    """Every parameter's gradient (neighbours, next stage's first blocks,
    transforms, projections) equals the folded stock model's gradients
    pushed through the synthesis (float64)."""
    model = repl(R18, interval=2, transform=LOWRANK, fusion='project')
    randomize(model)
    model.double().train()
    x = _x(dtype=torch.float64)
    ref = stock(R18).double()
    ref_params = dict(ref.named_parameters())
    folded = {
        k: v.clone().requires_grad_(k in ref_params)
        for k, v in model.fold_state_dict().items()
    }
    outputs_loss(model(x)).backward()
    ref.train()
    for name in model.replaced_blocks:
        for m in ref.get_submodule(name).modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    outputs_loss(torch.func.functional_call(ref, folded, (x, ))).backward()
    synth = []
    for rep in model.replacements.values():
        for (path, name), t in rep.synthesize().items():
            synth.append((t, folded[f'{rep.block_name}.{path}.{name}'].grad))
    leaves = list(model.parameters())
    extra = torch.autograd.grad([t for t, _ in synth], leaves,
                                [g for _, g in synth], allow_unused=True)
    for (n, p), e in zip(model.named_parameters(), extra):
        own = folded[n[len('backbone.'):]].grad \
            if n.startswith('backbone.') else 0.
        assert_close(p.grad, own + (e if e is not None else 0.), n)
    # the successor across the stage end is reached through the projection
    own = folded['layer2.0.conv2.weight'].grad
    through = model.backbone.layer2[0].conv2.weight.grad - own
    assert through.abs().sum() > 0


@pytest.mark.parametrize('backbone, transform, layer', [
    (R50, LOWRANK, 'light'),
    (R18, CHANNEL, 'full'),
])
def test_project_fold_equivalence(backbone, transform, layer):
    model = repl(backbone, interval=2, transform=transform, layer=layer,
                 fusion='project')
    randomize(model)
    ref = stock(backbone)
    folded = model.fold_state_dict()
    assert list(folded) == list(ref.state_dict())
    ref.load_state_dict(folded, strict=True)
    model.eval()
    ref.eval()
    with torch.no_grad():
        for a, b in zip(model(_x(4)), ref(_x(4))):
            assert (a - b).abs().max() <= 1e-5


# ---------------------------------------------------- zero_init_residual
@pytest.mark.parametrize('fusion', ['mirror', 'project'])
def test_zero_init_residual_gives_no_transform_gradient_at_step_one(fusion):
    """mmdet's ResNet zero-initialises the last norm weight of each block;
    the synthesised one is then zero and every transform of the block gets
    a zero gradient until the neighbours' norm weights move (documented;
    init_weights warns)."""
    model = repl(
        dict(R18, zero_init_residual=True), interval=2, transform=LOWRANK,
        fusion=fusion, from_cfg=True)
    model.init_weights()
    assert model.zero_synthesized_norms() == [
        f'layer{i}.1.bn2.weight' for i in (1, 2, 3, 4)
    ]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _x()
    outputs_loss(model(x)).backward()
    phi = [p for n, p in model.named_parameters() if 'replacements.' in n]
    assert all(p.grad is None or not p.grad.any() for p in phi)
    opt.step()
    opt.zero_grad()
    assert model.zero_synthesized_norms() == []
    outputs_loss(model(x)).backward()
    assert sum(p.grad.abs().sum() for p in phi if p.grad is not None) > 0
    # without zero_init_residual the transforms learn from the first step
    plain = repl(R18, interval=2, transform=LOWRANK, fusion=fusion,
                 from_cfg=True)
    plain.init_weights()
    assert plain.zero_synthesized_norms() == []
