_base_ = './repl_upernet_vit-b16_mln_i2_8xb2-80k_cityscapes-512x1024.py'

model = dict(backbone=dict(interval=3))
