_base_ = './repl_deeplabv3_r50-d8_i2_4xb2-40k_cityscapes-512x1024.py'

model = dict(backbone=dict(interval=3))
