_base_ = './infopro_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

# memory-balanced K=4 points (tools/analysis/plan_split.py, 2x3x512x1024)
model = dict(split_points=[6, 12, 15])
