_base_ = './infopro_retinanet_r50_fpn_k2_8xb2-1x_coco.py'

model = dict(aux=dict(_delete_=True, type='mmlocal.DGLAux'))
