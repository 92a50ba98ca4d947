"""Worker for tests/test_local_ddp.py.

Run either under torchrun (each rank trains on its half of the batch through
LocalDistributedDataParallel) or as a single process (the whole batch, no
wrapper). Saves the parameters after N iterations to OUT/<tag>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repo

from mmengine.config import ConfigDict  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from local_utils import gn_fcn_learner_cfg, seg_batch  # noqa: E402
from mmlocal.registry import MODELS  # noqa: E402

ITERS = 2


def main(out_dir):
    distributed = 'RANK' in os.environ
    if distributed:
        dist.init_process_group('gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(ConfigDict(gn_fcn_learner_cfg()))
    model.init_weights()
    if distributed:
        from mmlocal.engine.model_wrappers import \
            LocalDistributedDataParallel
        model = LocalDistributedDataParallel(model)
    ow = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        clip_grad=dict(max_norm=1.0))
    for it in range(ITERS):
        batch = seg_batch(n=4, size=32, seed=it, ignore=False)
        if distributed:  # this rank's contiguous half of the same batch
            per = 4 // world
            batch = {k: v[rank * per:(rank + 1) * per]
                     for k, v in batch.items()}
        model.train_step(batch, ow)
    module = model.module if distributed else model
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tag = f'rank{rank}' if distributed else 'single'
    torch.save(state, os.path.join(out_dir, f'{tag}.pt'))
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
