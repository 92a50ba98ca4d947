# Copyright (c) mmlocal contributors.
from mmlocal.registry import DATASETS
from .cis import CISDataset


@DATASETS.register_module()
class MOCSDataset(CISDataset):
    """MOCS, the Moving Objects in Construction Sites dataset.

    An, Zhou, Liu, Wang, Li and Li, "Dataset and benchmark for detecting
    moving objects in construction sites", Automation in Construction 122
    (2021) 103482. 41,668 images from 174 sites with polygon instance masks
    of 13 classes, released as COCO json::

        instances_train.json   instances_train/<file_name>
        instances_val.json     instances_val/<file_name>
        image_info_test.json   instances_test/<file_name>  (no annotations)

    Loading and checking are :class:`CISDataset`'s. The class names below
    are the paper's and are not confirmed against the released json: they
    are matched to its categories trimmed and case-insensitively, and a
    file whose categories are not exactly these 13 is an error unless the
    config sets ``metainfo=dict(classes=...)`` (which may then be any subset
    of the file's categories). As for every COCO file here, the dataset's
    classes take the file's spelling and order, which is what mmdet's
    ``CocoMetric`` assumes.

    Args:
        **kwargs: Arguments of :class:`CISDataset` (``on_error``,
            ``check_image_exists``, ``bbox_tolerance``, ``require_masks``)
            and of :class:`mmdet.datasets.CocoDataset`.
    """

    METAINFO = {
        'classes':
        ('Worker', 'Static crane', 'Hanging head', 'Crane', 'Roller',
         'Bulldozer', 'Excavator', 'Truck', 'Loader', 'Pump truck',
         'Concrete mixer', 'Pile driving', 'Other vehicle'),
        'palette': [(220, 20, 60), (0, 80, 100), (255, 215, 0), (0, 0, 230),
                    (106, 0, 228), (255, 128, 0), (250, 170, 30), (0, 60, 100),
                    (165, 42, 42), (0, 160, 0), (128, 128, 128), (139, 69, 19),
                    (0, 191, 255)]
    }
