_base_ = './dgl_faster-rcnn_r50_fpn_k2_8xb2-1x_coco.py'

# K=4 at InfoPro's memory-balanced points (plan_split.py; DGL's aux nets
# are lighter than InfoPro's). For the even split set
# `model.split_points=None model.num_modules=4`.
model = dict(num_modules=None, split_points=[4, 8, 15])
