"""Memory-balanced split points: the partition search and the cost probe
(tools/analysis/plan_split.py) on a tiny detector."""
import importlib.util
import itertools
import os.path as osp
import random

import pytest
import torch
from mmengine.config import Config

from conftest import REPO
from mmlocal.models.local import balance
from mmlocal.models.local.balance import balanced_split_points, module_costs

_spec = importlib.util.spec_from_file_location(
    'plan_split', osp.join(REPO, 'tools', 'analysis', 'plan_split.py'))
plan_split = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_split)


def brute_force(blocks, aux, head, k, stem=0, span=1, key=None):
    """Every split; by default the descending sorted module costs compared
    lexicographically (least largest, then least second largest, ...)."""
    key = key or (lambda c: sorted(c, reverse=True))
    return min(itertools.combinations(sorted(aux), k - 1),
               key=lambda pts: key(module_costs(pts, blocks, aux, head,
                                                stem, span)))


def max_sum(costs):
    return (max(costs), sum(costs))


def test_module_costs_formula():
    blocks = [0, 0, 5, 4, 3, 2, 1]
    aux = {3: 10, 4: 7, 5: 6, 6: 1}
    # modules [0,3) [3,5) [5,7): stem joins module 0, head the last
    assert module_costs([3, 5], blocks, aux, 20, stem_cost=2) == \
        [2 + 5 + 10, 4 + 3 + 6, 2 + 1 + 20]
    # span 2: module 1's window is modules 0..1 (stem included); the last
    # module runs alone (earlier graphs are freed before the model's loss)
    assert module_costs([3, 5], blocks, aux, 20, stem_cost=2, span=2) == \
        [2 + 5 + 10, 2 + 5 + 4 + 3 + 6, 2 + 1 + 20]


def _random_costs(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 12)
    frozen = rng.randint(0, 2)
    blocks = [0] * frozen + [rng.uniform(1, 10) for _ in range(n - frozen)]
    aux = {p: rng.uniform(0, 15) for p in range(frozen + 1, n)}
    return blocks, aux, rng.uniform(0, 30)


@pytest.mark.parametrize('seed', range(6))
def test_search_equals_brute_force(seed):
    blocks, aux, head = _random_costs(seed)
    for span in (1, 2):
        for k in range(1, min(5, len(aux) + 1) + 1):
            got = balanced_split_points(blocks, aux, head, k, stem_cost=1.5,
                                        span=span)
            want = list(brute_force(blocks, aux, head, k, 1.5, span))
            assert got == want, (span, k)
            assert got == sorted(set(got)) and len(got) == k - 1


@pytest.mark.parametrize('seed', range(6))
def test_dp_fallback_equals_brute_force(seed, monkeypatch):
    # above MAX_COMBINATIONS the exact (largest, total) DP takes over
    monkeypatch.setattr(balance, 'MAX_COMBINATIONS', 0)
    blocks, aux, head = _random_costs(seed)
    for k in range(2, min(5, len(aux) + 1) + 1):
        got = balanced_split_points(blocks, aux, head, k, stem_cost=1.5)
        want = brute_force(blocks, aux, head, k, 1.5, key=max_sum)
        # ties may pick other points with the same (max, sum)
        assert max_sum(module_costs(got, blocks, aux, head, 1.5)) == \
            pytest.approx(max_sum(module_costs(want, blocks, aux, head,
                                               1.5))), (k, got, want)
    with pytest.raises(ValueError, match='too many to try'):
        balanced_split_points(blocks, aux, head, 3, span=2)


def test_balancing_moves_cuts_towards_the_expensive_end():
    # early blocks are expensive, the head is heavy: an even split by count
    # is far from the best
    blocks = [8, 8, 4, 4, 2, 2, 1, 1]
    aux = {p: 0.5 * blocks[p - 1] for p in range(1, 8)}
    pts = balanced_split_points(blocks, aux, 12, num_modules=4)
    even = [2, 4, 6]
    est = module_costs(pts, blocks, aux, 12)
    assert max(est) < max(module_costs(even, blocks, aux, 12))
    assert pts[:2] == [1, 2]  # one expensive block per module up front
    assert pts == list(brute_force(blocks, aux, 12, 4))


def test_span_two_uses_windows():
    blocks = [4, 4, 4, 4]
    aux = {1: 1, 2: 1, 3: 1}
    pts = balanced_split_points(blocks, aux, 4, num_modules=3, span=2)
    assert pts == list(brute_force(blocks, aux, 4, 3, span=2))


def test_bad_num_modules():
    with pytest.raises(ValueError, match='num_modules=5'):
        balanced_split_points([1] * 4, {1: 0, 2: 0, 3: 0}, 0, 5)
    with pytest.raises(ValueError, match='num_modules=0'):
        balanced_split_points([1] * 4, {1: 0}, 0, 0)


def test_saved_bytes_counts_activations_not_parameters():
    w = torch.nn.Parameter(torch.randn(3, 8))
    x = torch.randn(4, 8)  # a detached module input
    _, nbytes = plan_split.saved_bytes(
        lambda: torch.nn.functional.linear(x, w),
        {w.untyped_storage().data_ptr()})
    assert nbytes == x.numel() * 4  # x is saved for dW; W itself excluded
    with torch.no_grad():
        _, nbytes = plan_split.saved_bytes(lambda: x @ w.t(), set())
    assert nbytes == 0


@pytest.mark.parametrize('aux', [None, 'hpff'])
def test_plan_on_tiny_detector(aux):
    torch.set_num_threads(1)
    cfg = Config.fromfile(
        osp.join(REPO, 'tests/configs/infopro_retinanet_tiny_demo.py'))
    if aux == 'hpff':
        cfg.model.aux = dict(type='mmlocal.HPFFAux', cascade_span=2,
                             det_head=dict(feat_channels=32),
                             recon=dict(channels=32))
    report = plan_split.plan(cfg, input_shape=(1, 3, 128, 128),
                             num_modules=3)
    costs = report['costs']
    seq_blocks = len(costs['blocks'])
    assert report['span'] == (2 if aux else 1)
    assert all(c >= 0 for c in costs['blocks'])
    # every trainable block saves something; blocks after the frozen ones
    first = min(costs['aux']) - 1
    assert all(c > 0 for c in costs['blocks'][first:])
    assert sorted(costs['aux']) == list(range(first + 1, seq_blocks))
    assert all(a > 0 for a in costs['aux'].values()) and costs['head'] > 0
    # the first block at stride 4 saves more than the last at stride 32
    assert costs['blocks'][first] > costs['blocks'][-1]
    bal = report['balanced']
    assert len(bal['split_points']) == 2
    assert max(bal['costs']) == pytest.approx(max(module_costs(
        bal['split_points'], costs['blocks'], costs['aux'], costs['head'],
        costs['stem'], report['span'])))
    # never worse than the configured (even) split, which is a candidate
    if 'current' in report:
        assert max(bal['costs']) <= max(report['current']['costs'])
    text = plan_split.format_report(report)
    assert f"split_points={bal['split_points']}" in text


def test_checkpointed_blocks_cost_their_input():
    torch.set_num_threads(1)
    path = osp.join(REPO, 'tests/configs/infopro_retinanet_tiny_demo.py')
    plain = plan_split.plan(Config.fromfile(path), (1, 3, 128, 128))
    cfg = Config.fromfile(path)
    cfg.model.checkpoint_blocks = [2, 4]
    cp = plan_split.plan(cfg, (1, 3, 128, 128))
    before, after = plain['costs']['blocks'], cp['costs']['blocks']
    for b in range(len(before)):
        if b in (2, 4):
            assert 0 < after[b] < 0.6 * before[b], (b, after[b], before[b])
        else:
            assert after[b] == before[b], b


def test_plan_refuses_plain_model():
    cfg = Config.fromfile(
        osp.join(REPO, 'tests/configs/retinanet_tiny_demo.py'))
    with pytest.raises(ValueError, match='not a LocalLearner'):
        plan_split.plan(cfg, input_shape=(1, 3, 64, 64))
