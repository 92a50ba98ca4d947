_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    num_modules=2,
    aux=dict(type='mmlocal.InfoProAux'))
custom_hooks = [dict(type='mmlocal.PeakMemoryHook', interval=50)]
