# The demo RetinaNet with a ResNet-50 and a 256-channel FPN and head (two
# stacked convs, as the R18 demo), 2 images per batch: a model whose
# parameters and optimizer state outweigh its activations at the demo's
# 320x320 input, what pipeline-parallel local learning is for
# (docs/local_learning.md, "Training on several devices").
_base_ = './retinanet_r18_fpn_1xb4-300i_demo-trees.py'

model = dict(
    backbone=dict(depth=50),
    neck=dict(in_channels=[256, 512, 1024, 2048], out_channels=256),
    bbox_head=dict(in_channels=256, feat_channels=256))
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(base_batch_size=2)
