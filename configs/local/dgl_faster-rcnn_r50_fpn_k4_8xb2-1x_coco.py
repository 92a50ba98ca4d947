_base_ = './dgl_faster-rcnn_r50_fpn_k2_8xb2-1x_coco.py'

model = dict(num_modules=4)
