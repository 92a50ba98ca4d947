# Copyright (c) mmlocal contributors.
import logging
import math
import os.path as osp
import warnings
import xml.etree.ElementTree as ET
from typing import List, Optional

import mmcv
from mmdet.datasets import XMLDataset
from mmengine.fileio import exists, get, get_local_path
from mmengine.logging import print_log

from mmlocal.registry import DATASETS


@DATASETS.register_module()
class SODADataset(XMLDataset):
    """SODA, the Site Object Detection dAtaset, in its Pascal VOC release.

    Duan, Deng, Tian, Deng and Lin, "SODA: A large-scale open site object
    detection dataset for deep learning in construction", Automation in
    Construction 142 (2022) 104499, arXiv 2202.09554. 19,846 images with
    boxes of 15 classes in four groups: workers (person, helmet, vest),
    materials (board, wood, rebar, brick, scaffold), machines (handcart,
    cutter, ebox, hopper, hook) and layout (fence, slogan).

    The layout is VOC's, under ``data_root``::

        Annotations/<id>.xml
        JPEGImages/<id>.jpg
        ImageSets/Main/{train,val,test}.txt   # one <id> per line

    with ``ann_file='ImageSets/Main/train.txt'``. Parsing is mmdet's
    :class:`XMLDataset` (VOC's 1-based corners minus one, ``difficult``
    objects become ``ignore_flag=1``, ``filter_cfg`` with ``min_size``,
    ``filter_empty_gt`` and ``bbox_min_size``) with what SODA needs on top:

    - the ``<name>`` of an object is matched to ``metainfo['classes']`` after
      trimming and lower-casing both, since the spelling in the released XML
      is not verified. A name that matches no class is an error; a SODA class
      left out by a ``metainfo`` override is dropped, as in mmdet.
    - malformed entries are errors naming the file and the entry, or with
      ``on_error='skip'`` a warning and the whole image is left out (so no
      image trains with a partial, wrong set of boxes): an unreadable XML
      file, a missing XML file or image, a missing or non-numeric
      ``<bndbox>``, an empty or inverted box, or a box that leaves the image
      by more than ``bbox_tolerance`` pixels. Boxes within the tolerance are
      clipped to the image.

    Args:
        img_subdir (str): Image folder under the sub data root.
            Defaults to ``'JPEGImages'``.
        ann_subdir (str): XML folder under the sub data root.
            Defaults to ``'Annotations'``.
        data_prefix (dict, optional): ``sub_data_root`` is the folder that
            holds ``img_subdir`` and ``ann_subdir``, relative to
            ``data_root``. Defaults to ``dict(sub_data_root='')``, i.e.
            ``data_root`` itself.
        on_error (str): ``'raise'`` to stop at the first malformed entry with
            a ``ValueError`` (content) or ``FileNotFoundError`` (missing
            file), ``'skip'`` to warn and leave the image out.
            Defaults to ``'raise'``.
        check_image_exists (bool): Check while loading the data list that
            every listed image exists. One ``exists`` call per image; turn it
            off for speed on slow file systems once the data is known good.
            Defaults to True.
        bbox_tolerance (float): How many pixels a box may leave the image
            (after VOC's minus one) before it is an error; boxes within it
            are clipped. Defaults to 1.0.
        **kwargs: Arguments of :class:`mmdet.datasets.XMLDataset`
            (``data_root``, ``ann_file``, ``metainfo``, ``filter_cfg``,
            ``pipeline``, ``test_mode``, ``backend_args``, ...).
    """

    METAINFO = {
        'classes': ('person', 'helmet', 'vest', 'board', 'wood', 'rebar',
                    'brick', 'scaffold', 'handcart', 'cutter', 'ebox',
                    'hopper', 'hook', 'fence', 'slogan'),
        'palette': [(220, 20, 60), (255, 215, 0), (255, 128, 0), (139, 69, 19),
                    (160, 82, 45), (112, 128, 144), (178, 34, 34),
                    (0, 128, 128), (106, 0, 228), (0, 0, 192), (0, 191, 255),
                    (128, 128, 0), (255, 77, 255), (0, 160, 0), (0, 60, 100)]
    }

    def __init__(self,
                 img_subdir: str = 'JPEGImages',
                 ann_subdir: str = 'Annotations',
                 data_prefix: Optional[dict] = None,
                 on_error: str = 'raise',
                 check_image_exists: bool = True,
                 bbox_tolerance: float = 1.0,
                 **kwargs) -> None:
        if on_error not in ('raise', 'skip'):
            raise ValueError(
                f"on_error={on_error!r} must be 'raise' or 'skip'")
        if bbox_tolerance < 0:
            raise ValueError(f'bbox_tolerance={bbox_tolerance} must be >= 0')
        self.on_error = on_error
        self.check_image_exists = check_image_exists
        self.bbox_tolerance = bbox_tolerance
        # XMLDataset reads `sub_data_root`; give it a default so that it is
        # joined with `data_root` instead of resolving against the cwd.
        data_prefix = dict(data_prefix or {})
        data_prefix.setdefault('sub_data_root', '')
        super().__init__(
            img_subdir=img_subdir,
            ann_subdir=ann_subdir,
            data_prefix=data_prefix,
            **kwargs)

    def load_data_list(self) -> List[dict]:
        """Load the images listed in ``ann_file`` with their checked boxes.

        Returns:
            list[dict]: One data info per image; with ``on_error='skip'``
            malformed images are left out.
        """
        if not self.ann_file or not exists(
                self.ann_file, backend_args=self.backend_args):
            raise FileNotFoundError(
                f'{type(self).__name__}: split file ann_file='
                f'{self.ann_file!r} does not exist (expected e.g. '
                f"'ImageSets/Main/train.txt' under data_root)")
        self._label_of = self._name_to_label()
        self._num_skipped = 0
        self._num_dropped = 0
        # XMLDataset walks the split file and calls `parse_data_info`,
        # which returns None for a skipped image.
        data_list = [
            info for info in super().load_data_list() if info is not None
        ]
        if self._num_skipped:
            print_log(
                f'{type(self).__name__}: skipped {self._num_skipped} '
                f'malformed image(s) of {self.ann_file} (on_error="skip")',
                logger='current',
                level=logging.WARNING)
        if self._num_dropped:
            print_log(
                f'{type(self).__name__}: dropped {self._num_dropped} '
                'object(s) of SODA classes not in metainfo["classes"]',
                logger='current')
        return data_list

    def _name_to_label(self) -> dict:
        """Map trimmed, lower-cased class names to labels.

        A SODA class not in ``metainfo['classes']`` (a subset override) maps
        to None: its objects are dropped. Any other name is unknown.
        """
        label_of = {}
        classes = self._metainfo['classes']
        for label, name in enumerate(classes):
            key = str(name).strip().lower()
            if key in label_of:
                raise ValueError(
                    f'metainfo classes {classes[label_of[key]]!r} and '
                    f'{name!r} are the same name up to case and whitespace')
            label_of[key] = label
        for name in self.METAINFO['classes']:
            label_of.setdefault(name, None)
        return label_of

    def parse_data_info(self, img_info: dict) -> Optional[dict]:
        """Parse and check the XML file of one image.

        Args:
            img_info (dict): ``img_id``, ``file_name`` and ``xml_path``, as
                built by :meth:`XMLDataset.load_data_list`.

        Returns:
            dict | None: The data info, or None when the image is malformed
            and ``on_error='skip'``.
        """
        try:
            return self._parse_checked(img_info)
        except (ValueError, FileNotFoundError) as err:
            if self.on_error == 'raise':
                raise
            warnings.warn(f'{err}; image skipped (on_error="skip")')
            self._num_skipped += 1
            return None

    def _parse_checked(self, img_info: dict) -> dict:
        img_id = img_info['img_id']
        xml_path = img_info['xml_path']
        img_path = osp.join(self.sub_data_root, img_info['file_name'])
        if not exists(xml_path, backend_args=self.backend_args):
            raise FileNotFoundError(
                f'{xml_path}: annotation of image id {img_id!r} (listed in '
                f'{self.ann_file}) does not exist')
        if self.check_image_exists and not exists(
                img_path, backend_args=self.backend_args):
            raise FileNotFoundError(
                f'{img_path}: image of image id {img_id!r} (listed in '
                f'{self.ann_file}) does not exist')
        with get_local_path(
                xml_path, backend_args=self.backend_args) as local_path:
            try:
                raw_ann_info = ET.parse(local_path)
            except ET.ParseError as err:
                raise ValueError(
                    f'{xml_path}: malformed XML of image id {img_id!r} '
                    f'({err})') from err
        width, height = self._image_size(raw_ann_info.getroot(), img_path,
                                         xml_path)
        instances = []
        for index, obj in enumerate(raw_ann_info.findall('object')):
            instance = self._parse_object(obj, index, width, height, xml_path)
            if instance is None:
                self._num_dropped += 1
            else:
                instances.append(instance)
        return dict(
            img_path=img_path,
            img_id=img_id,
            xml_path=xml_path,
            height=height,
            width=width,
            instances=instances)

    def _image_size(self, root: ET.Element, img_path: str,
                    xml_path: str) -> tuple:
        """``(width, height)`` from ``<size>``, else from the image itself.

        Some VOC writers leave ``<size>`` out or write zeros; then the image
        is read, as mmdet does when ``<size>`` is missing.
        """
        size = root.find('size')
        if size is not None:
            where = f'{xml_path}: <size>'
            width = _xml_number(size, 'width', where)
            height = _xml_number(size, 'height', where)
            if width > 0 and height > 0:
                return int(width), int(height)
        try:
            img = mmcv.imfrombytes(
                get(img_path, backend_args=self.backend_args), backend='cv2')
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f'{xml_path}: no usable <size>, and the image {img_path} to '
                'read it from does not exist') from err
        if img is None:
            raise ValueError(f'{xml_path}: no usable <size>, and the image '
                             f'{img_path} cannot be decoded')
        height, width = img.shape[:2]
        return width, height

    def _parse_object(self, obj: ET.Element, index: int, width: int,
                      height: int, xml_path: str) -> Optional[dict]:
        """Check one ``<object>``; None if its class is left out."""
        where = f'{xml_path}: object #{index}'
        name = obj.findtext('name')
        if name is None or not name.strip():
            raise ValueError(f'{where} has no <name>')
        key = name.strip().lower()
        if key not in self._label_of:
            raise ValueError(
                f'{where} has class name {name!r}, which matches none of '
                f'the classes {tuple(self._metainfo["classes"])} (compared '
                'trimmed and case-insensitively); fix the file, or set '
                'metainfo=dict(classes=...) to the names in use')
        label = self._label_of[key]
        if label is None:
            return None
        where = f'{where} ({name.strip()!r})'
        bnd_box = obj.find('bndbox')
        if bnd_box is None:
            raise ValueError(f'{where} has no <bndbox>')
        # as XMLDataset: integer corners, VOC's 1-based pixels minus one
        x1, y1, x2, y2 = (
            int(_xml_number(bnd_box, tag, where)) - 1
            for tag in ('xmin', 'ymin', 'xmax', 'ymax'))
        if x2 <= x1 or y2 <= y1:
            raise ValueError(
                f'{where} has an empty or inverted box '
                f'[{x1 + 1}, {y1 + 1}, {x2 + 1}, {y2 + 1}] (xmin, ymin, '
                'xmax, ymax)')
        tol = self.bbox_tolerance
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise ValueError(
                f'{where} has box [{x1 + 1}, {y1 + 1}, {x2 + 1}, {y2 + 1}] '
                f'(xmin, ymin, xmax, ymax), which leaves the {width}x{height}'
                f' image by more than bbox_tolerance={tol} px')
        bbox = [max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)]

        difficult = obj.findtext('difficult')
        try:
            difficult = int(difficult) if difficult else 0
        except ValueError as err:
            raise ValueError(
                f'{where} has <difficult>{difficult}</difficult>, not an '
                'integer') from err
        ignore = bool(difficult)
        if self.bbox_min_size is not None:
            ignore |= (
                bbox[2] - bbox[0] < self.bbox_min_size
                or bbox[3] - bbox[1] < self.bbox_min_size)
        return dict(bbox=bbox, bbox_label=label, ignore_flag=int(ignore))


def _xml_number(parent: ET.Element, tag: str, where: str) -> float:
    """The finite number in ``<tag>`` of ``parent``, or a ValueError.

    Args:
        parent (Element): The element holding ``<tag>``.
        tag (str): The child tag, e.g. ``'xmin'``.
        where (str): File and entry, for the error message.
    """
    text = parent.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f'{where} has <{tag}>{text}</{tag}>, not a number')
    return value
