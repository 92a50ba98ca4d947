# GSO-YOLO-m on MOCS (13 classes): the -s config at m size.
_base_ = './gso-yolo_s_8xb16-300e_mocs.py'

deepen_factor = 0.67
widen_factor = 0.75
last_stage_out_channels = 768

model = dict(
    backbone=dict(
        last_stage_out_channels=last_stage_out_channels,
        deepen_factor=deepen_factor,
        widen_factor=widen_factor),
    neck=dict(
        in_channels=[256, 512, last_stage_out_channels],
        out_channels=[256, 512, last_stage_out_channels],
        deepen_factor=deepen_factor,
        widen_factor=widen_factor),
    bbox_head=dict(
        in_channels=[256, 512, last_stage_out_channels],
        widen_factor=widen_factor))
