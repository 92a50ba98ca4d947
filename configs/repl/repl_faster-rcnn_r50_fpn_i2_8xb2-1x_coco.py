# Faster R-CNN R50-FPN with Replacement Learning: every 2nd block of each
# trainable ResNet stage is synthesised from its neighbours (v2-style
# low-rank channel mixing). Stock recipe otherwise.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmlocal.RepLBackbone',
        backbone={{_base_.model.backbone}},
        interval=2,
        transform=dict(type='mmlocal.RepLLowRankMix', rank=4),
        layer='light'))
