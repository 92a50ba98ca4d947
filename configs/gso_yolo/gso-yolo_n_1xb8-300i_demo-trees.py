# GSO-YOLO-n on the real demo tiles, CPU-friendly (320 px, 300 iterations):
#   python tools/train.py configs/gso_yolo/gso-yolo_n_1xb8-300i_demo-trees.py
# = yolov8_n_1xb8-300i_demo-trees.py + GOM + SCM + AIoU.
_base_ = './yolov8_n_1xb8-300i_demo-trees.py'

model = dict(
    backbone=dict(
        gom=dict(type='mmlocal.GAMAttention', reduction=4),
        scm=dict(type='mmlocal.EMAttention', groups=32)),
    bbox_head=dict(
        loss_bbox=dict(
            _delete_=True,
            type='mmlocal.AIoULoss',
            alpha=0.5,
            reduction='mean',
            loss_weight=7.5)))
