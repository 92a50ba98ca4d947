from mmlocal.registry import MODELS
from .cascade import CascadeLocalAux


@MODELS.register_module()
class HPFFAux(CascadeLocalAux):
    """HPFF: Hierarchical locally supervised learning with Patch Feature
    Fusion (Su et al., ECCV 2024).

    **HiLo**: module k is trained by an independent local module (a light
    head on its own output) and a cascade local module joining modules
    ``k-1`` and ``k`` (``cascade_span=2``):

    .. math::
        \\mathcal{L}_k = w_x\\,\\mathcal{L}_{task}(g_k(f_k(sg(h_{k-1}))))
            + w_y\\,\\big[\\lambda_1 \\mathrm{BCE}(D_k(z_k), x)
            + \\lambda_2 \\mathcal{L}_{task}(c_k(z_k))\\big],\\quad
        z_k = f_k(f_{k-1}(sg(h_{k-2})))

    with ``w_x = 0.001``, ``w_y = 0.999`` and InfoPro's ``lambda``
    (``recon_weight``, ``task_weight``).

    **PFF**: the cascade aux input ``z_k`` is cut into a ``P x P`` grid
    (``patch_grid``, 2 = the reference's quadrants). As in the reference
    (``patch_parts='recon'``, default) only the reconstruction decoder runs
    on the patches, each against the matching region of the image; the
    task head sees the whole ``z_k``:

    .. math::
        \\mathcal{L}_{cas} = \\lambda_2 \\mathcal{L}_{task}(c_k(z_k))
            + \\lambda_1 \\frac{1}{P^2} \\sum_{p}
              \\mathrm{BCE}(D_k(z_k^{(p)}), x^{(p)}).

    ``patch_parts='all'`` cuts the whole cascade aux (task head too, each
    patch against the ground truth of its region). By default the patches
    run one after the other with each share back-propagated at once, so the
    decoder activations of only one patch are alive (the reference keeps
    all patches in one graph and saves nothing); ``patch_batch=True`` runs
    them stacked along the batch, each BN layer normalising every patch
    alone: the same losses and gradients from one forward/backward (fewer
    kernel launches), at the memory of no PFF. ``patch_reduction='sum'``
    sums the patch losses: the reference sums its 4 patch reconstruction
    BCEs, so at the same ``lambda_1`` its reconstruction term weighs
    ``P^2`` times the mean's.

    Args:
        module_info (LocalModuleInfo): Filled in by ``LocalLearner``.
        cascade_span (int): Modules per cascade window. Default 2 (HiLo).
        patch_grid (int): ``P``. Default 2; 1 disables PFF.
        patch_parts (str): ``'recon'`` (default, the reference) or
            ``'all'``: what runs on the patches.
        **kwargs: :class:`CascadeLocalAux` options (``independent_weight``,
            ``cascade_weight``, ``patch_remainder``, ``patch_reduction``,
            ``patch_batch``, heads) and InfoPro's
            ``recon_weight`` (1.5) / ``task_weight`` (1.0).
    """

    def __init__(self,
                 module_info,
                 cascade_span=2,
                 patch_grid=2,
                 patch_parts='recon',
                 **kwargs):
        super().__init__(module_info, cascade_span=cascade_span,
                         patch_grid=patch_grid, patch_parts=patch_parts,
                         **kwargs)
