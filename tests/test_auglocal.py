"""AugLocal (AugLocalAux): layer sampling, pyramidal depth, fresh copies."""
import pytest
import torch
from mmengine.optim import OptimWrapper

from local_utils import TINY_FCN, det_batch, seg_batch, small_aux
from mmlocal.models.local.aux import pyramid_depth, uniform_layer_indices
from test_local_learner import build


def auglocal(**kwargs):
    return small_aux('mmlocal.AugLocalAux', **kwargs)


def expected_layers(l, L, d):  # noqa: E741 (the paper's l, L)
    """METHODS.md §6.3 / reference ``AuxNetwork`` ('unifSamp')."""
    if d >= L - 1 - l:
        return list(range(l + 1, L))
    return [round(l + (L - l - 1) / d * i) for i in range(1, d + 1)]


def expected_depth(d, k, K, c=0.5):
    r = k * c / (K - 2) if K > 2 else 0.0
    return max(1, round(d * (1 - r) + r))


@pytest.mark.parametrize('L', [9, 16, 17, 34, 55])
@pytest.mark.parametrize('d', [1, 2, 3, 5])
def test_uniform_sampling_formula(L, d):
    for l in range(L - 1):  # noqa: E741
        got = uniform_layer_indices(l, L, d)
        assert got == expected_layers(l, L, d), (l, L, d)
        assert got == sorted(set(got)) and l < got[0] and got[-1] == L - 1


def test_sampling_and_depth_literal_values():
    # ResNet-32 (16 layers, stem = layer 0), module 0, d=2: 7.5 -> 8
    assert uniform_layer_indices(0, 16, 2) == [8, 15]
    # ResNet-50 (17 layers), module ending at layer 4, d=2: 10, 16
    assert uniform_layer_indices(4, 17, 2) == [10, 16]
    # d >= L-1-l: every later layer
    assert uniform_layer_indices(13, 16, 3) == [14, 15]
    # pyramid, c=0.5, the reference scripts (Python's half-even round).
    # Its train.py trains local_module_num - aux_net_depth modules: R32
    # "--local_module_num 16 --aux_net_depth 2" is K = 14 (13 aux nets),
    # R110 "55 ... 3" is K = 52; r = k c / (K - 2) uses that K
    assert [pyramid_depth(2, k, 14, 0.5) for k in (0, 6, 12)] == [2, 2, 2]
    # r = 24 / 100: 2.52 -> 3; r = 25 / 100: 2.5 -> 2
    assert [pyramid_depth(3, k, 52, 0.5) for k in (0, 24, 25, 50)] == \
        [3, 3, 2, 2]
    # R32's last aux net (module 12 ends at layer 12 of 16) samples 14, 15;
    # the last module holds layers 13-15
    assert uniform_layer_indices(12, 16, 2) == [14, 15]
    assert [pyramid_depth(4, k, 4, 0.5) for k in range(3)] == [4, 3, 2]
    assert pyramid_depth(3, 0, 2, 0.5) == 3  # K=2: no decay (no 0/0)
    assert pyramid_depth(3, 5, 8, None) == 3


@pytest.mark.parametrize('K', [2, 4, 8])
@pytest.mark.parametrize('d', [1, 2, 3])
def test_built_aux_nets_follow_the_formula(K, d):
    """On the tiny ResNet-18 (8 blocks, L = 9): sampled layers, depths and
    a shape-consistent stack."""
    learner = build(num_modules=K, aux=auglocal(aux_depth=d))
    L = learner._seq.num_blocks + 1
    for k, aux in enumerate(learner.aux_nets):
        l = learner.module_ranges[k][1]  # noqa: E741 (module k's output)
        assert aux.depth == expected_depth(d, k, K)
        assert aux.sampled_layers == expected_layers(l, L, aux.depth)
        assert aux.sampled_blocks == [j - 1 for j in aux.sampled_layers]
        h = torch.zeros(1, learner._seq.block_out_channels[l - 1], 8, 8)
        with torch.no_grad():
            y = aux.eval().transform(h)
        assert y.shape[1] == \
            learner._seq.block_out_channels[aux.sampled_blocks[-1]]


def test_stage_transitions():
    learner = build(num_modules=4, aux=auglocal(aux_depth=2))
    seq = learner._seq
    aux = learner.aux_nets[0]  # ends at layer1: samples blocks 4, 7
    assert aux.sampled_blocks == [4, 7]
    # layer2[0] inserted, layer3[0] taken, layer4[1] stands as layer4[0]
    assert aux.plan == [('block', 2), ('block', 4), ('block', 6)]
    assert seq.block_names[6] == 'layer4.0'
    adapter = build(num_modules=4, aux=auglocal(
        aux_depth=2, stage_transition='adapter')).aux_nets[0]
    assert [i[0] for i in adapter.plan] == ['adapter', 'block', 'adapter',
                                            'block']
    assert adapter.plan[1] == ('block', 4) and adapter.plan[3] == ('block', 7)
    h = torch.zeros(2, seq.block_out_channels[1], 16, 16)
    assert adapter.transform(h).shape == aux.transform(h).shape


def test_copies_have_fresh_weights_and_the_same_architecture():
    learner = build(num_modules=4, aux=auglocal())
    seq = learner._seq
    for aux in learner.aux_nets:
        for layer, (_, index) in zip(aux.stack, aux.plan):
            source = seq.blocks[index]
            assert type(layer) is type(source)
            pairs = list(zip(layer.named_parameters(),
                             source.named_parameters()))
            assert pairs and all(a[0] == b[0] and a[1].shape == b[1].shape
                                 for a, b in pairs)
            convs = [(a, b) for (n, a), (_, b) in pairs if a.dim() == 4]
            assert all(not torch.equal(a, b) for a, b in convs)
            assert all(a.requires_grad for (_, a), _ in pairs)


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_one_training_step(task):
    if task == 'det':
        learner, batch = build(num_modules=4, aux=auglocal()), det_batch()
    else:
        learner = build(TINY_FCN, 'mmseg', num_modules=2, aux=auglocal())
        batch = seg_batch()
    ow = OptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.01))
    out = learner.train_step(batch, ow)
    assert all(torch.isfinite(v) for v in out.values())
    assert 'loss_local0' in out


@pytest.mark.parametrize('kwargs, match', [
    (dict(aux_depth=0), 'aux_depth'),
    (dict(pyramid_coeff=2.0), 'pyramid_coeff'),
    (dict(stage_transition='pad'), 'stage_transition'),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(num_modules=4, aux=auglocal(**kwargs))
