# The demo detector trained with AugLocal: module 0's aux net is a stack of
# freshly initialised copies of 2 blocks sampled uniformly from layer3-4,
# then the demo's 128-channel detection head.
_base_ = './infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py'

model = dict(
    aux=dict(
        _delete_=True,
        type='mmlocal.AugLocalAux',
        aux_depth=2,
        pyramid_coeff=0.5,
        det_head=dict(feat_channels=128)))
