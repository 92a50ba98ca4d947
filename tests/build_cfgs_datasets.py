"""Minimal build arguments of mmlocal's datasets, and tiny files in the real
layouts of SODA (Pascal VOC), MOCS and CIS (COCO json) to build them from.

The writers are shared with ``test_construction_datasets.py``.
"""
import atexit
import functools
import json
import os
import os.path as osp
import shutil
import tempfile

import cv2
import numpy as np

# ---------------------------------------------------------------- writers


def write_image(path, width, height, seed=0):
    """A small random jpg/png of ``width`` x ``height``."""
    os.makedirs(osp.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(path, img), path


def voc_xml(filename, size, objects):
    """A Pascal VOC annotation as LabelImg writes it.

    Args:
        filename (str): ``<filename>``.
        size (tuple | None): ``(width, height)``; None leaves ``<size>`` out.
        objects (list): ``(name, (xmin, ymin, xmax, ymax), difficult)``
            tuples, 1-based VOC corners.
    """
    lines = [
        '<annotation>', '  <folder>JPEGImages</folder>',
        f'  <filename>{filename}</filename>'
    ]
    if size is not None:
        lines += [
            '  <size>', f'    <width>{size[0]}</width>',
            f'    <height>{size[1]}</height>', '    <depth>3</depth>',
            '  </size>'
        ]
    for name, (x1, y1, x2, y2), difficult in objects:
        lines += [
            '  <object>', f'    <name>{name}</name>',
            '    <pose>Unspecified</pose>', '    <truncated>0</truncated>',
            f'    <difficult>{difficult}</difficult>', '    <bndbox>',
            f'      <xmin>{x1}</xmin>', f'      <ymin>{y1}</ymin>',
            f'      <xmax>{x2}</xmax>', f'      <ymax>{y2}</ymax>',
            '    </bndbox>', '  </object>'
        ]
    lines.append('</annotation>')
    return '\n'.join(lines) + '\n'


def write_soda(root, images, splits, xml_text=None, no_image=()):
    """Write a SODA release layout under ``root``.

    Args:
        root (str): The data root.
        images (dict): ``id -> (width, height, objects)``, objects as in
            :func:`voc_xml`; the XML has the same size unless listed in
            ``xml_text``.
        splits (dict): ``split name -> ids`` for ``ImageSets/Main``.
        xml_text (dict, optional): ``id -> raw XML text`` overrides.
        no_image (tuple): Ids written without a jpg.
    """
    xml_text = xml_text or {}
    os.makedirs(osp.join(root, 'Annotations'), exist_ok=True)
    os.makedirs(osp.join(root, 'ImageSets', 'Main'), exist_ok=True)
    for seed, (img_id, (width, height, objects)) in enumerate(images.items()):
        if img_id not in no_image:
            write_image(
                osp.join(root, 'JPEGImages', f'{img_id}.jpg'), width, height,
                seed)
        text = xml_text.get(img_id) or voc_xml(f'{img_id}.jpg',
                                               (width, height), objects)
        with open(osp.join(root, 'Annotations', f'{img_id}.xml'), 'w') as f:
            f.write(text)
    for split, ids in splits.items():
        with open(osp.join(root, 'ImageSets', 'Main', f'{split}.txt'),
                  'w') as f:
            f.write(''.join(f'{i}\n' for i in ids))


def write_coco(root, ann_file, img_dir, coco, no_image=()):
    """Write a COCO json and its images (sizes from ``coco['images']``).

    Args:
        root (str): The data root.
        ann_file (str): Json path relative to ``root``.
        img_dir (str): Image folder relative to ``root``.
        coco (dict): The json content.
        no_image (tuple): ``file_name`` s left without an image.
    """
    os.makedirs(osp.dirname(osp.join(root, ann_file)), exist_ok=True)
    with open(osp.join(root, ann_file), 'w') as f:
        json.dump(coco, f)
    for seed, img in enumerate(coco.get('images', [])):
        if img['file_name'] not in no_image:
            write_image(
                osp.join(root, img_dir, img['file_name']), img['width'],
                img['height'], seed)


def rect_annotation(ann_id, image_id, category_id, x, y, w, h, **extra):
    """A COCO annotation whose polygon is its box (a rectangle)."""
    ann = dict(
        id=ann_id,
        image_id=image_id,
        category_id=category_id,
        bbox=[x, y, w, h],
        area=float(w * h),
        iscrowd=0,
        segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
    ann.update(extra)
    return ann


# ----------------------------------------------------------- tiny samples

# SODA: names in mixed case and padded, as the release might spell them
SODA_IMAGES = {
    '000001': (64, 48, [('Person', (5, 6, 30, 40), 0),
                        (' HELMET ', (10, 6, 20, 14), 0),
                        ('vest', (8, 16, 28, 30), 1)]),
    '000002': (80, 60, [('ebox', (41, 11, 80, 60), 0),
                        ('Slogan', (1, 1, 40, 20), 0)]),
    '000003': (50, 50, [('rebar', (3, 3, 45, 21), 0)]),
}
SODA_SPLITS = {
    'train': ['000001', '000002', '000003'],
    'val': ['000001', '000002', '000003']
}

# MOCS: lower-case names in an order that is not the paper's
MOCS_NAMES = ('other vehicle', 'worker', 'static crane', 'hanging head',
              'crane', 'roller', 'bulldozer', 'excavator', 'truck', 'loader',
              'pump truck', 'concrete mixer', 'pile driving')


def mocs_json():
    """Three images, categories with ids 11..23 in the order of MOCS_NAMES."""
    categories = [
        dict(id=11 + i, name=name, supercategory='object')
        for i, name in enumerate(MOCS_NAMES)
    ]
    images = [
        dict(id=1, file_name='a.jpg', width=64, height=48),
        dict(id=2, file_name='b.jpg', width=80, height=60),
        dict(id=7, file_name='c.jpg', width=48, height=48)
    ]
    annotations = [
        rect_annotation(1, 1, 12, 4, 5, 20, 30),  # worker
        dict(
            rect_annotation(2, 1, 19, 30, 10, 30, 30),  # truck, triangle
            segmentation=[[30, 10, 60, 10, 45, 40]],
            area=450.0),
        rect_annotation(3, 2, 11, 0, 0, 40, 30),  # other vehicle
        rect_annotation(4, 2, 13, 50, 20, 30, 40),  # static crane
        rect_annotation(5, 7, 12, 10, 10, 20, 20),  # worker
    ]
    return dict(images=images, categories=categories, annotations=annotations)


# CIS: the release's names (XZ-YAN/CIS-Dataset); the file's order is not
# the documented one, and category, image and annotation ids start at 0
CIS_FILE_NAMES = ('excavator', 'people-helmet', 'people-no-helmet', 'PC',
                  'PC-truck', 'dump-truck', 'mixer', 'roller', 'dozer',
                  'wheel-loader')


def cis_json():
    """Two images (ids 0, 1), the ten CIS categories with ids 0..9 in the
    order of CIS_FILE_NAMES, annotation ids from 0."""
    categories = [dict(id=i, name=name, supercategory='construction')
                  for i, name in enumerate(CIS_FILE_NAMES)]
    images = [
        dict(id=0, file_name='cis_0.jpg', width=64, height=64),
        dict(id=1, file_name='cis_1.jpg', width=32, height=40)
    ]
    annotations = [
        rect_annotation(0, 0, 1, 2, 2, 30, 20),  # people-helmet
        rect_annotation(1, 0, 0, 40, 30, 20, 30),  # excavator
        rect_annotation(2, 1, 9, 4, 4, 20, 30)  # wheel-loader
    ]
    return dict(images=images, categories=categories, annotations=annotations)


def write_mocs(root, coco=None, split='train', no_image=()):
    write_coco(root, f'instances_{split}.json', f'instances_{split}', coco
               or mocs_json(), no_image)


def write_cis(root, coco=None, split='train', no_image=()):
    """The release's layout (after CIS_decoder.py): the json under
    dataset/annotations/, the images in <split>/."""
    write_coco(root, f'dataset/annotations/{split}.json', split, coco
               or cis_json(), no_image)


@functools.lru_cache(maxsize=None)
def tiny_data_root():
    """One temporary folder with SODA/, MOCS/ and CIS/ for the whole run."""
    root = tempfile.mkdtemp(prefix='mmlocal_datasets_')
    atexit.register(shutil.rmtree, root, True)
    write_soda(osp.join(root, 'SODA'), SODA_IMAGES, SODA_SPLITS)
    write_mocs(osp.join(root, 'MOCS'))
    write_cis(osp.join(root, 'CIS'))
    return root


BUILD_CFGS = {
    ('DATASETS', 'SODADataset'):
    lambda: dict(
        data_root=osp.join(tiny_data_root(), 'SODA'),
        ann_file='ImageSets/Main/train.txt'),
    ('DATASETS', 'MOCSDataset'):
    lambda: dict(
        data_root=osp.join(tiny_data_root(), 'MOCS'),
        ann_file='instances_train.json',
        data_prefix=dict(img='instances_train/')),
    ('DATASETS', 'CISDataset'):
    lambda: dict(
        data_root=osp.join(tiny_data_root(), 'CIS'),
        ann_file='dataset/annotations/train.json',
        data_prefix=dict(img='train/')),
}
