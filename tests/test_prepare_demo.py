# Copyright (c) mmlocal contributors. All rights reserved.
"""Tests of ``tools/data/prepare_demo.py`` (the deepforest demo dataset).

The tests that need the real ``deepforest==2.1.0`` wheel get it once per
session through the script's own download function, cached in
``<repo>/data/cache`` (shared with ``tools/demo.sh``); they are skipped with
a reason when it cannot be downloaded. Everything else uses a small synthetic
wheel-like zip built in ``tmp_path`` and runs offline.
"""
import importlib.util
import io
import json
import math
import os
import os.path as osp
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'data' / 'prepare_demo.py'
CACHE = REPO / 'data' / 'cache'
PREFIX = 'deepforest/data/'


def _import_script():
    name = 'mmlocal_tools_prepare_demo'
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pdemo = _import_script()


def _quiet(_msg):
    pass


# --------------------------------------------------------------------------
# helpers (independent of the script's own parsing / tiling code)
# --------------------------------------------------------------------------
def _voc_boxes(xml_bytes):
    root = ET.fromstring(xml_bytes)
    boxes, labels = [], []
    for obj in root.iter('object'):
        bb = obj.find('bndbox')
        boxes.append([float(bb.find(k).text)
                      for k in ('xmin', 'ymin', 'xmax', 'ymax')])
        labels.append(obj.find('name').text.strip())
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def _edges(length, tile):
    n = max(1, int(math.floor(length / tile + 0.5)))
    return [int(math.floor(i * length / n + 0.5)) for i in range(n + 1)]


def _voc_xml(filename, size, objects):
    """Minimal VOC XML; ``objects`` is a list of (name, x1, y1, x2, y2)."""
    objs = ''.join(
        f'<object><name>{n}</name><pose>Unspecified</pose>'
        f'<truncated>0</truncated><difficult>0</difficult><bndbox>'
        f'<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>'
        f'<ymax>{y2}</ymax></bndbox></object>'
        for n, x1, y1, x2, y2 in objects)
    return (f'<annotation><folder>data</folder><filename>{filename}'
            f'</filename><size><width>{size[0]}</width><height>{size[1]}'
            f'</height><depth>3</depth></size>{objs}</annotation>').encode()


def _png_bytes(size, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def _random_boxes(rng, size, n, names):
    objs = []
    for _ in range(n):
        w, h = rng.integers(10, 60, 2)
        x1 = int(rng.integers(0, size[0] - w))
        y1 = int(rng.integers(0, size[1] - h))
        objs.append((names[int(rng.integers(len(names)))], x1, y1,
                     x1 + int(w), y1 + int(h)))
    return objs


FAKE_SOURCES = (('x.png', 'x.xml'), ('y.png', 'y.xml'), ('z.png', 'z.xml'))


def _make_fake_wheel(path, skip=(), bad_xml=(), bad_png=()):
    """A wheel-like zip laid out like deepforest's ``deepforest/data/``.

    ``x`` is 700x500 (tiled 2x2 at tile 320), ``y`` and ``z`` are small
    images kept whole. Names in ``skip`` are left out; names in ``bad_xml``
    get a truncated XML file, names in ``bad_png`` a file that is no image.
    """
    rng = np.random.default_rng(1)
    sizes = dict(x=(700, 500), y=(200, 180), z=(250, 240))
    files = {}
    for stem, size in sizes.items():
        objs = _random_boxes(rng, size, 25 if stem == 'x' else 6,
                             ['Tree', 'Dead'] if stem == 'x' else ['Tree'])
        if stem == 'x':  # boxes across the tile borders (x=350, y=250)
            objs += [('Tree', 330, 40, 380, 80), ('Dead', 340, 240, 372,
                                                  262),
                     ('Tree', 100, 100, 100, 140)]  # degenerate
        files[f'{stem}.png'] = _png_bytes(size, seed=len(stem) + size[0])
        files[f'{stem}.xml'] = _voc_xml(f'{stem}.tif', size, objs)
    for name in bad_xml:
        files[name] = files[name][:-30]
    for name in bad_png:
        files[name] = b'not a png'
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('deepforest/__init__.py', '')
        for name, data in files.items():
            if name not in skip:
                zf.writestr(PREFIX + name, data)
    return str(path)


def _check_dataset(out_dir, meta, wheel_path, min_visible):
    """Check a prepared dataset against the wheel it was made from."""
    out_dir = Path(out_dir)
    cocos = {
        s: json.loads((out_dir / 'annotations' /
                       f'instances_{s}.json').read_text())
        for s in ('train', 'val')
    }
    on_disk = json.loads((out_dir / 'meta.json').read_text())
    assert on_disk == meta
    # valid, consistent COCO
    assert cocos['train']['categories'] == cocos['val']['categories']
    cat_names = {c['id']: c['name'] for c in cocos['train']['categories']}
    assert [c['name'] for c in meta['categories']] == list(
        cat_names.values())
    images = {}
    ann_ids = set()
    for split, coco in cocos.items():
        for img in coco['images']:
            assert set(img) >= {'id', 'file_name', 'width', 'height'}
            assert img['id'] not in images
            images[img['id']] = (split, img)
        for ann in coco['annotations']:
            assert ann['id'] not in ann_ids
            ann_ids.add(ann['id'])
            assert images[ann['image_id']][0] == split
            assert ann['category_id'] in cat_names
            assert ann['iscrowd'] == 0
            x, y, w, h = ann['bbox']
            assert w > 0 and h > 0
            assert ann['area'] == pytest.approx(w * h)
    assert len({i['file_name'] for _, i in images.values()}) == len(images)
    assert len(meta['tiles']) == len(images)

    anns_by_image = {}
    for coco in cocos.values():
        for ann in coco['annotations']:
            anns_by_image.setdefault(ann['image_id'], []).append(ann)

    with zipfile.ZipFile(wheel_path) as zf:
        sources = {}
        for rec in meta['tiles']:
            src = rec['source']
            if src not in sources:
                boxes, labels = _voc_boxes(zf.read(rec['source_xml']))
                with Image.open(io.BytesIO(zf.read(src))) as im:
                    pixels = np.asarray(im.convert('RGB'))
                sources[src] = (boxes, labels, pixels)
            boxes, labels, pixels = sources[src]
            split, img = images[rec['image_id']]
            assert split == rec['split']
            assert img['file_name'] == rec['file_name']
            ox, oy = rec['offset']
            tw, th = rec['size']
            assert (img['width'], img['height']) == (tw, th)

            # pixels: the tile is the crop of the source at its offset
            with Image.open(out_dir / 'images' / rec['file_name']) as im:
                tile_px = np.asarray(im.convert('RGB'))
            np.testing.assert_array_equal(tile_px,
                                          pixels[oy:oy + th, ox:ox + tw])

            # every output box, shifted back, is a (clipped) source box
            anns = anns_by_image.get(rec['image_id'], [])
            assert len(anns) == rec['num_boxes'] > 0
            src_area = ((boxes[:, 2] - boxes[:, 0]) *
                        (boxes[:, 3] - boxes[:, 1]))
            clipped = np.stack([
                np.clip(boxes[:, 0], ox, ox + tw),
                np.clip(boxes[:, 1], oy, oy + th),
                np.clip(boxes[:, 2], ox, ox + tw),
                np.clip(boxes[:, 3], oy, oy + th)
            ], 1)
            for ann in anns:
                x, y, w, h = ann['bbox']
                back = np.array([x + ox, y + oy, x + w + ox, y + h + oy])
                hits = np.nonzero(
                    np.all(np.abs(clipped - back) < 1e-6, axis=1))[0]
                assert len(hits) >= 1, (rec['file_name'], ann['bbox'])
                ok = [
                    i for i in hits
                    if labels[i] == cat_names[ann['category_id']]
                    and w * h >= min_visible * src_area[i] - 1e-6
                ]
                assert ok, (rec['file_name'], ann['bbox'])

            # every source box fully inside the tile appears exactly once
            inside = np.nonzero((boxes[:, 0] >= ox) & (boxes[:, 1] >= oy)
                                & (boxes[:, 2] <= ox + tw)
                                & (boxes[:, 3] <= oy + th)
                                & (boxes[:, 2] > boxes[:, 0])
                                & (boxes[:, 3] > boxes[:, 1]))[0]
            got = [
                np.array(a['bbox']) + [ox, oy, 0, 0] for a in anns
            ]
            for i in inside:
                xywh = np.array([
                    boxes[i, 0], boxes[i, 1], boxes[i, 2] - boxes[i, 0],
                    boxes[i, 3] - boxes[i, 1]
                ])
                n = sum(np.all(np.abs(g - xywh) < 1e-6) for g in got)
                assert n == 1, (rec['file_name'], boxes[i])
    return cocos


def _check_regions(meta):
    """Val tiles of a tiled source form its held-out band, train the rest."""
    for src in meta['sources']:
        tiles = [t for t in meta['tiles'] if t['source'] == src['image']]
        if src['grid'] == [1, 1]:
            assert src['val_band'] is None
            continue
        axis, start, stop = src['val_band']
        k = 0 if axis == 'row' else 1
        assert 0 <= start < stop <= src['grid'][k]
        for t in tiles:
            in_band = start <= t['grid_index'][k] < stop
            assert (t['split'] == 'val') == in_band


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope='session')
def real_wheel():
    """The deepforest wheel, downloaded once into <repo>/data/cache."""
    try:
        return pdemo.download_wheel(str(CACHE))
    except pdemo.PrepareError as err:
        pytest.skip(f'real deepforest wheel unavailable (offline?): {err}')


@pytest.fixture(scope='session')
def real_demo(real_wheel, tmp_path_factory):
    out = tmp_path_factory.mktemp('demo_real')
    meta = pdemo.build_dataset(real_wheel, str(out), log=_quiet)
    return out, meta


@pytest.fixture
def fake_wheel(tmp_path):
    return _make_fake_wheel(tmp_path / 'deepforest-0.0-py3-none-any.whl')


# --------------------------------------------------------------------------
# unit tests: grid and box tiling
# --------------------------------------------------------------------------
def test_grid_edges():
    assert pdemo.grid_edges(400, 320) == [0, 400]  # kept whole
    assert pdemo.grid_edges(320, 320) == [0, 320]
    assert pdemo.grid_edges(100, 320) == [0, 100]
    assert pdemo.grid_edges(480, 320) == [0, 240, 480]
    for length in (2299, 2472, 1249, 1035, 641, 999):
        edges = pdemo.grid_edges(length, 320)
        assert edges == _edges(length, 320)
        assert edges[0] == 0 and edges[-1] == length
        sizes = np.diff(edges)
        assert sizes.max() - sizes.min() <= 1
        assert 0.75 * 320 <= sizes.min() and sizes.max() <= 1.5 * 320


def test_tile_boxes_synthetic():
    boxes = np.array([
        [10, 10, 50, 50],  # 0: fully inside tile 0
        [290, 100, 330, 140],  # 1: 75% in tile 0, 25% in tile 1
        [310, 200, 350, 240],  # 2: 25% in tile 0, 75% in tile 1
        [300, 10, 340, 50],  # 3: exactly 50/50 -> kept in both
        [100, 100, 100, 150],  # 4: zero width
        [60, 80, 40, 90],  # 5: negative width
        [700, 10, 720, 30],  # 6: outside the image
        [630, 300, 650, 330],  # 7: 25% visible in the image only
    ], dtype=float)
    tiles = pdemo.tile_boxes(boxes, (640, 320), 320, 0.5)
    assert [(t['x'], t['y'], t['width'], t['height']) for t in tiles] == [
        (0, 0, 320, 320), (320, 0, 320, 320)
    ]
    t0, t1 = tiles
    assert t0['indices'].tolist() == [0, 1, 3]
    np.testing.assert_allclose(
        t0['boxes'], [[10, 10, 50, 50], [290, 100, 320, 140],
                      [300, 10, 320, 50]])
    assert t1['indices'].tolist() == [2, 3]
    np.testing.assert_allclose(t1['boxes'],
                               [[0, 200, 30, 240], [0, 10, 20, 50]])

    # a stricter threshold keeps only fully visible boxes
    strict = pdemo.tile_boxes(boxes, (640, 320), 320, 1.0)
    assert [t['indices'].tolist() for t in strict] == [[0]]
    # empty tiles are dropped unless asked for
    only_first = pdemo.tile_boxes(boxes[:1], (640, 320), 320, 0.5)
    assert len(only_first) == 1
    both = pdemo.tile_boxes(boxes[:1], (640, 320), 320, 0.5, keep_empty=True)
    assert len(both) == 2 and len(both[1]['indices']) == 0
    # no boxes at all
    assert pdemo.tile_boxes(np.zeros((0, 4)), (640, 320), 320, 0.5) == []


def test_tile_boxes_small_image_kept_whole():
    boxes = np.array([[5, 5, 395, 395], [0, 0, 1, 1]], dtype=float)
    tiles = pdemo.tile_boxes(boxes, (400, 400), 320, 0.5)
    assert len(tiles) == 1
    assert (tiles[0]['width'], tiles[0]['height']) == (400, 400)
    np.testing.assert_allclose(tiles[0]['boxes'], boxes)


def test_parse_voc_and_errors():
    objects = [('Tree', 1, 2, 11, 12), ('Dead', 3.5, 4, 9, 10)]
    xml = _voc_xml('a.tif', (40, 30), objects)
    ann = pdemo.parse_voc(xml, 'a.xml')
    assert (ann['width'], ann['height']) == (40, 30)
    assert ann['filename'] == 'a.tif'
    assert ann['labels'] == ['Tree', 'Dead']
    np.testing.assert_allclose(ann['boxes'],
                               [[1, 2, 11, 12], [3.5, 4, 9, 10]])
    empty = pdemo.parse_voc(b'<annotation></annotation>')
    assert empty['boxes'].shape == (0, 4) and empty['labels'] == []

    with pytest.raises(pdemo.PrepareError, match='broken.xml'):
        pdemo.parse_voc(xml[:-20], 'broken.xml')
    bad = xml.replace(b'<xmax>11</xmax>', b'<xmax>eleven</xmax>')
    with pytest.raises(pdemo.PrepareError, match='bad.xml.*xmax'):
        pdemo.parse_voc(bad, 'bad.xml')


# --------------------------------------------------------------------------
# full pipeline on a synthetic wheel (offline)
# --------------------------------------------------------------------------
def test_build_synthetic(fake_wheel, tmp_path):
    out = tmp_path / 'out'
    meta = pdemo.build_dataset(
        fake_wheel, str(out), sources=FAKE_SOURCES, log=_quiet)
    cocos = _check_dataset(out, meta, fake_wheel, 0.5)
    _check_regions(meta)
    assert [c['name'] for c in meta['categories']] == ['Tree', 'Dead']
    assert meta['sources'][0]['grid'] == [2, 2]
    assert [s['grid'] for s in meta['sources'][1:]] == [[1, 1], [1, 1]]
    assert meta['counts']['val']['images'] >= 1
    assert meta['counts']['train']['images'] >= 3
    for split in ('train', 'val'):
        assert meta['counts'][split]['images'] == len(
            cocos[split]['images'])
        assert meta['counts'][split]['boxes'] == len(
            cocos[split]['annotations'])
    # the degenerate box is never written
    assert all(a['bbox'][2] > 0 for c in cocos.values()
               for a in c['annotations'])

    # deterministic: the same inputs give the same files
    out2 = tmp_path / 'out2'
    meta2 = pdemo.build_dataset(
        fake_wheel, str(out2), sources=FAKE_SOURCES, log=_quiet)
    assert meta2 == meta
    for split in ('train', 'val'):
        name = f'annotations/instances_{split}.json'
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def test_whole_images_split_and_cap(fake_wheel, tmp_path):
    # val_fraction 0.5: one of the two whole images goes to val; the cap
    # keeps at most 2 tiles of the 2x2-tiled image.
    meta = pdemo.build_dataset(
        fake_wheel,
        str(tmp_path / 'o'),
        sources=FAKE_SOURCES,
        val_fraction=0.5,
        max_tiles_per_image=2,
        log=_quiet)
    _check_dataset(tmp_path / 'o', meta, fake_wheel, 0.5)
    whole_splits = sorted(t['split'] for t in meta['tiles']
                          if not t['source'].endswith('x.png'))
    assert whole_splits == ['train', 'val']
    x_tiles = [t for t in meta['tiles'] if t['source'].endswith('x.png')]
    assert len(x_tiles) == 2
    assert sorted(t['split'] for t in x_tiles) == ['train', 'val']


def test_main_idempotent_and_keeps_foreign_files(fake_wheel, tmp_path,
                                                 capsys):
    out = tmp_path / 'demo'
    args = ['--out', str(out), '--wheel', fake_wheel, '--sources', 'x', 'y',
            'z']
    assert pdemo.main(args) == 0
    first = capsys.readouterr().out
    assert 'train' in first and 'val' in first and 'Tree' in first
    ann = out / 'annotations' / 'instances_train.json'
    stamp = ann.stat().st_mtime_ns
    foreign = [out / 'README.txt', out / 'images' / 'mine.png']
    for f in foreign:
        f.write_text('not created by prepare_demo')

    assert pdemo.main(args) == 0
    assert 'demo data already prepared at' in capsys.readouterr().out
    assert ann.stat().st_mtime_ns == stamp

    # --force rebuilds; different parameters rebuild too and remove only the
    # stale tiles the previous run created
    assert pdemo.main(args + ['--force']) == 0
    assert 'already prepared' not in capsys.readouterr().out
    old_tiles = {t['file_name'] for t in
                 json.loads((out / 'meta.json').read_text())['tiles']}
    assert pdemo.main(args + ['--tile', '200']) == 0
    capsys.readouterr()
    meta = json.loads((out / 'meta.json').read_text())
    new_tiles = {t['file_name'] for t in meta['tiles']}
    assert new_tiles != old_tiles
    on_disk = set(os.listdir(out / 'images'))
    assert on_disk == new_tiles | {'mine.png'}
    assert all(f.read_text() == 'not created by prepare_demo'
               for f in foreign)
    _check_dataset(out, meta, fake_wheel, 0.5)


# --------------------------------------------------------------------------
# error reporting
# --------------------------------------------------------------------------
def test_error_missing_wheel_path(tmp_path):
    missing = tmp_path / 'nowhere' / 'deepforest-2.1.0-py3-none-any.whl'
    with pytest.raises(SystemExit) as exc:
        pdemo.main(['--out', str(tmp_path / 'o'), '--wheel', str(missing)])
    assert 'wheel file not found' in str(exc.value.code)
    assert str(missing) in str(exc.value.code)
    assert not (tmp_path / 'o').exists()


def test_error_not_a_zip(tmp_path):
    bogus = tmp_path / 'bogus.whl'
    bogus.write_text('this is not a zip')
    with pytest.raises(SystemExit, match='not a readable wheel'):
        pdemo.main(['--out', str(tmp_path / 'o'), '--wheel', str(bogus)])


def test_error_wheel_lacks_files(tmp_path):
    wheel = _make_fake_wheel(tmp_path / 'w.whl', skip=('x.xml', ))
    with pytest.raises(pdemo.PrepareError, match='deepforest/data/x.xml'):
        pdemo.build_dataset(
            wheel, str(tmp_path / 'o'), sources=FAKE_SOURCES, log=_quiet)
    # the real default sources are not in the synthetic wheel either
    with pytest.raises(SystemExit) as exc:
        pdemo.main(['--out', str(tmp_path / 'o'), '--wheel', wheel])
    msg = str(exc.value.code)
    assert 'lacks the expected file' in msg and 'OSBS_029.xml' in msg


def test_error_malformed_xml(tmp_path):
    wheel = _make_fake_wheel(tmp_path / 'w.whl', bad_xml=('y.xml', ))
    with pytest.raises(SystemExit) as exc:
        pdemo.main([
            '--out',
            str(tmp_path / 'o'), '--wheel', wheel, '--sources', 'x', 'y'
        ])
    assert 'malformed VOC XML in deepforest/data/y.xml' in str(
        exc.value.code)


def test_error_unreadable_image(tmp_path):
    wheel = _make_fake_wheel(tmp_path / 'w.whl', bad_png=('z.png', ))
    with pytest.raises(pdemo.PrepareError,
                       match='cannot read image deepforest/data/z.png'):
        pdemo.build_dataset(
            wheel, str(tmp_path / 'o'), sources=FAKE_SOURCES, log=_quiet)
    assert not (tmp_path / 'o').exists()


def test_error_download_fails(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, '', 'WARNING: Retrying ...\nERROR: Could not find a '
            'version that satisfies the requirement deepforest==2.1.0\n')

    monkeypatch.setattr(pdemo.subprocess, 'run', fake_run)
    cache = tmp_path / 'cache'
    with pytest.raises(pdemo.PrepareError) as exc:
        pdemo.download_wheel(str(cache))
    msg = str(exc.value)
    assert 'deepforest==2.1.0' in msg and '--wheel PATH' in msg
    assert 'Could not find a version' in msg
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, '-m', 'pip', 'download']
    assert '--no-deps' in cmd and ':all:' in cmd

    with pytest.raises(SystemExit, match='--wheel PATH'):
        pdemo.main(['--out', str(tmp_path / 'o'), '--cache', str(cache)])


def test_download_reuses_cached_wheel(tmp_path, monkeypatch):
    cached = tmp_path / 'deepforest-2.1.0-py3-none-any.whl'
    _make_fake_wheel(cached)

    def no_pip(*args, **kwargs):
        raise AssertionError('pip must not run when the wheel is cached')

    monkeypatch.setattr(pdemo.subprocess, 'run', no_pip)
    assert pdemo.download_wheel(str(tmp_path)) == str(cached)


def test_cli_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), '--out',
         str(tmp_path / 'o'), '--wheel',
         str(tmp_path / 'missing.whl')],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True)
    assert proc.returncode != 0
    assert 'missing.whl' in proc.stderr


# --------------------------------------------------------------------------
# the real deepforest wheel (skipped when it cannot be downloaded)
# --------------------------------------------------------------------------
def test_real_wheel_sizes_and_classes(real_demo, real_wheel):
    _, meta = real_demo
    assert meta['wheel']['name'] == osp.basename(real_wheel)
    assert len(meta['wheel']['sha256']) == 64
    counts = meta['counts']
    assert 30 <= counts['train']['images'] <= 80
    assert 8 <= counts['val']['images'] <= 20
    assert counts['val']['boxes'] >= 5 * 10
    # class names are exactly those that occur in the VOC files
    names = set()
    with zipfile.ZipFile(real_wheel) as zf:
        for _, xml in pdemo.DEFAULT_SOURCES:
            names.update(_voc_boxes(zf.read(PREFIX + xml))[1])
    assert {c['name'] for c in meta['categories']} == names
    assert names == {'Tree'}
    assert [s['grid'] for s in meta['sources']] == [[8, 7], [3, 4], [1, 1]]
    _check_regions(meta)


def test_real_wheel_boxes_and_pixels(real_demo, real_wheel):
    out, meta = real_demo
    _check_dataset(out, meta, real_wheel, 0.5)

    # with the defaults nothing is capped: every source box that lies fully
    # inside a grid cell is in the output exactly once
    written = {}
    for t in meta['tiles']:
        written.setdefault(t['source'], []).append(t)
    with zipfile.ZipFile(real_wheel) as zf:
        for src in meta['sources']:
            boxes, _ = _voc_boxes(zf.read(src['annotation']))
            xs = _edges(src['width'], 320)
            ys = _edges(src['height'], 320)
            col = np.searchsorted(xs, boxes[:, 0], side='right') - 1
            row = np.searchsorted(ys, boxes[:, 1], side='right') - 1
            inside = ((boxes[:, 2] <= np.take(xs, col + 1))
                      & (boxes[:, 3] <= np.take(ys, row + 1)))
            kept = {tuple(t['grid_index']) for t in written[src['image']]}
            for r, c in zip(row[inside], col[inside]):
                assert (r, c) in kept
    total = sum(meta['counts'][s]['boxes'] for s in ('train', 'val'))
    assert total == sum(t['num_boxes'] for t in meta['tiles'])


def test_real_wheel_coco_loads(real_demo):
    coco_api = pytest.importorskip('pycocotools.coco')
    out, meta = real_demo
    for split in ('train', 'val'):
        coco = coco_api.COCO(str(out / 'annotations' /
                                 f'instances_{split}.json'))
        assert len(coco.getImgIds()) == meta['counts'][split]['images']
        assert len(coco.getAnnIds()) == meta['counts'][split]['boxes']


def test_real_wheel_main_is_noop(real_demo, real_wheel, capsys):
    out, meta = real_demo
    stamp = (out / 'meta.json').stat().st_mtime_ns
    assert pdemo.main(['--out', str(out), '--wheel', real_wheel]) == 0
    assert 'demo data already prepared at' in capsys.readouterr().out
    assert (out / 'meta.json').stat().st_mtime_ns == stamp
