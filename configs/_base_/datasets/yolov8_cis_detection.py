# CIS (Yan et al., Automation in Construction 156 (2023) 105083;
# XZ-YAN/CIS-Dataset), boxes only: 10 classes, COCO json with ids from 0, in
# the release's layout (data_root = the folder holding dataset/ and the
# decoded {train,val,test}/ images). The metric builds its ground truth from
# the dataset ('instances' meta key, no ann_file), so the file's ids (an
# annotation id 0 reads as "unmatched" in pycocotools) do not matter.
_base_ = './yolov8_coco_detection.py'

dataset_type = 'mmlocal.CISDataset'
data_root = 'data/CIS/'

# the base's test pipeline, packing the dataset's instances for CocoMetric
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='Resize', scale=_base_.img_scale, keep_ratio=True),
    dict(
        type='Pad',
        size=_base_.img_scale,
        pad_val=dict(img=(_base_.pad_val, _base_.pad_val, _base_.pad_val))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor', 'instances'))
]

train_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='dataset/annotations/train.json',
        data_prefix=dict(img='train/'),
        require_masks=False))
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='dataset/annotations/val.json',
        data_prefix=dict(img='val/'),
        require_masks=False,
        metric_reads_ann_file=False,
        pipeline=test_pipeline))
test_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='dataset/annotations/test.json',
        data_prefix=dict(img='test/'),
        require_masks=False,
        metric_reads_ann_file=False,
        pipeline=test_pipeline))

val_evaluator = dict(_delete_=True, type='CocoMetric', metric='bbox',
                     format_only=False, backend_args=_base_.backend_args)
test_evaluator = val_evaluator
