_base_ = './infopro_faster-rcnn_r50_fpn_k2_8xb2-1x_coco.py'

# K=4 cut where tools/analysis/plan_split.py balances the modules' memory
# (1x3x800x1333: estimated step peak 1016 MiB with the even split [6, 9, 12],
# 831 MiB here). For the even split set
# `model.split_points=None model.num_modules=4`.
model = dict(num_modules=None, split_points=[4, 8, 15])
