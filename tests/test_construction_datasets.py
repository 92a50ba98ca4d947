"""SODA, MOCS and CIS datasets on tiny files in their real layouts."""
import copy
import io
import json
import logging
import os
import os.path as osp

import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.registry import DATASETS, METRICS, DefaultScope
from mmengine.structures import InstanceData

import mmdet.registry  # noqa: F401  (the 'mmdet' scope)
from build_cfgs_datasets import (CIS_FILE_NAMES, MOCS_NAMES, SODA_IMAGES,
                                 SODA_SPLITS, cis_json, mocs_json,
                                 rect_annotation, voc_xml, write_cis,
                                 write_mocs, write_soda)
from conftest import REPO
from local_utils import parsed_config
from mmlocal.datasets import CISDataset, MOCSDataset, SODADataset

CONFIGS = osp.join(REPO, 'configs', '_base_', 'datasets')


def build(cfg):
    with DefaultScope.overwrite_default_scope('mmdet'):
        return DATASETS.build(cfg)


def soda(root, **kwargs):
    return SODADataset(
        data_root=str(root), ann_file='ImageSets/Main/train.txt', **kwargs)


def mocs(root, **kwargs):
    return MOCSDataset(
        data_root=str(root),
        ann_file='instances_train.json',
        data_prefix=dict(img='instances_train/'),
        **kwargs)


def cis(root, **kwargs):
    return CISDataset(
        data_root=str(root),
        ann_file='dataset/annotations/train.json',
        data_prefix=dict(img='train/'),
        **kwargs)


def instances(dataset, idx):
    return dataset.get_data_info(idx)['instances']


def logged(func):
    """Call ``func``; return its result and what it logged via mmengine."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        return func(), stream.getvalue()
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------- SODA


def test_soda_parses_voc_layout(tmp_path):
    write_soda(tmp_path, SODA_IMAGES, SODA_SPLITS)
    dataset = soda(tmp_path)
    classes = dataset.metainfo['classes']
    assert classes == ('person', 'helmet', 'vest', 'board', 'wood', 'rebar',
                       'brick', 'scaffold', 'handcart', 'cutter', 'ebox',
                       'hopper', 'hook', 'fence', 'slogan')
    assert len(dataset.metainfo['palette']) == 15
    assert [dataset.get_data_info(i)['img_id'] for i in range(3)] == \
        SODA_SPLITS['train']
    for idx, (img_id, (width, height,
                       objects)) in enumerate(SODA_IMAGES.items()):
        info = dataset.get_data_info(idx)
        assert info['img_path'] == osp.join(
            str(tmp_path), 'JPEGImages', f'{img_id}.jpg')
        assert (info['width'], info['height']) == (width, height)
        assert len(info['instances']) == len(objects)
        for inst, (name, box, difficult) in zip(info['instances'], objects):
            # labels by name, trimmed and case-insensitively
            assert classes[inst['bbox_label']] == name.strip().lower()
            # VOC's 1-based corners minus one, as mmdet's XMLDataset
            assert inst['bbox'] == [v - 1 for v in box]
            assert inst['ignore_flag'] == difficult


def test_soda_clips_boxes_within_tolerance(tmp_path):
    images = {'a': (40, 30, [('fence', (0, 1, 42, 31), 0)])}
    write_soda(tmp_path, images, {'train': ['a']})
    # xmin 0 -> -1 and xmax 42 -> 41 are within 1 px: clipped
    assert instances(soda(tmp_path), 0)[0]['bbox'] == [0, 0, 40, 30]
    with pytest.raises(
            ValueError,
            match=r'a\.xml: object #0 .*fence.* '
            r'leaves the 40x30 image'):
        soda(tmp_path, bbox_tolerance=0.5)


def test_soda_reads_size_from_image_when_xml_has_none(tmp_path):
    images = {'a': (40, 30, [('hook', (2, 2, 20, 20), 0)])}
    write_soda(
        tmp_path,
        images, {'train': ['a']},
        xml_text={'a': voc_xml('a.jpg', None, images['a'][2])})
    info = soda(tmp_path).get_data_info(0)
    assert (info['width'], info['height']) == (40, 30)


def test_soda_metainfo_subset_drops_other_soda_classes(tmp_path):
    write_soda(tmp_path, SODA_IMAGES, SODA_SPLITS)
    dataset = soda(tmp_path, metainfo=dict(classes=('Helmet', 'person')))
    assert dataset.metainfo['classes'] == ('Helmet', 'person')
    assert [(i['bbox_label'], i['bbox']) for i in instances(dataset, 0)] == \
        [(1, [4, 5, 29, 39]), (0, [9, 5, 19, 13])]
    assert instances(dataset, 1) == []


def _bad_soda(case, root):
    """Write SODA with image '000002' broken as ``case``; return the text
    the error must contain and its type."""
    images = copy.deepcopy(SODA_IMAGES)
    xml_text, no_image = {}, ()
    if case == 'bad_xml':
        xml_text['000002'] = '<annotation><object><name>ebox</name>'
        match, err = r'000002\.xml: malformed XML', ValueError
    elif case == 'box_outside':
        images['000002'][2].append(('fence', (10, 10, 90, 50), 0))
        match = r"000002\.xml: object #2 \('fence'\) has box \[10, 10, 90"
        err = ValueError
    elif case == 'unknown_class':
        images['000002'][2].insert(0, ('bulldozer', (1, 1, 9, 9), 0))
        match = r"000002\.xml: object #0 has class name 'bulldozer'"
        err = ValueError
    elif case == 'inverted_box':
        images['000002'][2][1] = ('slogan', (30, 1, 20, 20), 0)
        match = r"000002\.xml: object #1 \('slogan'\) has an empty or inv"
        err = ValueError
    elif case == 'non_numeric':
        xml_text['000002'] = voc_xml('000002.jpg', (80, 60),
                                     [('ebox', (41, 11, 80, 60), 0)]).replace(
                                         '<xmin>41', '<xmin>4a1')
        match = r"000002\.xml: object #0 \('ebox'\) has <xmin>4a1</xmin>"
        err = ValueError
    elif case == 'missing_image':
        no_image = ('000002', )
        match, err = r"000002\.jpg: image of image id '000002'", \
            FileNotFoundError
    else:  # missing_xml
        match, err = r"000002\.xml: annotation of image id '000002'", \
            FileNotFoundError
    write_soda(root, images, SODA_SPLITS, xml_text, no_image)
    if case == 'missing_xml':
        os.remove(osp.join(root, 'Annotations', '000002.xml'))
    return match, err


@pytest.mark.parametrize('case', [
    'bad_xml', 'box_outside', 'unknown_class', 'inverted_box', 'non_numeric',
    'missing_image', 'missing_xml'
])
def test_soda_malformed_raises_or_skips(tmp_path, case):
    match, err = _bad_soda(case, tmp_path)
    with pytest.raises(err, match=match):
        soda(tmp_path)
    with pytest.warns(UserWarning, match=match):
        dataset = soda(tmp_path, on_error='skip')
    assert [dataset.get_data_info(i)['img_id']
            for i in range(len(dataset))] == ['000001', '000003']


def test_soda_image_check_is_optional(tmp_path):
    write_soda(tmp_path, SODA_IMAGES, SODA_SPLITS, no_image=('000002', ))
    assert len(soda(tmp_path, check_image_exists=False)) == 3


def test_soda_bad_arguments_and_missing_split(tmp_path):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        soda(tmp_path, on_error='ignore', lazy_init=True)
    with pytest.raises(FileNotFoundError, match=r'ImageSets/Main/train\.txt'):
        soda(tmp_path)


# ------------------------------------------------------------------- MOCS


def test_mocs_parses_coco_polygons(tmp_path):
    write_mocs(tmp_path)
    dataset, log = logged(lambda: mocs(tmp_path))
    assert 'classes follow the spelling and order' in log
    # the file's spelling and order (CocoMetric's label -> category order)
    assert dataset.metainfo['classes'] == MOCS_NAMES
    palette = dict(
        zip(MOCSDataset.METAINFO['classes'], MOCSDataset.METAINFO['palette']))
    assert dataset.metainfo['palette'][MOCS_NAMES.index('truck')] == \
        palette['Truck']

    coco = mocs_json()
    name_of = {c['id']: c['name'] for c in coco['categories']}
    assert [dataset.get_data_info(i)['img_id'] for i in range(3)] == [1, 2, 7]
    for idx, img in enumerate(coco['images']):
        info = dataset.get_data_info(idx)
        assert info['img_path'] == osp.join(
            str(tmp_path), 'instances_train', img['file_name'])
        anns = [a for a in coco['annotations'] if a['image_id'] == img['id']]
        assert len(info['instances']) == len(anns)
        for inst, ann in zip(info['instances'], anns):
            x, y, w, h = ann['bbox']
            assert inst['bbox'] == [x, y, x + w, y + h]
            assert MOCS_NAMES[inst['bbox_label']] == name_of[
                ann['category_id']]
            assert inst['mask'] == ann['segmentation']
            assert inst['ignore_flag'] == 0


def test_mocs_categories_must_match_metainfo(tmp_path):
    coco = mocs_json()
    coco['categories'][1]['name'] = 'labourer'  # was 'worker'
    write_mocs(tmp_path, coco)
    with pytest.raises(
            ValueError,
            match=r"instances_train\.json: the classes "
            r"of MOCSDataset\.METAINFO do not match.*"
            r"not in the file \['Worker'\], only in the file "
            r"\['labourer'\]"):
        mocs(tmp_path)
    # a config override may pick any of the file's categories
    dataset = mocs(tmp_path, metainfo=dict(classes=('Truck', 'LABOURER')))
    assert dataset.metainfo['classes'] == ('labourer', 'truck')
    assert [(i['bbox_label'], i['bbox']) for i in instances(dataset, 0)] == \
        [(0, [4, 5, 24, 35]), (1, [30, 10, 60, 40])]
    assert instances(dataset, 1) == []
    with pytest.raises(
            ValueError,
            match=r"classes of metainfo do not match"
            r".*not in the file \['Cranes'\], only in the file "
            r"\[\]"):
        mocs(tmp_path, metainfo=dict(classes=('Crane ', 'Cranes')))


def _bad_coco(case, root):
    """Write MOCS with image id 2 ('b.jpg') broken as ``case``."""
    coco, no_image = mocs_json(), ()
    anns = {a['id']: a for a in coco['annotations']}
    where = r"instances_train\.json: annotation id {} of image id 2 " \
            r"\('b\.jpg'\)"
    err = ValueError
    if case == 'unknown_category':
        anns[3]['category_id'] = 99
        match = where.format(3) + ' has category_id 99, which is not in'
    elif case == 'bbox_outside':
        anns[4]['bbox'] = [50, 20, 35, 40]
        match = where.format(4) + r' has bbox \[50, 20, 35, 40\] .*' \
            r'leaves the 80x60 image'
    elif case == 'short_polygon':
        anns[3]['segmentation'] = [[0, 0, 40, 0, 40, 30, 0, 30], [1, 1, 5, 5]]
        match = where.format(3) + ': segmentation polygon #1 has 4 coord'
    elif case == 'no_segmentation':
        del anns[4]['segmentation']
        match = where.format(4) + ' has no segmentation'
    elif case == 'zero_area':
        anns[4]['area'] = 0
        match = where.format(4) + ' has area=0'
    elif case == 'bad_size':
        coco['images'][1]['width'] = 0
        match = r"image id 2 \('b\.jpg'\) has width=0"
    else:  # missing_image
        no_image = ('b.jpg', )
        match = r"image id 2 \('b\.jpg'\): the image .*instances_train/b\.jpg"
        err = FileNotFoundError
    write_mocs(root, no_image=no_image)  # the images of the good file
    with open(osp.join(root, 'instances_train.json'), 'w') as f:
        json.dump(coco, f)
    return match, err


@pytest.mark.parametrize('case', [
    'unknown_category', 'bbox_outside', 'short_polygon', 'no_segmentation',
    'zero_area', 'bad_size', 'missing_image'
])
def test_coco_malformed_raises_or_skips(tmp_path, case):
    match, err = _bad_coco(case, tmp_path)
    with pytest.raises(err, match=match):
        mocs(tmp_path)
    with pytest.warns(UserWarning, match=match):
        dataset = mocs(tmp_path, on_error='skip')
    assert [dataset.get_data_info(i)['img_id']
            for i in range(len(dataset))] == [1, 7]


def test_coco_orphan_annotation_and_file_errors(tmp_path):
    coco = mocs_json()
    coco['annotations'].append(rect_annotation(9, 99, 12, 0, 0, 5, 5))
    write_mocs(tmp_path, coco)
    match = r'annotation id 9 refers to image id 99, which is not in'
    with pytest.raises(ValueError, match=match):
        mocs(tmp_path)
    with pytest.warns(UserWarning, match=match):
        assert len(mocs(tmp_path, on_error='skip')) == 3

    coco['annotations'][-1]['id'] = 1
    coco['annotations'][-1]['image_id'] = 7
    write_mocs(tmp_path, coco)
    with pytest.raises(ValueError, match='annotation id 1 appears more'):
        mocs(tmp_path, on_error='skip')

    with open(osp.join(tmp_path, 'instances_train.json'), 'w') as f:
        f.write('{"images": [')
    with pytest.raises(
            ValueError, match=r'instances_train\.json: not a '
            'valid json'):
        mocs(tmp_path, on_error='skip')
    os.remove(osp.join(tmp_path, 'instances_train.json'))
    with pytest.raises(FileNotFoundError, match=r'instances_train\.json'):
        mocs(tmp_path, on_error='skip')


def test_coco_clips_within_tolerance_and_image_check_optional(tmp_path):
    coco = mocs_json()
    coco['annotations'][2]['bbox'] = [-0.5, 0, 40.5, 30.75]  # image 80x60
    write_mocs(tmp_path, coco, no_image=('c.jpg', ))
    with pytest.raises(FileNotFoundError, match=r'c\.jpg'):
        mocs(tmp_path)
    dataset = mocs(tmp_path, check_image_exists=False)
    assert instances(dataset, 1)[0]['bbox'] == [0, 0, 40.0, 30.75]


# -------------------------------------------------------------------- CIS


def test_cis_reads_the_release_layout_with_ids_from_0(tmp_path):
    write_cis(tmp_path)
    dataset, log = logged(lambda: cis(tmp_path))
    # the ten public classes, in the file's spelling and order
    assert set(CISDataset.METAINFO['classes']) == set(CIS_FILE_NAMES)
    assert dataset.metainfo['classes'] == CIS_FILE_NAMES
    assert 'classes follow the spelling and order' in log
    palette = dict(
        zip(CISDataset.METAINFO['classes'], CISDataset.METAINFO['palette']))
    assert [dataset.metainfo['palette'][i] for i in range(10)] == \
        [palette[name] for name in CIS_FILE_NAMES]
    # image, category and annotation ids from 0 are read as they are
    assert [dataset.get_data_info(i)['img_id'] for i in range(2)] == [0, 1]
    assert dataset.get_data_info(0)['img_path'] == osp.join(
        str(tmp_path), 'train', 'cis_0.jpg')
    assert [(i['bbox_label'], i['bbox']) for i in instances(dataset, 0)] == \
        [(1, [2, 2, 32, 22]), (0, [40, 30, 60, 60])]
    assert [i['bbox_label'] for i in instances(dataset, 1)] == [9]
    assert dataset.cat_ids == list(range(10))
    # lazily built: the order is read when metainfo is asked for
    lazy = cis(tmp_path, lazy_init=True)
    assert lazy.metainfo['classes'] == CIS_FILE_NAMES


def test_cis_categories_are_checked_against_the_public_list(tmp_path):
    coco = cis_json()
    coco['categories'][9]['name'] = 'loader'  # was 'wheel-loader'
    write_cis(tmp_path, coco)
    with pytest.raises(
            ValueError,
            match=r"dataset/annotations/train\.json: the classes of "
            r"CISDataset\.METAINFO do not match.*not in the file "
            r"\['wheel-loader'\], only in the file \['loader'\]"):
        cis(tmp_path)
    # a config may pick any subset of the file's categories
    dataset = cis(tmp_path, metainfo=dict(classes=(' LOADER', 'excavator')))
    assert dataset.metainfo['classes'] == ('excavator', 'loader')
    assert [i['bbox_label'] for i in instances(dataset, 0)] == [0]
    assert [i['bbox_label'] for i in instances(dataset, 1)] == [1]
    coco['categories'][9]['name'] = 'Excavator '
    write_cis(tmp_path, coco)
    with pytest.raises(
            ValueError,
            match=r"categories 'excavator' and 'Excavator ' "
            'are the same name'):
        cis(tmp_path)


def test_cis_bad_file_fails_early_naming_the_file(tmp_path):
    coco = cis_json()
    coco['annotations'][2]['category_id'] = 10
    write_cis(tmp_path, coco)
    with pytest.raises(
            ValueError,
            match=r"dataset/annotations/train\.json: annotation id 2 of "
            r"image id 1 \('cis_1\.jpg'\) has category_id 10, which is "
            r"not in \"categories\""):
        cis(tmp_path)
    with open(osp.join(tmp_path, 'dataset', 'annotations', 'train.json'),
              'w') as f:
        f.write('{"images": [')
    with pytest.raises(ValueError,
                       match=r'dataset/annotations/train\.json: not a valid'):
        cis(tmp_path, lazy_init=True).full_init()


def test_cis_annotation_id_0_fails_when_pycocotools_reads_the_file(
        tmp_path):
    write_cis(tmp_path)
    # test_mode: by default a metric is assumed to read the file
    with pytest.raises(
            ValueError,
            match=r"train\.json: annotation id 0 of image id 0 "
            r"\('cis_0\.jpg'\): pycocotools' COCOeval reads annotation id "
            r'0 as "unmatched"'):
        cis(tmp_path, test_mode=True)
    assert len(cis(tmp_path, test_mode=True,
                   metric_reads_ann_file=False)) == 2
    coco = cis_json()
    del coco['annotations'][2]['iscrowd']
    for ann in coco['annotations']:
        ann['id'] += 1
    write_cis(tmp_path, coco)
    with pytest.raises(ValueError, match=r'annotation id 3 .* no "iscrowd"'):
        cis(tmp_path, metric_reads_ann_file=True)
    with pytest.raises(ValueError, match='metric_reads_ann_file=1'):
        cis(tmp_path, metric_reads_ann_file=1)


def test_pycocotools_counts_a_match_to_annotation_id_0_as_a_miss(tmp_path):
    """Why the CIS configs evaluate from the dataset, not from ann_file."""
    write_cis(tmp_path, split='val')
    val_cfg, _ = _dataset_cfg('cis_instance.py', 'val', tmp_path)
    dataset = build(val_cfg)
    metric = dict(type='CocoMetric', metric='bbox')
    from_file = _perfect_scores(
        dataset, dict(metric, ann_file='x'),
        osp.join(tmp_path, 'dataset', 'annotations', 'val.json'))
    assert from_file['coco/bbox_mAP'] < 0.9  # perfect boxes, one "missed"
    assert _perfect_scores(dataset, metric)['coco/bbox_mAP'] == \
        pytest.approx(1.0)
    # image and category ids from 0 are fine; only annotation id 0 is not
    coco = cis_json()
    for ann in coco['annotations']:
        ann['id'] += 1
    write_cis(tmp_path, coco, split='val')
    renumbered = _perfect_scores(
        build(val_cfg), dict(metric, ann_file='x'),
        osp.join(tmp_path, 'dataset', 'annotations', 'val.json'))
    assert renumbered['coco/bbox_mAP'] == pytest.approx(1.0)


# ------------------------------------- base configs: pipelines and metrics


def _dataset_cfg(config, split, data_root):
    cfg = parsed_config(osp.join(CONFIGS, config))
    dataset = copy.deepcopy(cfg[f'{split}_dataloader']['dataset'])
    dataset['data_root'] = str(data_root)
    evaluator = cfg[f'{split}_evaluator'] if split != 'train' else None
    return dataset, evaluator


def _perfect_scores(dataset, evaluator_cfg, ann_file=None):
    """Evaluate predictions equal to the ground truth with the config's
    metrics; return the merged metric dict."""
    cfgs = evaluator_cfg if isinstance(evaluator_cfg,
                                       list) else [evaluator_cfg]
    metrics = []
    for cfg in cfgs:
        cfg = copy.deepcopy(cfg)
        if cfg.get('ann_file'):
            cfg['ann_file'] = ann_file
        with DefaultScope.overwrite_default_scope('mmdet'):
            metric = METRICS.build(cfg)
        metric.dataset_meta = dataset.metainfo
        metrics.append(metric)
    for idx in range(len(dataset)):
        sample = dataset[idx]['data_samples']
        gt = sample.gt_instances
        pred = InstanceData(
            bboxes=gt.bboxes.tensor,
            labels=gt.labels,
            scores=torch.ones(len(gt)))
        if 'masks' in gt:
            pred.masks = torch.from_numpy(gt.masks.masks).bool()
        sample.pred_instances = pred
        for metric in metrics:
            metric.process({}, [sample.to_dict()])
    scores = {}
    for metric in metrics:
        scores.update(metric.evaluate(len(dataset)))
    return scores


def test_soda_config_pipeline_and_metrics(tmp_path):
    write_soda(tmp_path, SODA_IMAGES, SODA_SPLITS)
    train_cfg, _ = _dataset_cfg('soda_detection.py', 'train', tmp_path)
    train = build(train_cfg)
    assert type(train) is SODADataset
    data = train[0]
    assert data['inputs'].shape[0] == 3
    gt = data['data_samples'].gt_instances
    assert gt.labels.tolist() == [0, 1]  # the difficult vest is ignored
    assert data['data_samples'].ignored_instances.labels.tolist() == [2]

    val_cfg, evaluator = _dataset_cfg('soda_detection.py', 'val', tmp_path)
    scores = _perfect_scores(build(val_cfg), evaluator)
    assert scores['pascal_voc/mAP'] == pytest.approx(1.0)
    assert scores['coco/bbox_mAP'] == pytest.approx(1.0)


def test_mocs_config_pipeline_and_metrics(tmp_path):
    write_mocs(tmp_path, split='train')
    write_mocs(tmp_path, split='val')
    train_cfg, _ = _dataset_cfg('mocs_instance.py', 'train', tmp_path)
    data = build(train_cfg)[0]
    gt = data['data_samples'].gt_instances
    assert len(gt.masks) == len(gt.bboxes) == 2
    assert gt.masks.masks.shape[1:] == data['inputs'].shape[1:]

    val_cfg, evaluator = _dataset_cfg('mocs_instance.py', 'val', tmp_path)
    scores = _perfect_scores(
        build(val_cfg), evaluator, osp.join(tmp_path, 'instances_val.json'))
    assert scores['coco/bbox_mAP'] == pytest.approx(1.0)
    assert scores['coco/segm_mAP'] == pytest.approx(1.0)

    det_cfg, det_evaluator = _dataset_cfg('mocs_detection.py', 'val', tmp_path)
    assert det_evaluator['metric'] == 'bbox'
    assert 'masks' not in build(det_cfg)[0]['data_samples'].gt_instances


def test_cis_config_pipeline_and_metrics(tmp_path):
    for split in ('train', 'val', 'test'):
        write_cis(tmp_path, split=split)
    train_cfg, _ = _dataset_cfg('cis_instance.py', 'train', tmp_path)
    gt = build(train_cfg)[0]['data_samples'].gt_instances
    assert len(gt.masks) == len(gt.bboxes) == 2
    for split in ('val', 'test'):
        cfg, evaluator = _dataset_cfg('cis_instance.py', split, tmp_path)
        assert cfg['ann_file'] == f'dataset/annotations/{split}.json'
        assert 'ann_file' not in evaluator  # ids from 0: see above
        dataset = build(cfg)
        assert type(dataset) is CISDataset
        scores = _perfect_scores(dataset, evaluator)
        assert scores['coco/bbox_mAP'] == pytest.approx(1.0)
        assert scores['coco/segm_mAP'] == pytest.approx(1.0)
    cfg, evaluator = _dataset_cfg('yolov8_cis_detection.py', 'test',
                                  tmp_path)
    assert 'ann_file' not in evaluator
    scores = _perfect_scores(build(cfg), evaluator)
    assert scores['coco/bbox_mAP'] == pytest.approx(1.0)


def test_json_written_is_what_coco_expects(tmp_path):
    """The fixtures are genuine COCO: pycocotools indexes them."""
    from pycocotools.coco import COCO
    write_mocs(tmp_path)
    coco = COCO(osp.join(tmp_path, 'instances_train.json'))
    assert len(coco.getAnnIds()) == len(mocs_json()['annotations'])
    assert coco.getCatIds(catNms=['worker']) == [12]
    assert coco.annToMask(coco.loadAnns([2])[0]).sum() > 0


def test_check_dataset_tool_lists_all_problems(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'check_dataset', osp.join(REPO, 'tools', 'data', 'check_dataset.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    images = copy.deepcopy(SODA_IMAGES)
    images['000002'][2].insert(0, ('bulldozer', (1, 1, 9, 9), 0))
    images['000003'][2].append(('fence', (1, 1, 90, 9), 0))
    write_soda(tmp_path, images, dict(SODA_SPLITS, test=['000001']))
    argv = [
        osp.join(CONFIGS, 'soda_detection.py'), '--data-root', f'{tmp_path}/'
    ]
    assert tool.main(argv) == 1
    out = capsys.readouterr().out
    assert 'train: SODADataset' in out
    assert '1 images loaded, 2 malformed' in out
    assert "000002.xml: object #0 has class name 'bulldozer'" in out
    assert "000003.xml: object #1 ('fence') has box" in out
    assert 'test: SODADataset' in out and '1 images loaded, 0 malformed' in out

    write_soda(tmp_path, SODA_IMAGES, SODA_SPLITS)
    assert tool.main(argv + ['--splits', 'train', 'val']) == 0
    os.remove(osp.join(tmp_path, 'ImageSets', 'Main', 'test.txt'))
    assert tool.main(argv + ['--splits', 'test']) == 1  # no test.txt
    assert 'cannot be loaded' in capsys.readouterr().out
