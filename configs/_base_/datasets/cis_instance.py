# CIS, Construction Instance Segmentation (Yan et al., Automation in
# Construction 156 (2023) 105083; XZ-YAN/CIS-Dataset): 10 classes, COCO json
# with polygon masks, category and image ids from 0. data_root is the
# release's folder after its CIS_decoder.py has decoded the images:
#   data/CIS/dataset/annotations/{train,val,test}.json
#   data/CIS/{train,val,test}/<file_name>
# The metric builds its ground truth from the dataset (the 'instances' meta
# key, no ann_file): it does not depend on the file's ids (pycocotools reads
# an annotation id 0 as "unmatched") or on an 'iscrowd' field. See
# docs/datasets.md.
dataset_type = 'mmlocal.CISDataset'
data_root = 'data/CIS/'
img_scale = (1333, 800)
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # after Resize: the annotations stay in the original image's coordinates
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor', 'instances')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='dataset/annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        # malformed entries or missing images: 'raise' or 'skip'
        on_error='raise',
        check_image_exists=True,
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='dataset/annotations/val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        metric_reads_ann_file=False,
        on_error='raise',
        check_image_exists=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='dataset/annotations/test.json',
        data_prefix=dict(img='test/'),
        test_mode=True,
        metric_reads_ann_file=False,
        on_error='raise',
        check_image_exists=True,
        pipeline=test_pipeline,
        backend_args=backend_args))

# no ann_file: ground truth from the dataset's instances (ids renumbered by
# mmdet's CocoMetric); the GT 'area' is then the box's, which only moves the
# small/medium/large split, not mAP
val_evaluator = dict(
    type='CocoMetric',
    metric=['bbox', 'segm'],
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
