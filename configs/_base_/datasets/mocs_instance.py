# MOCS (An et al., Automation in Construction 2021): 13 classes of moving
# objects on construction sites, COCO json with polygon masks.
# See docs/datasets.md.
#   data/MOCS/instances_train.json  instances_train/
#   data/MOCS/instances_val.json    instances_val/
#   data/MOCS/image_info_test.json  instances_test/  (no annotations)
# The dataset's classes take the json's spelling and order (what CocoMetric
# expects); a json whose categories are not the 13 of the paper is an error
# unless `metainfo=dict(classes=...)` is set on the datasets.
dataset_type = 'mmlocal.MOCSDataset'
data_root = 'data/MOCS/'
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
                   'scale_factor')),
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
        ann_file='instances_train.json',
        data_prefix=dict(img='instances_train/'),
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
        ann_file='instances_val.json',
        data_prefix=dict(img='instances_val/'),
        test_mode=True,
        on_error='raise',
        check_image_exists=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
# the test split has no public annotations: test on val
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'instances_val.json',
    metric=['bbox', 'segm'],
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

# To write predictions on the test split for submission:
# test_dataloader = dict(
#     batch_size=1,
#     num_workers=2,
#     persistent_workers=True,
#     drop_last=False,
#     sampler=dict(type='DefaultSampler', shuffle=False),
#     dataset=dict(
#         type=dataset_type,
#         data_root=data_root,
#         ann_file='image_info_test.json',
#         data_prefix=dict(img='instances_test/'),
#         test_mode=True,
#         pipeline=[
#             dict(type='LoadImageFromFile', backend_args=backend_args),
#             dict(type='Resize', scale=img_scale, keep_ratio=True),
#             dict(type='PackDetInputs',
#                  meta_keys=('img_id', 'img_path', 'ori_shape',
#                             'img_shape', 'scale_factor'))
#         ]))
# test_evaluator = dict(
#     type='CocoMetric',
#     metric=['bbox', 'segm'],
#     format_only=True,
#     ann_file=data_root + 'image_info_test.json',
#     outfile_prefix='./work_dirs/mocs_instance/test')
