# The demo R50 RetinaNet (retinanet_r50_fpn_1xb2-300i_demo-trees.py) trained
# with DGL, K=5, cut for pipeline parallelism on 2 processes
# (docs/local_learning.md, "Benchmark: one device vs several"): modules
# stem + layer1[0] | layer1[1-2] | layer2 | layer3 + layer4[0] |
# layer4[1-2] + FPN + head. The default stages [[0, 1, 2, 3], [4]] split
# both the step time (in-process CPU time 53 / 47 %) and the memory (each
# process <= 0.57x one process's parameters, optimizer state and step
# peak): layer4[0] and layer3 (13 M parameters) stay with the
# full-resolution modules, whose activations are smaller than the last
# stage's parameters, gradients and Adam state. Small DGL aux nets (a 4x
# average pool, 2 x 1x1 conv of 128 channels, the 128-channel detection
# head) keep the modules' extra parameters low. Measured with
#   python tools/analysis/benchmark_parallel.py CONFIG --plan
#   python tools/analysis/benchmark_parallel.py CONFIG \
#       --rows single pipe_async --iters 1 --warmup 1
_base_ = './retinanet_r50_fpn_1xb2-300i_demo-trees.py'

model = dict(
    _delete_=True,
    type='mmlocal.LocalLearner',
    model={{_base_.model}},
    split_points=[1, 3, 7, 14],
    aux=dict(
        type='mmlocal.DGLAux',
        num_convs=2,
        channels=128,
        pool=4,
        det_head=dict(feat_channels=128)))
