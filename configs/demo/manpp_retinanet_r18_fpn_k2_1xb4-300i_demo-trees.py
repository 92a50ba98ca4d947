# The demo detector trained with MAN++: MAN with a learnable scale s,
# y = s * LB(h) + (2 - s) * EMA(h).
_base_ = './man_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py'

model = dict(aux=dict(learnable_scale=True))
