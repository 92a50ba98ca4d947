_base_ = './repl_faster-rcnn_r50_fpn_i2_8xb2-1x_coco.py'

model = dict(backbone=dict(interval=3))
