"""A test hook: every rank saves what it trained (for tests/test_local_ddp.py).

Imported through ``custom_imports=dict(imports=['rank_state_hook'])`` with
``tests/dist_scripts`` on ``PYTHONPATH``; registered in mmengine's root
``HOOKS`` so that any default scope finds it.
"""
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankStateDumpHook(Hook):
    """After training, save ``work_dir/rank{r}_state.pt`` on every rank: the
    unwrapped model's state dict, mmengine ``EMAHook``'s averaged model and
    the ``train/grad_norm`` history of the message hub."""

    priority = 'LOWEST'

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook']
        norms = runner.message_hub.log_scalars.get('train/grad_norm')
        state = dict(
            wrapper=type(runner.model).__name__,
            model={k: v.detach().cpu().clone()
                   for k, v in model.state_dict().items()},
            ema={k: v.detach().cpu().clone()
                 for k, v in ema[0].ema_model.state_dict().items()}
            if ema else None,
            grad_norm=[float(v) for v in norms.data[0]] if norms else [])
        torch.save(state, osp.join(runner.work_dir,
                                   f'rank{runner.rank}_state.pt'))
