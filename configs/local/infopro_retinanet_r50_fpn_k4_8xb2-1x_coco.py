_base_ = './infopro_retinanet_r50_fpn_k2_8xb2-1x_coco.py'

# K=4 cut where tools/analysis/plan_split.py balances the modules' memory
# (2x3x800x1333; the even split [6, 9, 12] leaves the last module, with the
# neck and heads, and module 0 largest: estimated step peak 2.24 GiB, measured
# 2.25; these points: 1.92 GiB). For the even split set
# `model.split_points=None model.num_modules=4`.
model = dict(num_modules=None, split_points=[4, 8, 15])
