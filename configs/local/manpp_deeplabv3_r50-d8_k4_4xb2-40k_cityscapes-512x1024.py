_base_ = './manpp_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

# memory-balanced K=4 points for MAN's aux (tools/analysis/plan_split.py)
model = dict(split_points=[6, 12, 14])
