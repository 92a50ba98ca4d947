_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    # K=2 cut where tools/analysis/plan_split.py balances the two modules'
    # memory (2x3x512x1024): the even split [8] leaves the 8 dilated blocks
    # and the heads in module 1 (estimated step peak 4.33 GiB, measured 3.74);
    # block 12: 3.56 GiB estimated. Even split: `model.split_points=None
    # model.num_modules=2`.
    split_points=[12],
    aux=dict(type='mmlocal.InfoProAux'))
custom_hooks = [dict(type='mmlocal.PeakMemoryHook', interval=50)]
