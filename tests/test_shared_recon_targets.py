"""The reconstruction target (image in [0, 1], pooled to the decoder's
stride) is made once per batch for all aux nets of a learner, with the
same losses and gradients as one per module."""
import torch
from mmengine.registry import init_default_scope

from local_utils import (TINY_RETINANET, KeepGradsOptimWrapper,
                         assert_same_step, det_batch, grads, small_aux)
from mmlocal.models.local.aux.base import BaseLocalAux
from mmlocal.models.local.heads.recon_decoder import (ReconDecoder,
                                                      padding_mask)
from mmlocal.models.local.learner import LocalLearner


def test_recon_target_made_once_per_batch(monkeypatch):
    made = []
    real = ReconDecoder._make_target

    def spy(self, image01, valid):
        made.append(self.out_stride)
        return real(self, image01, valid)

    monkeypatch.setattr(ReconDecoder, '_make_target', spy)
    runs = []
    for shared in (True, False):
        if not shared:  # one target per module, as before
            monkeypatch.setattr(
                BaseLocalAux, 'recon_inputs',
                lambda self, inputs, samples: (
                    self.image01(inputs).clone(),
                    padding_mask(samples, inputs)))
        init_default_scope('mmdet')
        torch.manual_seed(0)
        learner = LocalLearner(TINY_RETINANET, num_modules=3,
                               aux=small_aux(recon_weight=1.5))
        ow = KeepGradsOptimWrapper(
            torch.optim.SGD(learner.parameters(), lr=0.))
        made.clear()
        logs = learner.train_step(det_batch(seed=2), ow)
        runs.append((logs, grads(learner), list(made)))
    assert runs[0][2] == [4] and runs[1][2] == [4, 4], (runs[0][2],
                                                        runs[1][2])
    assert all(runs[0][0][f'local{k}.loss_recon'] > 0 for k in (0, 1))
    assert_same_step(runs[0][0], runs[0][1], runs[1][0], runs[1][1],
                     rtol=0, atol=0)


def test_recon_targets_released_before_the_last_module():
    """The shared targets (a copy of the image batch) are dropped once the
    last aux net has run: the last module's phase, often the step's peak,
    does not carry them."""
    from mmlocal.models.local.aux import base
    init_default_scope('mmdet')
    torch.manual_seed(0)
    learner = LocalLearner(TINY_RETINANET, num_modules=3,
                           aux=small_aux(recon_weight=1.5))
    ow = KeepGradsOptimWrapper(torch.optim.SGD(learner.parameters(), lr=0.))
    made, alive = [], []
    recon_inputs = BaseLocalAux.recon_inputs
    loss = learner.model.loss

    def spy_recon(self, inputs, samples):
        made.append(inputs)
        return recon_inputs(self, inputs, samples)

    def spy_loss(inputs, samples):
        alive.append(inputs in base._RECON_INPUTS)
        return loss(inputs, samples)

    learner.model.loss = spy_loss
    try:
        BaseLocalAux.recon_inputs = spy_recon
        learner.train_step(det_batch(seed=2), ow)
    finally:
        BaseLocalAux.recon_inputs = recon_inputs
    assert made and alive == [False]
