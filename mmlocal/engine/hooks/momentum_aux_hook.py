from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import AmpOptimWrapper

from mmlocal.registry import HOOKS


def _momentum_auxes(model):
    if is_model_wrapper(model):
        model = model.module
    return [m for m in model.modules() if hasattr(m, 'update_ema')
            and hasattr(m, 'sync_from_source')]


@HOOKS.register_module()
class MomentumAuxHook(Hook):
    """Drive the EMA copies of MAN / MAN++ / MLAAN auxiliary nets.

    After every iteration in which the optimizer really stepped, each
    auxiliary net with an EMA copy updates it:
    ``theta_EMA <- m * theta_EMA + (1 - m) * theta_B``. Iterations without a
    step do not move the EMA:

    - gradient accumulation: ``optim_wrapper.should_update()`` is False;
    - AMP: the loss scaler skipped the step (its scale went down);
    - ``LocalLearner(nan_guard='skip')`` dropped the iteration (its
      ``last_iter_skipped``).

    ``update_from`` chooses ``theta_B``: ``'after_step'`` (default) the
    weights the optimizer step just produced; ``'before_step'`` the weights
    this iteration's forward used (kept before the iteration), which is the
    reference code's order (its update runs after each local backward,
    before ``optimizer.step()``). The two differ by one step of ``B`` in the
    average (weight ``1 - m`` on the newest term); ``'before_step'`` holds
    a copy of each source block's parameters during the iteration.

    Before the first iteration of a fresh run (iteration 0, i.e. not resumed;
    pretrained weights are loaded by then) the copies are initialised from
    their source block when the aux net asks for it. The EMA copies are
    parameters of the model, so checkpoints save them and ``--resume``
    restores them; mmengine's ``EMAHook`` may run in the same job (it
    averages the whole model, EMA copies included, in its own copy).
    """

    priority = 'ABOVE_NORMAL'  # before EMAHook (NORMAL) reads the weights

    UPDATE_FROM = ('after_step', 'before_step')

    def __init__(self, update_from='after_step'):
        if update_from not in self.UPDATE_FROM:
            raise ValueError(f'update_from={update_from!r} must be one of '
                             f'{self.UPDATE_FROM}')
        self.update_from = update_from
        self._kept = None

    def before_train(self, runner):
        for aux in _momentum_auxes(runner.model):
            aux.ema_driven = True
            if runner.iter == 0:
                aux.sync_from_source()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        wrapper = runner.optim_wrapper
        self._scale = (wrapper.loss_scaler.get_scale() if isinstance(
            wrapper, AmpOptimWrapper) else None)
        self._kept = None
        if self.update_from == 'before_step':
            self._kept = [aux.source_parameters()
                          for aux in _momentum_auxes(runner.model)]

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        kept, self._kept = self._kept, None
        wrapper = runner.optim_wrapper
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        if getattr(model, 'last_iter_skipped', False):
            return  # LocalLearner(nan_guard='skip') dropped this iteration
        if not wrapper.should_update():
            return  # accumulating gradients: no step this iteration
        if self._scale is not None and \
                wrapper.loss_scaler.get_scale() < self._scale:
            return  # AMP found inf/nan and skipped the step
        for i, aux in enumerate(_momentum_auxes(runner.model)):
            aux.update_ema(None if kept is None else kept[i])
