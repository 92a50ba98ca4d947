_base_ = './mlaan_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

# memory-balanced K=4 points for this family (tools/analysis/plan_split.py)
model = dict(split_points=[7, 8, 13])
