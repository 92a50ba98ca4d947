# The demo detector trained with supervised local learning: the ResNet-18 is
# cut into K=2 gradient-isolated modules (layer1-2 | layer3-4 + FPN + head);
# module 0 learns from InfoPro's local loss (a light dense detection head +
# image reconstruction) that is back-propagated before module 1 runs.
_base_ = './retinanet_r18_fpn_1xb4-300i_demo-trees.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    num_modules=2,
    aux=dict(type='mmlocal.InfoProAux', det_head=dict(feat_channels=128)))
