"""Which transformer layers of mmseg's ``VisionTransformer`` RepL can replace.

All ``TransformerEncoderLayer`` s of a ViT have the same shapes, so they form
one stage. A replaced layer ``k`` keeps its stock forward
(``x = x + attn(ln1(x)); x = x + ffn(ln2(x))``, drop path and ``with_cp``
included); every one of its sub-modules is synthesised from layers ``k-1``
and ``k+1``:

=================== ================================= ==================
sub-module          tensors (``D`` = ``embed_dims``)  transform channels
=================== ================================= ==================
``ln1``, ``ln2``    weight, bias ``[D]``              ``D``
qkv                 ``attn.attn.in_proj_weight``      ``3D``
                    ``[3D, D]``, ``in_proj_bias``
proj                ``attn.attn.out_proj`` ``[D, D]``  ``D``
MLP fc1             ``ffn.layers.0.0`` ``[F, D]``      ``F``
MLP fc2             ``ffn.layers.1`` ``[D, F]``        ``D``
=================== ================================= ==================

(``F`` = ``feedforward_channels``.) A per-channel transform mixes the rows
(output channels) of each matrix, so for qkv it weighs every query, key and
value channel separately. Layer 0 is never replaced: its predecessor is the
patch embedding, not a transformer layer. The last layer has no successor:
the ``'mirror'`` fusion rule synthesises it from layer ``k-1`` alone.
"""
from .synthesis import RepLUnit


def vit_types():
    try:
        from mmseg.models.backbones import VisionTransformer
    except ImportError:  # pragma: no cover - mmseg is a requirement
        return ()
    return (VisionTransformer, )


def vit_units(backbone):
    """RepL units of an mmseg ``VisionTransformer``, or None if it is not
    one."""
    types = vit_types()
    if not types or not isinstance(backbone, types):
        return None
    for base in types:
        if isinstance(backbone, base) and \
                type(backbone).forward is not base.forward:
            raise ValueError(
                f'{type(backbone).__name__} overrides '
                f'{base.__name__}.forward; RepL only knows the stock one')
    layers = list(backbone.layers)
    units = []
    for i, layer in enumerate(layers):
        params = list(layer.parameters())
        refusal = None
        if i == 0:
            refusal = ('it is the first transformer layer: its predecessor '
                       'is the patch embedding, no fusion rule applies')
        units.append(
            RepLUnit(
                index=i,
                name=f'layers.{i}',
                module=layer,
                stage=0,
                position=i,
                stage_size=len(layers),
                frozen=bool(params)
                and not any(p.requires_grad for p in params),
                refusal=refusal))
    return units
