from .aiou_loss import AIoULoss, aiou_loss

__all__ = ['AIoULoss', 'aiou_loss']
