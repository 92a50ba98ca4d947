"""RepL's batched synthesis (``synthesis='batched'``, the default) against
the per-block path: same outputs, gradients and statistics, fewer kernels;
and its ``torch.compile`` option."""
import pytest
import torch
from local_utils import (TINY_RETINANET, HostReads, KeepGradsOptimWrapper,
                         det_batch, small_aux)
from mmengine.config import ConfigDict
from mmengine.registry import DefaultScope
from test_repl import (CHANNEL, LOWRANK, R18, R50, SCALAR, VIT, assert_close,
                       outputs_loss, randomize, repl)

from mmlocal.models.repl.light import STATS_READY
from mmlocal.registry import MODELS


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(seed, size=64, batch=2):
    # float64 and 64 px: train-mode BN over 2 x 1 x 1 maps (ResNet layer4 of
    # a 32 px image) amplifies a 1e-12 difference of the weights to 1e-4
    return torch.randn(
        batch, 3, size, size, generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64)


def _pair(backbone, **kwargs):
    """A per-block and a batched model with the same weights."""
    models = []
    for mode in ('per_block', 'batched'):
        m = repl(backbone, interval=2, synthesis=mode, **kwargs)
        randomize(m)
        m.double().train()
        models.append(m)
    assert models[0].engine is None and models[1].engine is not None
    return models


def _compare_steps(models, steps=3, size=64, rel=1e-5):
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in models]
    device = next(models[0].parameters()).device
    for step in range(steps):
        x = _x(10 + step, size).to(device)
        outs = [m(x) for m in models]
        for a, b in zip(*outs):
            assert_close(b, a.detach(), f'output {step}', rel=rel)
        for m, out in zip(models, outs):
            outputs_loss(out).backward()
        grads = [dict(m.named_parameters()) for m in models]
        for name, p in grads[0].items():
            q = grads[1][name]
            if p.grad is None:
                assert q.grad is None or not q.grad.any(), name
                continue
            assert_close(q.grad, p.grad, f'{name} step {step}', rel=rel)
        # one scale for both (random ResNet gradients reach 1e8): equal
        # steps of at most lr
        scale = max(p.grad.abs().max() for p in grads[0].values()
                    if p.grad is not None)
        for m, opt in zip(models, opts):
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.div_(scale)
            opt.step()
            opt.zero_grad()
        states = [m.state_dict() for m in models]
        assert list(states[0]) == list(states[1])
        for key, value in states[0].items():
            if value.is_floating_point():
                assert_close(states[1][key], value, key, rel=rel)
            else:
                assert torch.equal(states[1][key], value), key
    for m in models:
        m.eval()
    with torch.no_grad():
        outs = [m(_x(99, size).to(device)) for m in models]
    for a, b in zip(*outs):
        assert_close(b, a, 'eval output', rel=rel)


R50_MMDET = dict(R50, frozen_stages=1)  # the mmdet recipe's 6 blocks


@pytest.mark.parametrize('backbone, transform, fusion, steps', [
    # all rules: both, prev+proj(next), proj(prev)+next (R50 'project'),
    # prev (R18 'mirror': every block is a stage end), the scalar's shared
    # coefficients, ViT layers (no folding)
    (R50_MMDET, LOWRANK, 'project', 2),
    (R18, SCALAR, 'project', 3),
    (R18, CHANNEL, 'mirror', 3),
    (VIT, LOWRANK, 'mirror', 3),
])
def test_batched_equals_per_block(backbone, transform, fusion, steps):
    _compare_steps(
        _pair(backbone, transform=transform, fusion=fusion),
        steps=steps,
        size=32 if backbone is VIT else 64)


def test_batched_calibrates_like_per_block():
    """After init_weights the first training pass calibrates the statistics
    (per-block path); the batched path takes over from the second."""
    models = []
    for mode in ('per_block', 'batched'):
        m = repl(R18, interval=2, transform=LOWRANK, synthesis=mode,
                 fusion='project')
        m.init_weights()
        m.double().train()
        models.append(m)
    _compare_steps(models, steps=2)


def test_batched_inside_local_learner_backward_per_module():
    """LocalLearner backpropagates module by module: a backward through the
    batched tensors makes the next block recompute them (no second backward
    through a freed graph), with the per-block path's gradients."""
    grads = []
    for mode in ('per_block', 'batched'):
        model_cfg = ConfigDict(TINY_RETINANET)
        model_cfg.backbone = dict(
            type='mmlocal.RepLBackbone',
            backbone=dict(model_cfg.backbone, zero_init_residual=False),
            interval=2,
            transform=CHANNEL,
            synthesis=mode)
        cfg = dict(
            type='mmlocal.LocalLearner',
            model=model_cfg,
            num_modules=2,
            aux=small_aux())
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope('mmdet'):
            learner = MODELS.build(cfg)
        learner.init_weights()
        wrapper = KeepGradsOptimWrapper(
            torch.optim.SGD(learner.parameters(), lr=0.))
        for _ in range(2):  # calibration pass, then the batched one
            learner.train_step(det_batch(seed=1), wrapper)
        grads.append({
            n: p.grad.clone()
            for n, p in learner.named_parameters() if p.grad is not None
        })
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, name, rel=1e-5)


class _Kernels(HostReads):
    """Ops other than views (what ``count_ops.py`` counts as kernels)."""
    VIEWS = ('view', 't', 'reshape', 'detach', 'select', 'slice', 'expand',
             'as_strided', 'unsqueeze', 'squeeze', 'permute', 'transpose',
             '_unsafe_view', 'alias', 'split', 'split_with_sizes', 'unbind',
             'narrow', 'empty', 'empty_like', 'new_empty', 'empty_strided',
             '_reshape_alias')

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops -= func.overloadpacket.__name__ in self.VIEWS
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_batched_launches_fewer_kernels():
    counts = []
    for mode in ('per_block', 'batched'):
        model = repl(R50_MMDET, interval=2, transform=LOWRANK,
                     synthesis=mode)
        model.train()
        x = _x(0, size=32).float()
        outputs_loss(model(x)).backward()  # calibration pass
        model.zero_grad()
        with _Kernels() as counter:
            outputs_loss(model(x)).backward()
        assert counter.count == 0  # no host read of a device value
        counts.append(counter.ops)
    per_block, batched = counts
    # 6 replaced blocks: the synthesis of every tensor, the folding and the
    # statistics of every norm run in shared ops
    assert batched < 0.5 * per_block, counts


def test_compiled_synthesis_equals_eager():
    """``compile_synthesis``: the batched computation under torch.compile
    (backend 'aot_eager' here: inductor's C++ compile takes minutes on a
    small CPU; the graph capture and functionalisation are what is
    tested)."""
    pytest.importorskip('torch._dynamo')
    models = []
    for compile_synthesis in (False, dict(backend='aot_eager')):
        m = repl(R18, interval=2, transform=LOWRANK, fusion='project',
                 compile_synthesis=compile_synthesis)
        randomize(m)
        m.double().train()
        for norm in m.modules():  # randomize set them: no calibration pass
            setattr(norm, STATS_READY, True)
        models.append(m)
    _compare_steps(models, steps=1)
    compiler = models[1].engine._compiler
    assert compiler.enabled and compiler._fns  # it did go through compile


def test_bad_synthesis_options():
    with pytest.raises(ValueError, match=r"synthesis='fast' must be one of"):
        repl(R18, interval=2, synthesis='fast')
    with pytest.raises(ValueError, match=r"compile_synthesis needs"):
        repl(R18, interval=2, synthesis='per_block', compile_synthesis=True)
    with pytest.raises(ValueError,
                       match=r"compile_synthesis: .*not apply.*layer='full'"):
        repl(R18, interval=2, layer='full', compile_synthesis=True)
    with pytest.raises(ValueError, match=r'compile_synthesis=1 must be True'):
        repl(R18, interval=2, compile_synthesis=1)
    # layer='full' keeps the per-block path
    assert repl(R18, interval=2, layer='full').engine is None


@pytest.mark.parametrize('scaled', [False, True])
def test_low_rank_batched_backward_equals_autograd(scaled):
    """The low-rank mix's hand-written batched backward (with and without
    a folded norm scale) gives autograd's gradients of the same formula."""
    from mmlocal.models.repl.transforms import RepLLowRankMix
    g = torch.Generator().manual_seed(0)
    n, c, cols, r = 3, 5, 7, 2

    def rand(*shape):
        return torch.randn(*shape, generator=g,
                           dtype=torch.float64).requires_grad_()

    ab, u, v, pn = rand(2 * n, c), rand(2 * n, c, r), rand(2 * n, c, r), \
        rand(2 * n, c, cols)
    scale = rand(n, c) if scaled else None
    leaves = [ab, u, v, pn] + ([scale] if scaled else [])
    weight = torch.randn(n, c, cols, generator=g, dtype=torch.float64)
    params = {('a', 'b'): ab, ('u_a', 'u_b'): u, ('v_a', 'v_b'): v}
    out = RepLLowRankMix.batched(params, pn, scale)
    both = ab[..., None] * pn + u @ (v.transpose(1, 2) @ pn)
    ref = both.view(2, n, c, cols).sum(0)
    if scaled:
        ref = ref * scale[..., None]
    assert_close(out, ref.detach(), 'output', rel=1e-12)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    refs = torch.autograd.grad((ref * weight).sum(), leaves)
    for name, a, b in zip('ab u v pn scale'.split(), grads, refs):
        assert_close(a, b, name, rel=1e-12)


def test_neighbour_gradients_added_in_foreach_ops():
    """A training forward of the backbone hands the neighbours aliases of
    their parameters (shared_sources): their two gradients (own use and
    synthesis) are added in a few foreach ops, not one ``add`` each; the
    parameters are back in place after the forward."""
    model = repl(R50_MMDET, interval=2, transform=LOWRANK)
    model.train()
    x = _x(0, size=32).float()
    outputs_loss(model(x)).backward()  # calibration pass (per block)
    model.zero_grad()
    ops = []

    class _Adds(HostReads):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return super().__torch_dispatch__(func, types, args, kwargs)

    loss = outputs_loss(model(x))
    with _Adds():
        loss.backward()
    # 15 here (the stock blocks' residual and input-gradient adds);
    # adding per parameter made it ~95 (6 replaced blocks)
    assert ops.count('add') < 30, ops.count('add')
    assert 1 <= ops.count('_foreach_add') + ops.count('_foreach_add_') <= 6
    for module in model.modules():
        for p in module._parameters.values():
            assert p is None or isinstance(p, torch.nn.Parameter)
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert 'backbone.layer3.2.conv1.weight' in names


def test_kept_lists_follow_a_dtype_move():
    """The parameter list and source layout the batched path keeps between
    steps (host work: no Python loop over the tensors per step) are reused,
    and rebuilt after the model moves (float32 -> float64 here): the zero
    pads follow, and the steps still equal the per-block path's."""
    models = []
    for mode in ('per_block', 'batched'):
        m = repl(R18, interval=2, synthesis=mode)
        randomize(m)
        m.float().train()
        models.append(m)
    engine = models[1].engine
    kept = None
    for step in range(3):  # the first one calibrates (per-block path)
        for m in models:
            outputs_loss(m(_x(step).float())).backward()
        if step == 1:
            kept = engine._param_leaves[1], engine._gather_plan[1]
    assert engine._param_leaves[1] is kept[0]
    assert engine._gather_plan[1] is kept[1]
    for m in models:
        m.double()
        m.zero_grad()
    _compare_steps(models, steps=2)
    assert engine._param_leaves[1] is not kept[0]
    assert all(t.dtype == torch.float64 for t in engine._param_leaves[1])
    assert all(t.dtype == torch.float64 for t in engine._gather_plan[1][0])


@pytest.mark.parametrize('backbone, transform, min_classes', [
    (R50_MMDET, LOWRANK, None),  # 6 conv shapes, folded norms (scaled)
    (R18, CHANNEL, None),  # 4 conv shapes, 3x3 kernels
    (VIT, LOWRANK, 2),  # fc1 and fc2, no folding (unscaled)
])
def test_tiled_group_equals_per_class_calls(backbone, transform,
                                            min_classes, monkeypatch):
    """Every conv class of the backbone in one tiled call (_TiledMix):
    the per-class batched calls' outputs, gradients and statistics, with
    fewer kernels per step."""
    import mmlocal.models.repl.batched as batched
    if min_classes is not None:
        monkeypatch.setattr(batched, 'MIN_TILED_CLASSES', min_classes)
    models = []
    for max_tiles in (0, batched.MAX_TILES):  # 0: no tiled group
        monkeypatch.setattr(batched, 'MAX_TILES', max_tiles)
        m = repl(backbone, interval=2, transform=transform)
        randomize(m)
        m.double().train()
        for norm in m.modules():  # randomize set them: no calibration pass
            setattr(norm, STATS_READY, True)
        models.append(m)
    per_class, tiled = (m.engine for m in models)
    assert per_class.tile is None
    matrix = [ci for ci, c in enumerate(tiled.classes) if not c[0].vector]
    assert tiled.tile['group'] == tuple(matrix) and len(matrix) >= 2
    size = 32 if backbone is VIT else 64
    _compare_steps(models, steps=2, size=size)
    counts = []
    for m in models:
        m.train()
        x = _x(5, size)
        outputs_loss(m(x)).backward()  # (the tiled index tensors exist)
        with _Kernels() as counter:
            outputs_loss(m(x)).backward()
        counts.append(counter.ops)
    # one set of ops instead of one per class (R50: ~13 per class)
    assert counts[1] < counts[0] - (8 if len(matrix) > 2 else -2), counts


def test_tiled_group_guards():
    """The tiled group needs three matrix classes of one tiled transform
    (a ViT's two, the scalar mix: one batched call per class)."""
    assert repl(R50_MMDET, interval=2, transform=LOWRANK).engine.tile
    assert repl(VIT, interval=2, transform=LOWRANK).engine.tile is None
    assert repl(R18, interval=2, transform=SCALAR).engine.tile is None


@pytest.mark.parametrize('transform', [LOWRANK, CHANNEL])
def test_synthesis_ignores_autocast(transform):
    """Under AMP (bf16 autocast here) the synthesis, folding and statistics
    run in the parameters' dtype: the same synthesised weights as without
    autocast (a bf16 low-rank product made the running statistics bf16,
    which BN's statistics kernel refused), and a training step works."""
    m = repl(R50_MMDET, interval=2, transform=transform)
    randomize(m)
    m.train()
    for norm in m.modules():
        setattr(norm, STATS_READY, True)
    engine = m.engine
    (_, ref), _ = engine._run()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (_, amp), _ = engine._run()
    for a, b in zip(amp[0] + [amp[2]], ref[0] + [ref[2]]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    engine.reset()
    x = _x(3, size=32).float()
    for _ in range(2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = m(x)
        assert out[-1].dtype == torch.bfloat16
        outputs_loss([o.float() for o in out]).backward()
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert all(torch.isfinite(norm.running_var).all() for norm in m.modules()
               if isinstance(norm, torch.nn.BatchNorm2d))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_tiled_group_equals_per_class_calls_cuda(monkeypatch):
    """The tiled call on CUDA (index_select permutations, 0/1 products,
    bmm into a buffer's halves): the per-class calls' values, float64, two
    SGD steps (run by tools/device/run_benchmarks.sh step E)."""
    import mmlocal.models.repl.batched as batched
    models = []
    for max_tiles in (0, batched.MAX_TILES):
        monkeypatch.setattr(batched, 'MAX_TILES', max_tiles)
        m = repl(R50_MMDET, interval=2, transform=LOWRANK)
        randomize(m)
        m.double().cuda().train()
        for norm in m.modules():
            setattr(norm, STATS_READY, True)
        models.append(m)
    assert models[0].engine.tile is None and models[1].engine.tile
    _compare_steps(models, steps=2)


def test_in_place_change_between_blocks_recomputes():
    """A parameter or statistic that a later replaced block depends on,
    changed in place during the forward pass (after the batched tensors
    were made at the first replaced block), is seen by that block, as on
    the per-block path; the kept dependency lists (the parameters
    themselves, not shared_sources' aliases) notice it."""
    models = _pair(R50_MMDET, transform=LOWRANK)
    outs = []
    for m in models:
        for norm in m.modules():
            setattr(norm, STATS_READY, True)
        reps = list(m.replacements.values())
        later = reps[-1]
        trigger = reps[0].next_block  # runs after the first replaced block
        tensors = [next(later.transforms.parameters()),
                   later.block.norm3.running_var]
        neighbour = later.prev_block.conv1.weight

        def change(module, args, output, tensors=tensors, neighbour=neighbour):
            with torch.no_grad():
                for t in tensors:
                    t.mul_(1.5)
                neighbour.add_(0.01)

        handle = trigger.register_forward_hook(change)
        for _ in range(2):  # the second pass uses the kept lists
            out = m(_x(4))
            outputs_loss(out).backward()
        handle.remove()
        outs.append(out)
    for a, b in zip(*outs):
        assert_close(b, a.detach(), 'output', rel=1e-5)
    _compare_steps(models, steps=1)
