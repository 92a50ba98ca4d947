"""``LocalLearner(checkpoint_blocks=[...])``: chosen blocks run under
activation checkpointing inside their local modules; losses, gradients and
BN running statistics equal the plain run, the module's peak drops."""
import warnings

import pytest
import torch

from local_utils import (TINY_FCN, TINY_RETINANET, KeepGradsOptimWrapper,
                         assert_same_step, det_batch, grads,
                         module_phase_peak, seg_batch, small_aux)
from test_local_cascade import cascade_aux
from test_local_learner import build

CASES = {
    # (model, scope, batch, aux, blocks): blocks inside modules, module
    # starts (a detached input) and the last module (the model's own loss)
    'infopro-det': (TINY_RETINANET, 'mmdet', det_batch, small_aux,
                    [1, 3, 7]),
    'man-seg': (TINY_FCN, 'mmseg', seg_batch,
                lambda: small_aux('mmlocal.MomentumAux'), [0, 2, 5]),
    # cascade: graphs kept over a window, backward(inputs=..., retain_graph)
    'mlaan-det': (TINY_RETINANET, 'mmdet', det_batch,
                  lambda: cascade_aux('mmlocal.MLAANAux'), [1, 2, 4, 6]),
}


def _step(learner, batch):
    ow = KeepGradsOptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # EMA copies without their hook
        logs = learner.train_step(batch, ow)
    stats = {n: b.clone() for n, b in learner.named_buffers()
             if 'running' in n or 'num_batches' in n}
    return logs, grads(learner), stats


@pytest.mark.parametrize('case', list(CASES))
def test_same_losses_gradients_and_statistics(case):
    model, scope, batch_fn, aux, blocks = CASES[case]
    plain = build(model, scope, num_modules=3, aux=aux())
    cp = build(model, scope, num_modules=3, aux=aux(),
               checkpoint_blocks=blocks)
    assert cp.checkpoint_blocks == tuple(blocks)
    cp.load_state_dict(plain.state_dict())
    batch = batch_fn()
    (logs, g, stats), (logs_cp, g_cp, stats_cp) = \
        _step(plain, batch), _step(cp, batch)
    assert_same_step(logs, g, logs_cp, g_cp)
    # the recomputation did not update BN statistics a second time
    for name in stats:
        torch.testing.assert_close(stats_cp[name], stats[name], msg=name)
    assert any(torch.count_nonzero(g[n]) for n in g
               if n.startswith('model.backbone.layer1'))


def test_module_peak_lower():
    batch = seg_batch(n=2, size=128)
    plain = build(TINY_FCN, 'mmseg', num_modules=None, split_points=[2],
                  aux=small_aux())
    cp = build(TINY_FCN, 'mmseg', num_modules=None, split_points=[2],
               aux=small_aux(), checkpoint_blocks=[0, 1])
    cp.load_state_dict(plain.state_dict())
    a, b = module_phase_peak(plain, batch), module_phase_peak(cp, batch)
    assert b < 0.92 * a, (b, a)  # measured 0.88


@pytest.mark.parametrize('bad', [[99], [-1], [1, 1], 'all', [True], 3])
def test_bad_checkpoint_blocks_name_the_option(bad):
    with pytest.raises(ValueError, match='checkpoint_blocks'):
        build(num_modules=2, checkpoint_blocks=bad)
