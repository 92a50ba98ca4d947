_base_ = './hpff_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py'

model = dict(num_modules=4)
