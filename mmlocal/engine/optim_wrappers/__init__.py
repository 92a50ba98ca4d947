from .local_backward import check_local_optim_wrapper, local_backward

__all__ = ['check_local_optim_wrapper', 'local_backward']
