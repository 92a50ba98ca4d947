# Ablation: GSO-YOLO-s on SODA with YOLOv8's CIoU box loss instead of AIoU
# (mmdet's CIoULoss; AIoULoss with alpha=1 computes the same loss).
_base_ = './gso-yolo_s_8xb16-300e_soda.py'

model = dict(
    bbox_head=dict(
        loss_bbox=dict(
            _delete_=True, type='CIoULoss', reduction='mean',
            loss_weight=7.5)))
