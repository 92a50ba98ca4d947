from .aiou_loss import AIoULoss, aiou_loss
from .sync_free_losses import (SyncFreeCrossEntropyLoss, SyncFreeL1Loss,
                               SyncFreeSmoothL1Loss, sync_free_loss)

__all__ = [
    'AIoULoss', 'aiou_loss', 'SyncFreeCrossEntropyLoss', 'SyncFreeL1Loss',
    'SyncFreeSmoothL1Loss', 'sync_free_loss'
]
