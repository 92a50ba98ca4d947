_base_ = './dgl_retinanet_r50_fpn_k2_8xb2-1x_coco.py'

# the memory-balanced points of the InfoPro K=4 config (plan_split.py)
model = dict(num_modules=None, split_points=[4, 8, 15])
