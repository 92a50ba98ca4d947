_base_ = './dgl_atss_r50_fpn_k2_8xb2-1x_coco.py'

model = dict(num_modules=4)
