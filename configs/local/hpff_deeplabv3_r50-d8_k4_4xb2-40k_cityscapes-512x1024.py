_base_ = './hpff_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

# the memory-balanced K=4 points of the InfoPro config (plan_split.py)
model = dict(split_points=[6, 12, 15])
