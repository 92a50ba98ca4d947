# SODA (Duan et al., Automation in Construction 2022; arXiv 2202.09554):
# 15 construction-site classes, Pascal VOC release. See docs/datasets.md.
#   data/SODA/Annotations/*.xml  JPEGImages/*.jpg
#   data/SODA/ImageSets/Main/{train,val,test}.txt
# Evaluation: VOCMetric (AP@0.5, all-point 'area' interpolation, the metric
# SODA reports) *and* CocoMetric bbox (AP@[.5:.95], which GSO-YOLO also
# reports). CocoMetric reads the ground truth from the dataset itself (the
# 'instances' meta key below; difficult boxes become iscrowd), so no
# converted json has to be kept in sync with the XML.
dataset_type = 'mmlocal.SODADataset'
data_root = 'data/SODA/'
img_scale = (1000, 600)
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # after Resize: the boxes stay in the original image's coordinates
    dict(type='LoadAnnotations', with_bbox=True),
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
        ann_file='ImageSets/Main/train.txt',
        data_prefix=dict(sub_data_root=''),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        # malformed XML/boxes/classes or missing files: 'raise' or 'skip'
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
        ann_file='ImageSets/Main/val.txt',
        data_prefix=dict(sub_data_root=''),
        test_mode=True,
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
        ann_file='ImageSets/Main/test.txt',
        data_prefix=dict(sub_data_root=''),
        test_mode=True,
        on_error='raise',
        check_image_exists=True,
        pipeline=test_pipeline,
        backend_args=backend_args))

val_evaluator = [
    dict(type='VOCMetric', metric='mAP', eval_mode='area'),
    dict(
        type='CocoMetric',
        metric='bbox',
        format_only=False,
        backend_args=backend_args),
]
test_evaluator = val_evaluator
