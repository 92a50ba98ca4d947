# The default demo (tools/demo.sh): the demo RetinaNet R18-FPN trained with
# supervised local learning, K=3, cut where the activations are: the stem
# and layer1 hold most of a step's activations at this size, so modules 0
# and 1 are stem + layer1[0] and layer1[1] (split_points=[1, 2]), each
# trained by DGL's auxiliary net at the reference's layer stack (4x average
# pool, 3 x 1x1 conv at the input width) under the demo's 128-channel
# detection head; module 2 (layer2-4, FPN, head) is trained by RetinaNet's
# own loss. Each local loss is back-propagated before the next module runs,
# so the step peak is module 0's, not the whole network's:
# benchmark_memory.py at 4x3x320x320 measures 0.58x the end-to-end peak
# (README, "What the demo does").
_base_ = './retinanet_r18_fpn_1xb4-300i_demo-trees.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    split_points=[1, 2],
    aux=dict(
        type='mmlocal.DGLAux',
        num_convs=3,
        channels=None,
        pool=4,
        det_head=dict(feat_channels=128)))
