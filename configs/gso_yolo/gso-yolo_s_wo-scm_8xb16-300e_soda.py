# Ablation: GSO-YOLO-s on SODA without the Steady Capture Module.
_base_ = './gso-yolo_s_8xb16-300e_soda.py'

model = dict(backbone=dict(scm=None))
