"""``with_cp=True`` in every auxiliary family: activation checkpointing
inside the aux net gives the same losses and gradients and lowers the
module's memory."""
import warnings

import pytest
import torch

from local_utils import (TINY_FCN, TINY_RETINANET, KeepGradsOptimWrapper,
                         assert_same_step, det_batch, grads,
                         module_phase_peak, seg_batch, small_aux)
from test_local_cascade import cascade_aux
from test_local_learner import build

FAMILIES = {
    'infopro': lambda **kw: small_aux('mmlocal.InfoProAux', **kw),
    'dgl': lambda **kw: small_aux('mmlocal.DGLAux', **kw),
    'man': lambda **kw: small_aux('mmlocal.MomentumAux', **kw),
    'manpp': lambda **kw: small_aux('mmlocal.MomentumAux',
                                    learnable_scale=True, **kw),
    'auglocal': lambda **kw: small_aux('mmlocal.AugLocalAux', aux_depth=2,
                                       **kw),
    'hpff': lambda **kw: cascade_aux('mmlocal.HPFFAux', patch_grid=2,
                                     patch_remainder='uneven', **kw),
    'mlaan': lambda **kw: cascade_aux('mmlocal.MLAANAux', **kw),
}


def _step(learner, batch):
    ow = KeepGradsOptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # EMA copies without their hook
        log_vars = learner.train_step(batch, ow)
    return log_vars, grads(learner)


@pytest.mark.parametrize('task', ['det', 'seg'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_same_losses_and_gradients(family, task):
    model, scope, batch = (TINY_RETINANET, 'mmdet', det_batch()) \
        if task == 'det' else (TINY_FCN, 'mmseg', seg_batch())
    plain = build(model, scope, num_modules=3, aux=FAMILIES[family]())
    cp = build(model, scope, num_modules=3,
               aux=FAMILIES[family](with_cp=True))
    assert all(aux.with_cp for aux in cp.aux_nets)
    cp.load_state_dict(plain.state_dict())
    logs, g = _step(plain, batch)
    logs_cp, g_cp = _step(cp, batch)
    assert_same_step(logs, g, logs_cp, g_cp)
    # the aux nets were trained (a check that cannot pass vacuously)
    assert any(torch.count_nonzero(g[n]) for n in g if '.aux_nets.' in
               '.' + n)


def test_module_peak_lower():
    """MAN's aux net (LB and EMA block copies, task head, decoder): module
    0's phase peak drops when the aux net is checkpointed (here module 0 is
    layer1 and its aux net is about as large as it)."""
    batch = seg_batch(n=2, size=128)
    heads = dict(seg_head=dict(channels=128, head=dict(dropout_ratio=0.0)),
                 recon=dict(channels=64))
    plain = build(TINY_FCN, 'mmseg', num_modules=None, split_points=[2],
                  aux=FAMILIES['man'](**heads))
    cp = build(TINY_FCN, 'mmseg', num_modules=None, split_points=[2],
               aux=FAMILIES['man'](with_cp=True, **heads))
    cp.load_state_dict(plain.state_dict())
    a, b = module_phase_peak(plain, batch), module_phase_peak(cp, batch)
    assert b < 0.9 * a, (b, a)


def test_bad_with_cp_names_the_option():
    with pytest.raises(ValueError, match='with_cp'):
        build(num_modules=2, aux=small_aux(with_cp='yes'))


@pytest.mark.parametrize('family', ['man', 'mlaan'])
def test_under_bf16_autocast(family, monkeypatch):
    """The recomputation runs under the same autocast as the forward: the
    bf16 AMP step gives the gradients of the un-checkpointed bf16 step."""
    from local_utils import cpu_bf16_amp_wrapper
    results = []
    plain = build(num_modules=3, aux=FAMILIES[family]())
    cp = build(num_modules=3, aux=FAMILIES[family](with_cp=True))
    cp.load_state_dict(plain.state_dict())
    for learner in (plain, cp):
        ow = cpu_bf16_amp_wrapper(monkeypatch, learner.parameters())
        ow.step = ow.zero_grad = lambda **kwargs: None  # keep the grads
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            log_vars = learner.train_step(det_batch(), ow)
        assert torch.isfinite(log_vars['loss'])
        results.append(grads(learner))
    plain, cp = results
    for name in plain:
        torch.testing.assert_close(cp[name], plain[name], msg=name)
