"""Local learning actually lowers the training-step memory peak."""
import copy

import torch
from mmengine.optim import OptimWrapper

from local_utils import TINY_RETINANET, det_batch, small_aux
from mmlocal.utils.memory import PeakMemoryMeter
from test_local_learner import build


def _peak(model, batch, phases=False):
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3,
                                      momentum=0.9))
    model.train_step(batch, ow)  # warm-up: optimizer state exists
    with PeakMemoryMeter('cpu') as meter:
        if phases:
            model.phase_callback = meter.mark
        model.train_step(batch, ow)
    if phases:
        model.phase_callback = None
    return meter


def test_local_peak_below_end_to_end_twin():
    cfg = copy.deepcopy(TINY_RETINANET)
    # a feature-heavy tiny detector: wide enough that activations dominate
    batch = det_batch(n=2, size=128)
    learner = build(cfg, num_modules=4, aux=small_aux('mmlocal.DGLAux'))
    e2e = copy.deepcopy(learner.model)
    local = _peak(learner, batch, phases=True)
    plain = _peak(e2e, batch)
    assert local.peak_bytes < 0.9 * plain.peak_bytes, (
        local.peak_bytes, plain.peak_bytes)
    # one phase per module, each below the end-to-end peak
    assert set(local.phases) >= {f'module{k}' for k in range(4)}
    assert all(local.phases[f'module{k}'] < plain.peak_bytes
               for k in range(4))
    # and the measurement is deterministic
    again = _peak(learner, batch)
    assert again.peak_bytes == local.peak_bytes
