_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    num_modules=2,
    aux=dict(type='mmlocal.InfoProAux'))
custom_hooks = [dict(type='mmlocal.PeakMemoryHook', interval=50)]
