_base_ = './infopro_fcn_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(aux=dict(_delete_=True, type='mmlocal.DGLAux'))
