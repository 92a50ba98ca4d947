# Copyright (c) mmlocal contributors.
import logging
import math
import os.path as osp
import warnings
from collections import defaultdict
from typing import List, Optional

from mmdet.datasets import CocoDataset
from mmengine.fileio import exists, load
from mmengine.logging import print_log

from mmlocal.registry import DATASETS


def _class_key(name) -> str:
    """Names are compared trimmed and lower-cased."""
    return str(name).strip().lower()


@DATASETS.register_module()
class CISDataset(CocoDataset):
    """CIS, the Construction Instance Segmentation dataset, as checked COCO.

    Yan, Zhang, Wu, Lin, Liu, "Construction Instance Segmentation (CIS)
    dataset for deep learning-based computer vision", Automation in
    Construction 156 (2023) 105083; release and scripts in the public
    repository ``XZ-YAN/CIS-Dataset``. One of the three benchmarks of
    GSO-YOLO (arXiv 2407.00906). Ten categories (:attr:`METAINFO`, spelled as
    in the repository's ``CIS_statistics_visualizer.py``): workers with and
    without a helmet, precast components (PC), and seven machines. The
    release is COCO json with polygon masks, ``category_id`` 0..9 and image
    ids from 0, laid out (after ``CIS_decoder.py`` has turned the downloaded
    text parts into JPEGs) as::

        dataset/annotations/{train,val,test}.json    {train,val,test}/<file>

    The categories of the file are checked against the ten names (trimmed,
    case-insensitive; a file with other categories is an error unless the
    config sets ``metainfo=dict(classes=...)``, which may then be any subset
    of the file's categories). Ids starting at 0 are read as they are. This
    is also the checked COCO loader :class:`MOCSDataset` builds on.

    On top of mmdet's :class:`CocoDataset` parsing (``iscrowd`` becomes
    ``ignore_flag=1``, boxes under 1 px are dropped, ``filter_cfg`` as in
    mmdet) it checks the file:

    - file level, always an error: a missing or unreadable ``ann_file``,
      missing ``images``/``categories``, entries without ``id``, duplicate
      image, annotation or category ids, category names equal up to case,
      or configured classes that the file does not have;
    - per image, an error naming the file and the entry, or with
      ``on_error='skip'`` a warning and the image is left out (so no image
      trains with a partial set of objects): an image entry without
      ``file_name`` or a positive integer ``width``/``height``, an image
      missing on disk (``check_image_exists``), an annotation whose
      ``category_id`` is not in ``categories``, whose bbox is not 4 numbers,
      is empty, or leaves the image by more than ``bbox_tolerance`` pixels
      (within it the box is clipped), whose ``area`` is missing or not
      positive, or, with ``require_masks``, which has no segmentation, a
      polygon with fewer than 3 points (or an odd number of coordinates) or
      an RLE whose size is not the image's;
    - when a metric will read the file with pycocotools
      (``metric_reads_ann_file``, by default in ``test_mode``): an
      annotation without ``iscrowd``, or with id 0 (``COCOeval`` stores the
      id of the matched ground truth and reads 0 as "unmatched", so a
      detection matched to annotation 0 would count as a false positive),
      is an error;
    - an annotation whose ``image_id`` is not in ``images``: an error, or
      with ``on_error='skip'`` a warning and the annotation is left out.

    Classes. ``metainfo=dict(classes=...)`` selects categories by name,
    compared trimmed and case-insensitively; categories not selected are
    dropped, as in mmdet. mmdet's :class:`CocoMetric` maps label ``i`` to
    the ``i``-th category of the file whose name is in ``classes``, compared
    exactly, so ``metainfo['classes']`` is set to the selected names as the
    file spells them, in file order (logged when that differs from the
    configuration; a warning when the config set the classes). Labels
    follow that order. Because the order comes from the file, reading
    :attr:`metainfo` of a ``lazy_init`` dataset loads it.

    Args:
        on_error (str): ``'raise'`` to stop at the first malformed entry with
            a ``ValueError`` (content) or ``FileNotFoundError`` (missing
            file), ``'skip'`` to warn and leave the image (or an orphan
            annotation) out. Defaults to ``'raise'``.
        check_image_exists (bool): Check while loading the data list that
            every image of the file exists under ``data_prefix['img']``. One
            ``exists`` call per image; turn it off for speed once the data is
            known good. Defaults to True.
        bbox_tolerance (float): How many pixels a box may leave the image
            before it is an error; boxes within it are clipped.
            Defaults to 1.0.
        require_masks (bool): Every non-crowd annotation must have a valid
            ``segmentation`` (``LoadAnnotations(with_mask=True)`` needs one).
            Set False for a detection-only file. Defaults to True.
        metric_reads_ann_file (bool, optional): A metric (``CocoMetric``
            with ``ann_file``) evaluates against this json with pycocotools:
            require ``iscrowd`` and annotation ids other than 0. None (the
            default) means ``test_mode``; set False when the metric builds
            its ground truth from the dataset (no ``ann_file``, the
            ``instances`` meta key), as the CIS configs do.
        data_prefix (dict, optional): ``img`` is the image folder relative to
            ``data_root``. Defaults to ``dict(img='')``.
        **kwargs: Arguments of :class:`mmdet.datasets.CocoDataset`
            (``data_root``, ``ann_file``, ``metainfo``, ``filter_cfg``,
            ``pipeline``, ``test_mode``, ``backend_args``, ...).
    """

    METAINFO: dict = {
        'classes':
        ('people-helmet', 'people-no-helmet', 'PC', 'PC-truck', 'dump-truck',
         'mixer', 'excavator', 'roller', 'dozer', 'wheel-loader'),
        'palette': [(220, 20, 60), (255, 128, 0), (128, 128, 128),
                    (0, 0, 230), (139, 69, 19), (0, 160, 0), (255, 215, 0),
                    (106, 0, 228), (0, 191, 255), (165, 42, 42)]
    }

    def __init__(self,
                 on_error: str = 'raise',
                 check_image_exists: bool = True,
                 bbox_tolerance: float = 1.0,
                 require_masks: bool = True,
                 metric_reads_ann_file: Optional[bool] = None,
                 data_prefix: Optional[dict] = None,
                 **kwargs) -> None:
        if on_error not in ('raise', 'skip'):
            raise ValueError(
                f"on_error={on_error!r} must be 'raise' or 'skip'")
        if bbox_tolerance < 0:
            raise ValueError(f'bbox_tolerance={bbox_tolerance} must be >= 0')
        self.on_error = on_error
        self.check_image_exists = check_image_exists
        self.bbox_tolerance = bbox_tolerance
        self.require_masks = require_masks
        if metric_reads_ann_file is not None and not isinstance(
                metric_reads_ann_file, bool):
            raise ValueError(f'metric_reads_ann_file={metric_reads_ann_file!r}'
                             ' must be True, False or None')
        self._metric_reads_ann_file = metric_reads_ann_file
        self._classes_resolved = False
        metainfo = kwargs.get('metainfo')
        # classes given by the config may be a subset of the file's; classes
        # of the class METAINFO must be exactly the file's
        self._classes_from_config = (
            metainfo is not None and metainfo.get('classes') is not None)
        super().__init__(
            data_prefix=dict(img='') if data_prefix is None else data_prefix,
            **kwargs)

    @property
    def metric_reads_ann_file(self) -> bool:
        """Whether pycocotools will evaluate against ``ann_file``."""
        if self._metric_reads_ann_file is None:
            return bool(self.test_mode)
        return self._metric_reads_ann_file

    @property
    def metainfo(self) -> dict:
        """Meta information; the classes are known once the file is read."""
        if not self._classes_resolved:
            self.full_init()
        return super().metainfo

    def load_data_list(self) -> List[dict]:
        """Load and check the COCO json ``ann_file``.

        Returns:
            list[dict]: One data info per image; with ``on_error='skip'``
            malformed images are left out.
        """
        coco = self._load_json()
        self._select_classes(coco['categories'])
        self._category_ids = {cat['id'] for cat in coco['categories']}
        self._num_skipped = 0

        images = {}
        for index, img in enumerate(coco['images']):
            if not isinstance(img, dict) or 'id' not in img:
                raise ValueError(
                    f'{self.ann_file}: images[{index}] has no "id"')
            if img['id'] in images:
                raise ValueError(
                    f'{self.ann_file}: image id {img["id"]!r} appears more '
                    'than once in "images"')
            images[img['id']] = img

        anns_of = defaultdict(list)
        ann_ids = set()
        for index, ann in enumerate(coco.get('annotations') or []):
            if not isinstance(ann, dict) or 'id' not in ann:
                raise ValueError(
                    f'{self.ann_file}: annotations[{index}] has no "id"')
            if ann['id'] in ann_ids:
                raise ValueError(f'{self.ann_file}: annotation id '
                                 f'{ann["id"]!r} appears more than once')
            ann_ids.add(ann['id'])
            if ann.get('image_id') not in images:
                self._raise_or_warn(
                    ValueError(
                        f'{self.ann_file}: annotation id {ann["id"]!r} refers '
                        f'to image id {ann.get("image_id")!r}, which is not '
                        'in "images"'), 'annotation skipped')
                continue
            anns_of[ann['image_id']].append(ann)

        data_list = []
        self.cat_img_map = defaultdict(list)
        for img_id, img in images.items():
            data_info = self.parse_data_info(
                dict(
                    raw_img_info=dict(img, img_id=img_id),
                    raw_ann_info=anns_of[img_id]))
            if data_info is None:
                continue
            data_list.append(data_info)
            for ann in anns_of[img_id]:
                self.cat_img_map[ann['category_id']].append(img_id)
        if self._num_skipped:
            print_log(
                f'{type(self).__name__}: skipped {self._num_skipped} '
                f'malformed entries of {self.ann_file} (on_error="skip")',
                logger='current',
                level=logging.WARNING)
        return data_list

    def _load_json(self) -> dict:
        """Read ``ann_file`` and check its top-level structure."""
        if not self.ann_file or not exists(
                self.ann_file, backend_args=self.backend_args):
            raise FileNotFoundError(
                f'{type(self).__name__}: annotation file ann_file='
                f'{self.ann_file!r} does not exist')
        try:
            coco = load(
                self.ann_file,
                file_format='json',
                backend_args=self.backend_args)
        except ValueError as err:
            raise ValueError(
                f'{self.ann_file}: not a valid json file ({err})') from err
        if not isinstance(coco, dict):
            raise ValueError(f'{self.ann_file}: expected a COCO json object, '
                             f'got a {type(coco).__name__}')
        for key in ('images', 'categories'):
            if not isinstance(coco.get(key), list):
                raise ValueError(
                    f'{self.ann_file}: "{key}" is missing or not a list')
        if not isinstance(coco.get('annotations') or [], list):
            raise ValueError(f'{self.ann_file}: "annotations" is not a list')
        return coco

    def _select_classes(self, categories: List[dict]) -> None:
        """Match the configured classes to the file's categories.

        Sets ``metainfo['classes']`` (file spelling and order),
        ``cat_ids`` and ``cat2label``.

        Args:
            categories (list[dict]): ``categories`` of the COCO json.
        """
        by_key = {}
        for index, cat in enumerate(categories):
            if not isinstance(cat, dict) or 'id' not in cat \
                    or 'name' not in cat:
                raise ValueError(f'{self.ann_file}: categories[{index}] '
                                 'needs an "id" and a "name"')
            if any(cat['id'] == other['id'] for other in by_key.values()):
                raise ValueError(f'{self.ann_file}: category id {cat["id"]!r}'
                                 ' appears more than once')
            key = _class_key(cat['name'])
            if key in by_key:
                raise ValueError(
                    f'{self.ann_file}: categories {by_key[key]["name"]!r} and '
                    f'{cat["name"]!r} are the same name up to case and '
                    'whitespace')
            by_key[key] = cat
        file_names = [cat['name'] for cat in categories]

        wanted = self._metainfo.get('classes')
        if wanted is None:
            selected = list(categories)
        else:
            wanted = list(wanted)
            keys = [_class_key(name) for name in wanted]
            if len(set(keys)) != len(keys):
                raise ValueError(
                    f'metainfo classes {wanted} repeat a name (compared '
                    'trimmed and case-insensitively)')
            missing = [n for n, k in zip(wanted, keys) if k not in by_key]
            # a config may select a subset; the class METAINFO may not
            extra = [] if self._classes_from_config else [
                n for n in file_names if _class_key(n) not in keys
            ]
            if missing or extra:
                source = ('metainfo' if self._classes_from_config else
                          f'{type(self).__name__}.METAINFO')
                raise ValueError(
                    f'{self.ann_file}: the classes of {source} do not match '
                    'the categories of the file (compared trimmed and '
                    f'case-insensitively): not in the file {missing}, '
                    f'only in the file {extra}; file categories: '
                    f'{file_names}. Set metainfo=dict(classes=...) in the '
                    'dataset config to the categories to train on.')
            selected = [
                cat for cat in categories if _class_key(cat['name']) in keys
            ]

        classes = tuple(cat['name'] for cat in selected)
        if wanted is not None and list(classes) != wanted:
            palette = self._metainfo.get('palette')
            if isinstance(palette, list) and len(palette) == len(wanted):
                self._metainfo['palette'] = [
                    palette[keys.index(_class_key(name))] for name in classes
                ]
            # the class METAINFO fixes the names, not the file's order
            print_log(
                f'{type(self).__name__}: classes follow the spelling and '
                f'order of the categories in {self.ann_file}, as CocoMetric '
                f'expects: {classes} (configured: {tuple(wanted)})',
                logger='current',
                level=logging.WARNING
                if self._classes_from_config else logging.INFO)
        self._metainfo['classes'] = classes
        self.cat_ids = [cat['id'] for cat in selected]
        self.cat2label = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        self._classes_resolved = True

    def _raise_or_warn(self, err: Exception, action: str) -> None:
        """Apply ``on_error`` to a malformed entry.

        Args:
            err (Exception): The error naming the file and the entry.
            action (str): What skipping does, for the warning.
        """
        if self.on_error == 'raise':
            raise err
        warnings.warn(f'{err}; {action} (on_error="skip")')
        self._num_skipped += 1

    def parse_data_info(self, raw_data_info: dict) -> Optional[dict]:
        """Check one image and its annotations, then parse as mmdet does.

        Args:
            raw_data_info (dict): ``raw_img_info`` (the image entry with
                ``img_id``) and ``raw_ann_info`` (its annotations).

        Returns:
            dict | None: The data info, or None when the image is malformed
            and ``on_error='skip'``.
        """
        img = raw_data_info['raw_img_info']
        try:
            self._check_image(img)
            anns = [
                self._check_annotation(ann, img)
                for ann in raw_data_info['raw_ann_info']
            ]
        except (ValueError, FileNotFoundError) as err:
            self._raise_or_warn(err, 'image skipped')
            return None
        return super().parse_data_info(
            dict(raw_img_info=img, raw_ann_info=anns))

    def _check_image(self, img: dict) -> None:
        """Check an image entry (with ``img_id``) and that the image exists."""
        where = f'{self.ann_file}: image id {img["img_id"]!r}'
        if not isinstance(img.get('file_name'), str) or not img['file_name']:
            raise ValueError(f'{where} has no "file_name"')
        where = f'{where} ({img["file_name"]!r})'
        for key in ('width', 'height'):
            value = img.get(key)
            if not _is_number(value) or value <= 0 or value != int(value):
                raise ValueError(
                    f'{where} has {key}={value!r}, not a positive integer')
            img[key] = int(value)
        if self.check_image_exists:
            img_path = osp.join(self.data_prefix['img'], img['file_name'])
            if not exists(img_path, backend_args=self.backend_args):
                raise FileNotFoundError(
                    f'{where}: the image {img_path} does not exist '
                    '(check_image_exists=True)')

    def _check_annotation(self, ann: dict, img: dict) -> dict:
        """Check one annotation of ``img``; return it with a clipped bbox."""
        width, height = img['width'], img['height']
        where = (f'{self.ann_file}: annotation id {ann["id"]!r} of image id '
                 f'{img["img_id"]!r} ({img["file_name"]!r})')
        if ann.get('category_id') not in self._category_ids:
            raise ValueError(
                f'{where} has category_id {ann.get("category_id")!r}, which '
                f'is not in "categories" (ids {sorted(self._category_ids)})')

        bbox = ann.get('bbox')
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                _is_number(v) for v in bbox):
            raise ValueError(f'{where} has bbox={bbox!r}, not 4 numbers '
                             '[x, y, w, h]')
        x1, y1, w, h = bbox
        if w <= 0 or h <= 0:
            raise ValueError(f'{where} has an empty bbox {bbox} [x, y, w, h]')
        tol = self.bbox_tolerance
        if (x1 < -tol or y1 < -tol or x1 + w > width + tol
                or y1 + h > height + tol):
            raise ValueError(
                f'{where} has bbox {bbox} [x, y, w, h], which leaves the '
                f'{width}x{height} image by more than bbox_tolerance={tol} '
                'px')
        x2, y2 = min(x1 + w, width), min(y1 + h, height)
        x1, y1 = max(x1, 0), max(y1, 0)

        area = ann.get('area')
        if not _is_number(area) or area <= 0:
            raise ValueError(f'{where} has area={area!r}, not a positive '
                             'number')
        if self.metric_reads_ann_file:
            if 'iscrowd' not in ann:
                raise ValueError(
                    f'{where} has no "iscrowd", which COCO evaluation '
                    '(CocoMetric with ann_file) needs; or evaluate from the '
                    'dataset (no ann_file, metric_reads_ann_file=False)')
            if ann['id'] == 0:
                raise ValueError(
                    f'{where}: pycocotools\' COCOeval reads annotation id 0 '
                    'as "unmatched", so a detection matched to it would '
                    'count as a false positive. Renumber the annotation ids '
                    'from 1, or evaluate from the dataset (CocoMetric '
                    'without ann_file, the "instances" meta key in the test '
                    'pipeline, metric_reads_ann_file=False)')
        if self.require_masks:
            self._check_segmentation(
                ann.get('segmentation'), width, height, where)
        return dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1])

    @staticmethod
    def _check_segmentation(segm, width: int, height: int, where: str) -> None:
        """Check a polygon list or an RLE of a ``width`` x ``height`` image."""
        if isinstance(segm, dict):  # RLE
            if segm.get('counts') is None or \
                    list(segm.get('size') or []) != [height, width]:
                raise ValueError(
                    f'{where} has an RLE segmentation without "counts" or '
                    f'with size {segm.get("size")} instead of '
                    f'[{height}, {width}]')
            return
        if not isinstance(segm, list) or not segm:
            raise ValueError(f'{where} has no segmentation')
        for index, polygon in enumerate(segm):
            if not isinstance(polygon, list) or not all(
                    _is_number(v) for v in polygon):
                raise ValueError(
                    f'{where}: segmentation polygon #{index} is not a list '
                    'of numbers')
            if len(polygon) % 2 or len(polygon) < 6:
                raise ValueError(
                    f'{where}: segmentation polygon #{index} has '
                    f'{len(polygon)} coordinates; a polygon needs an even '
                    'number of at least 6 (3 points)')


def _is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)
