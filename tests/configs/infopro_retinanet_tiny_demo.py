# The tiny demo detector trained with local learning (K=2, InfoPro).
_base_ = './retinanet_tiny_demo.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    num_modules=2,
    aux=dict(type='mmlocal.InfoProAux', det_head=dict(feat_channels=32),
             recon=dict(channels=32)))
