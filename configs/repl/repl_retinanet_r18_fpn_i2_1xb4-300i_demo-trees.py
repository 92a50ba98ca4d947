# The demo (RetinaNet R18-FPN on the real tree-crown tiles, 300 iterations on
# one CPU) with Replacement Learning: block 1 of every ResNet-18 stage is
# synthesised from block 0 (a 2-block stage has no successor: 'mirror'
# fusion; conv1 of layer2-4.1 has no same-shaped neighbour and stays
# trainable). Compare with
# configs/demo/retinanet_r18_fpn_1xb4-300i_demo-trees.py
_base_ = '../demo/retinanet_r18_fpn_1xb4-300i_demo-trees.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmlocal.RepLBackbone',
        backbone={{_base_.model.backbone}},
        interval=2,
        transform=dict(type='mmlocal.RepLLowRankMix', rank=4),
        layer='light'))
