from mmlocal.registry import MODELS
from .base import BaseLocalAux


@MODELS.register_module()
class InfoProAux(BaseLocalAux):
    """InfoPro auxiliary net (Wang et al., ICLR 2021).

    Module k minimises a surrogate of the information-propagation loss:

    .. math::  \\mathcal{L}_k = \\lambda_1^{(k)} \\,
               \\mathrm{BCE}(\\sigma(D_k(h_k)), x) + \\lambda_2^{(k)} \\,
               \\mathcal{L}_{task}(g_k(h_k), y)

    The reconstruction term keeps information about the input ``x`` in
    ``h_k``; the task term makes it discriminative. ``lambda`` goes linearly
    from its first to its last value over modules ``0..K-2``
    (``r = k / (K - 2)``), as in InfoPro's code. Task heads are the
    task-aware ones (detection: light dense head; segmentation: FCN + CE,
    InfoPro's Cityscapes head). Defaults follow InfoPro's Cityscapes
    setting (reconstruction 1.5, task 1.0).

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        recon_weight (float | tuple): ``lambda_1``. Default 1.5.
        task_weight (float | tuple): ``lambda_2``. Default 1.0.
    """

    def __init__(self, module_info, recon_weight=1.5, task_weight=1.0,
                 **kwargs):
        super().__init__(module_info, recon_weight=recon_weight,
                         task_weight=task_weight, **kwargs)
