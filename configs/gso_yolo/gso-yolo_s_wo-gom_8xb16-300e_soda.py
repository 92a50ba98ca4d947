# Ablation: GSO-YOLO-s on SODA without the Global Optimization Module.
_base_ = './gso-yolo_s_8xb16-300e_soda.py'

model = dict(backbone=dict(gom=None))
