"""aux=dict(..., compile=...): the aux nets' convolutional parts under
torch.compile (mmlocal.utils.compile). On the CPU the test compiles with
backend='aot_eager' (AOTAutograd's forward/backward graphs, run by eager
kernels): inductor's C++ code generation takes minutes on 2 cores; the
graphs it would compile are the same."""
import copy

import pytest
import torch
from mmengine.registry import init_default_scope

from local_utils import (TINY_RETINANET, KeepGradsOptimWrapper,
                         assert_same_step, det_batch, grads, small_aux)
from mmlocal.models.local.learner import LocalLearner
from mmlocal.utils.compile import (CompiledMethods, check_compile_option,
                                   compile_kwargs)


def test_compile_option_is_checked():
    assert check_compile_option(False) is None
    assert check_compile_option(None) is None
    assert check_compile_option(True) == {}
    assert check_compile_option(dict(backend='aot_eager')) == dict(
        backend='aot_eager')
    with pytest.raises(ValueError, match='compile'):
        check_compile_option('yes')
    with pytest.raises(ValueError, match='unknown keys'):
        check_compile_option(dict(fullgraf=True))
    # inductor's default mode (no CUDA graphs) unless asked; static shapes
    assert compile_kwargs({}) == dict(dynamic=False)
    assert compile_kwargs(dict(mode='reduce-overhead'))['mode'] == \
        'reduce-overhead'
    # CUDA graphs can't run a local step's aux nets (an H200 run: the next
    # aux net's replay overwrote the previous one's gradients)
    for bad in (dict(mode='reduce-overhead'),
                dict(options={'triton.cudagraphs': True})):
        assert check_compile_option(bad) == bad  # e.g. RepL's synthesis
        with pytest.raises(ValueError, match='CUDA graphs'):
            check_compile_option(bad, cudagraphs=False)
    init_default_scope('mmdet')
    with pytest.raises(ValueError, match='with_cp'):
        LocalLearner(TINY_RETINANET, num_modules=2,
                     aux=small_aux(compile=True, with_cp=True))
    with pytest.raises(ValueError, match='CUDA graphs'):
        LocalLearner(TINY_RETINANET, num_modules=2,
                     aux=small_aux(compile=dict(mode='reduce-overhead')))


def test_copies_compile_their_own_methods():
    """A deep copy of a compiled module runs its own weights."""
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.compiled = CompiledMethods(dict(backend='eager'))

        def run(self, x):
            return self.fc(x)

        def forward(self, x):
            return self.compiled(self, 'run', x)

    a = Lin()
    x = torch.randn(2, 3)
    a(x)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc.weight.add_(1.0)
    assert not b.compiled._fns
    torch.testing.assert_close(b(x), b.fc(x))
    torch.testing.assert_close(a(x), a.fc(x))


def test_compiled_aux_step_equals_eager():
    """DGL K=2 on a tiny RetinaNet: the transform and the aux detection
    head's convs compiled; one step's losses and gradients equal eager's
    up to float reassociation."""
    runs = []
    for compile in (False, dict(backend='aot_eager')):
        init_default_scope('mmdet')
        torch.manual_seed(0)
        learner = LocalLearner(
            TINY_RETINANET, num_modules=2,
            aux=small_aux('mmlocal.DGLAux', compile=compile))
        ow = KeepGradsOptimWrapper(
            torch.optim.SGD(learner.parameters(), lr=0.))
        logs = learner.train_step(det_batch(seed=1), ow)
        runs.append((logs, grads(learner), learner))
    compiled = runs[1][2].aux_nets[0]
    assert compiled.compiled.enabled and compiled.compiled._fns
    assert compiled.task_head.compiled._fns  # its predict()
    assert all(v > 0 for k, v in runs[0][0].items() if 'local0' in k)
    assert_same_step(runs[0][0], runs[0][1], runs[1][0], runs[1][1],
                     rtol=1e-4, atol=1e-6)


def test_compiled_momentum_transform_is_one_graph():
    """MAN's transform (LB + EMA copy of the next block) compiles to one
    graph per aux net, traced once: the EMA bookkeeping (BN modes that
    follow the source, the no-hook warning) runs eagerly before it, so
    it neither breaks the graph nor recompiles when a mode flips."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    init_default_scope('mmdet')
    torch.manual_seed(0)
    learner = LocalLearner(
        TINY_RETINANET, num_modules=3,
        aux=small_aux('mmlocal.MomentumAux',
                      compile=dict(backend='eager')))
    ow = KeepGradsOptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.))
    with pytest.warns(UserWarning, match='MomentumAuxHook'):
        for seed in (1, 2):
            logs = learner.train_step(det_batch(seed=seed), ow)
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert not dict(counters['graph_break']), dict(counters['graph_break'])
    # two aux nets, each its own shapes: two graphs of transform (and the
    # heads' predict), none made again in the second step
    n_graphs = counters['stats']['unique_graphs']
    learner.train_step(det_batch(seed=3), ow)
    assert counters['stats']['unique_graphs'] == n_graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_compiled_aux_steps_equal_eager_cuda():
    """On CUDA with the default compile mode (inductor, no CUDA graphs):
    DGL K=3 on a tiny RetinaNet, two steps with two aux nets each (the
    case CUDA graphs broke: the second aux net's replay overwrote the
    first one's gradients) give eager's losses and gradients. Run by
    tools/device/run_benchmarks.sh (step E) where a GPU is lent."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    try:
        runs = []
        for compile in (False, True):
            init_default_scope('mmdet')
            torch.manual_seed(0)
            learner = LocalLearner(
                TINY_RETINANET, num_modules=3,
                aux=small_aux('mmlocal.DGLAux', compile=compile)).cuda()
            ow = KeepGradsOptimWrapper(
                torch.optim.SGD(learner.parameters(), lr=0.))
            for seed in (1, 2):
                logs = learner.train_step(det_batch(seed=seed), ow)
            runs.append((logs, grads(learner)))
        assert_same_step(runs[0][0], runs[0][1], runs[1][0], runs[1][1],
                         rtol=1e-3, atol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
