# Copyright (c) mmlocal contributors. All rights reserved.
"""Prepare a small, real object-detection demo dataset in COCO format.

The images and boxes come from the PyPI wheel of ``deepforest`` (pinned to
``deepforest==2.1.0``), which ships a few NEON aerial RGB images (10 cm/px)
with hand-drawn tree-crown boxes as Pascal VOC XML files under
``deepforest/data/``. The package itself is **never installed**: the wheel is
fetched with ``pip download --no-deps --only-binary :all:`` into a cache
folder and the files are read straight out of the zip archive.

Sources (the first three are the default; ``--sources`` picks by file stem):

=========================================  ===========  =====  ===============
image                                      size (WxH)   boxes  VOC class names
=========================================  ===========  =====  ===============
2019_YELL_2_528000_4978000_image_crop2     2299x2472    574    Tree
2019_YELL_2_541000_4977000_image_crop      1249x1035    279    Tree
OSBS_029 (its XML names ``OSBS_029.tif``)  400x400      61     Tree
SOAP_061                                   400x400      37     Alive, Dead
=========================================  ===========  =====  ===============

``SOAP_031.png`` has no annotation and is ignored. The VOC class names are
kept as they are (categories are numbered from 1 in order of first
appearance); no class is invented or merged. SOAP_061 labels crowns by
health (``Alive``/``Dead``), a different taxonomy from ``Tree``, so the
default dataset leaves it out and has the single class ``Tree``.

Choices
-------
* **Tiling.** Every image is cut into a grid of non-overlapping, near-equal
  tiles: along an axis of length ``L`` there are ``n = max(1, round(L /
  tile))`` tiles whose borders are ``round(i * L / n)``. Tiles are therefore
  between ``0.75 * tile`` and ``1.5 * tile`` pixels wide, the whole image is
  covered (no remainder strips are thrown away) and an image of up to about
  ``1.5 * tile`` pixels (e.g. the 400x400 images at ``--tile 320``) is kept
  whole. With the defaults the two large images give 8x7 and 3x4 grids.
* **Boxes.** VOC ``xmin/ymin/xmax/ymax`` are used as continuous pixel
  coordinates (width ``= xmax - xmin``, no ``+1``). A box belongs to a tile
  when at least ``--min-visible`` of its area lies inside the tile; it is then
  clipped to the tile and written as COCO ``[x, y, w, h]`` in tile
  coordinates. Degenerate boxes (zero or negative width/height) are dropped.
  Tiles without any box are dropped.
* **Split by region.** For every tiled image a contiguous band of tile rows
  (or columns, along the image's longer grid axis) is held out for
  validation: ``round(val_fraction * n)`` rows, at least 1 and at most
  ``n - 1``. Its position is drawn with ``--seed`` among the bands in which at
  least half of the tiles contain boxes, so validation always gets several
  annotated tiles. Images kept whole are split as whole images
  (``floor(val_fraction * count)`` of them go to val; with the defaults both
  400x400 images stay in train). A crown cut by a band border can appear,
  clipped, on both sides; tiles never overlap.
* **Size.** ``--max-tiles-per-image`` (default 64) caps the tiles taken from
  one image (a seeded subsample that keeps the val share); it only matters
  for smaller ``--tile`` values. The defaults give 48 train tiles (673
  boxes) and 17 val tiles (241 boxes) of the class ``Tree``, 309-345 px.

Output (under ``--out``)::

    images/<stem>_x<X>_y<Y>.png          tiles; X, Y = offset in the source
    annotations/instances_train.json     COCO detection annotations
    annotations/instances_val.json
    meta.json                            parameters, wheel name + sha256,
                                         per-tile source and offset, counts

The script is idempotent: when ``meta.json`` and both annotation files exist
and were produced with the same parameters it only reports that and exits
(``--force`` rebuilds). Only files listed in a previous ``meta.json`` (tiles
this script wrote) are ever deleted.

Example::

    python tools/data/prepare_demo.py --out data/demo --cache data/cache
    # offline, with a wheel copied from elsewhere:
    python tools/data/prepare_demo.py \
        --wheel /path/to/deepforest-2.1.0-py3-none-any.whl
"""
import argparse
import glob
import hashlib
import io
import json
import math
import os
import os.path as osp
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

PACKAGE = 'deepforest'
VERSION = '2.1.0'
DATA_PREFIX = 'deepforest/data/'
DEFAULT_SOURCES: Tuple[Tuple[str, str], ...] = (
    ('2019_YELL_2_528000_4978000_image_crop2.png',
     '2019_YELL_2_528000_4978000_image_crop2.xml'),
    ('2019_YELL_2_541000_4977000_image_crop.png',
     '2019_YELL_2_541000_4977000_image_crop.xml'),
    ('OSBS_029.png', 'OSBS_029.xml'),
)
# SOAP_061 labels crowns by health (``Alive``/``Dead``) instead of ``Tree``;
# mixing the two taxonomies would teach a wrong label, so it is opt-in.
OPTIONAL_SOURCES: Tuple[Tuple[str, str], ...] = (
    ('SOAP_061.png', 'SOAP_061.xml'),
)
META_FORMAT = 1
SPLITS = ('train', 'val')


class PrepareError(RuntimeError):
    """A problem with the inputs, reported to the user without traceback."""


def _half_up(value: float) -> int:
    """Round half up (Python's ``round`` rounds half to even)."""
    return int(math.floor(value + 0.5))


# --------------------------------------------------------------------------
# wheel access
# --------------------------------------------------------------------------
def find_cached_wheel(cache_dir: str,
                      package: str = PACKAGE,
                      version: str = VERSION) -> Optional[str]:
    """Return a readable ``<package>-<version>-*.whl`` in ``cache_dir``."""
    pattern = osp.join(cache_dir, f'{package}-{version}-*.whl')
    for path in sorted(glob.glob(pattern)):
        if zipfile.is_zipfile(path):
            return path
    return None


def download_wheel(cache_dir: str,
                   package: str = PACKAGE,
                   version: str = VERSION,
                   timeout: int = 60) -> str:
    """Get the wheel of ``package==version`` into ``cache_dir``.

    A wheel already in ``cache_dir`` is reused; otherwise it is fetched with
    ``pip download --no-deps --only-binary :all:`` (nothing is installed).

    Args:
        cache_dir (str): Folder that keeps downloaded wheels.
        package (str): Distribution name. Defaults to ``'deepforest'``.
        version (str): Exact version. Defaults to ``'2.1.0'``.
        timeout (int): Socket timeout (s) passed to pip.

    Returns:
        str: Path of the wheel file.

    Raises:
        PrepareError: If pip cannot fetch the wheel (e.g. no network).
    """
    cached = find_cached_wheel(cache_dir, package, version)
    if cached is not None:
        return cached
    os.makedirs(cache_dir, exist_ok=True)
    spec = f'{package}=={version}'
    cmd = [
        sys.executable, '-m', 'pip', 'download', '--no-deps',
        '--only-binary', ':all:', '--disable-pip-version-check',
        '--no-input', '--timeout',
        str(timeout), '--retries', '1', '-d', cache_dir, spec
    ]
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        returncode, output = proc.returncode, (proc.stderr or proc.stdout)
    except OSError as err:  # e.g. the interpreter cannot be started
        returncode, output = -1, str(err)
    wheel = find_cached_wheel(cache_dir, package, version)
    if returncode != 0 or wheel is None:
        lines = [ln.strip() for ln in (output or '').splitlines()]
        lines = [ln for ln in lines if ln]
        detail = lines[-1] if lines else f'exit status {returncode}'
        raise PrepareError(
            f'could not download the wheel of {spec} from the package '
            f'registry with pip ({detail}). If this machine is offline, '
            f'fetch it elsewhere (pip download --no-deps --only-binary :all: '
            f'{spec}) and pass it with --wheel PATH.')
    return wheel


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def open_wheel(path: str) -> zipfile.ZipFile:
    """Open a wheel (zip) file, with clear errors."""
    if not osp.isfile(path):
        raise PrepareError(f'wheel file not found: {path}')
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise PrepareError(
            f'{path} is not a readable wheel (zip) file: {err}') from err


def check_members(zf: zipfile.ZipFile, members: Sequence[str],
                  wheel_name: str) -> None:
    """Raise :class:`PrepareError` naming every member missing from ``zf``."""
    names = set(zf.namelist())
    missing = [m for m in members if m not in names]
    if missing:
        raise PrepareError(f'wheel {wheel_name} lacks the expected file(s): '
                           + ', '.join(missing))


# --------------------------------------------------------------------------
# annotations and tiling
# --------------------------------------------------------------------------
def parse_voc(xml_bytes: bytes, name: str = '<xml>') -> dict:
    """Parse a Pascal VOC annotation.

    Args:
        xml_bytes (bytes): Content of the XML file.
        name (str): File name used in error messages.

    Returns:
        dict: ``filename`` (str or None), ``width``/``height`` (int or None,
        from ``<size>``), ``boxes`` (float64 array of shape (N, 4), ``xmin,
        ymin, xmax, ymax``) and ``labels`` (list of N class names).

    Raises:
        PrepareError: If the XML is malformed or an object lacks a name or a
            numeric box coordinate.
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as err:
        raise PrepareError(f'malformed VOC XML in {name}: {err}') from err

    def _int_or_none(tag: str) -> Optional[int]:
        text = root.findtext(tag)
        try:
            return int(float(text)) if text is not None else None
        except ValueError:
            return None

    boxes, labels = [], []
    for i, obj in enumerate(root.iter('object')):
        label = (obj.findtext('name') or '').strip()
        bndbox = obj.find('bndbox')
        if not label or bndbox is None:
            raise PrepareError(f'malformed VOC XML in {name}: object #{i} '
                               'lacks <name> or <bndbox>')
        coords = []
        for key in ('xmin', 'ymin', 'xmax', 'ymax'):
            text = bndbox.findtext(key)
            try:
                coords.append(float(text))
            except (TypeError, ValueError):
                raise PrepareError(
                    f'malformed VOC XML in {name}: object #{i} has a bad '
                    f'<{key}> ({text!r})') from None
        boxes.append(coords)
        labels.append(label)
    return dict(
        filename=root.findtext('filename'),
        width=_int_or_none('size/width'),
        height=_int_or_none('size/height'),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        labels=labels)


def grid_edges(length: int, tile: int) -> List[int]:
    """Borders of ``max(1, round(length / tile))`` near-equal intervals."""
    if tile <= 0:
        raise ValueError(f'tile must be positive, got {tile}')
    n = max(1, _half_up(length / tile))
    return [_half_up(i * length / n) for i in range(n + 1)]


def clip_boxes(boxes: np.ndarray, window: Sequence[float],
               min_visible: float) -> Tuple[np.ndarray, np.ndarray]:
    """Select boxes that are visible enough in a window and clip them.

    Args:
        boxes (np.ndarray): (N, 4) boxes ``x1, y1, x2, y2``.
        window (Sequence[float]): ``x1, y1, x2, y2`` of the window.
        min_visible (float): Minimum fraction of a box's area that must lie
            inside the window. Boxes with no area are never kept.

    Returns:
        tuple: Indices of the kept boxes and their (M, 4) clipped boxes in
        window coordinates (shifted by the window's top-left corner).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    wx1, wy1, wx2, wy2 = (float(v) for v in window)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    clipped = np.stack([
        np.clip(boxes[:, 0], wx1, wx2),
        np.clip(boxes[:, 1], wy1, wy2),
        np.clip(boxes[:, 2], wx1, wx2),
        np.clip(boxes[:, 3], wy1, wy2)
    ], axis=1)
    inter = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = valid & (inter > 0)
    keep &= inter >= min_visible * np.where(valid, area, np.inf)
    idx = np.nonzero(keep)[0]
    out = clipped[idx] - np.array([wx1, wy1, wx1, wy1])
    return idx, out


def tile_boxes(boxes: np.ndarray,
               image_size: Tuple[int, int],
               tile: int,
               min_visible: float = 0.5,
               keep_empty: bool = False) -> List[dict]:
    """Cut an image into a grid of tiles and assign boxes to them.

    Args:
        boxes (np.ndarray): (N, 4) boxes ``x1, y1, x2, y2`` in image pixels.
        image_size (tuple[int, int]): ``(width, height)`` of the image.
        tile (int): Target tile size; see :func:`grid_edges`.
        min_visible (float): See :func:`clip_boxes`.
        keep_empty (bool): Also return tiles without boxes.

    Returns:
        list[dict]: In row-major order, one dict per tile with ``row``,
        ``col``, ``x``, ``y`` (offset), ``width``, ``height``, ``indices``
        (source box indices) and ``boxes`` ((M, 4) clipped boxes ``x1, y1,
        x2, y2`` in tile coordinates).
    """
    width, height = image_size
    xs, ys = grid_edges(width, tile), grid_edges(height, tile)
    tiles = []
    for row in range(len(ys) - 1):
        for col in range(len(xs) - 1):
            x1, x2, y1, y2 = xs[col], xs[col + 1], ys[row], ys[row + 1]
            idx, clipped = clip_boxes(boxes, (x1, y1, x2, y2), min_visible)
            if len(idx) == 0 and not keep_empty:
                continue
            tiles.append(
                dict(
                    row=row,
                    col=col,
                    x=x1,
                    y=y1,
                    width=x2 - x1,
                    height=y2 - y1,
                    indices=idx,
                    boxes=clipped))
    return tiles


def choose_val_band(tiles: Sequence[dict], grid_shape: Tuple[int, int],
                    val_fraction: float,
                    rng: np.random.Generator) -> Tuple[str, int, int]:
    """Pick a contiguous band of tile rows or columns for validation.

    Args:
        tiles (Sequence[dict]): Non-empty tiles of one image.
        grid_shape (tuple[int, int]): ``(rows, cols)`` of the full grid.
        val_fraction (float): Share of rows (or columns) to hold out.
        rng (np.random.Generator): Source of the deterministic choice.

    Returns:
        tuple: ``(axis, start, stop)`` with ``axis`` in ``('row', 'col')``;
        ``start == stop`` when nothing is held out.
    """
    rows, cols = grid_shape
    if rows >= cols:
        axis, length, across = 'row', rows, cols
    else:
        axis, length, across = 'col', cols, rows
    if val_fraction <= 0 or length < 2:
        return axis, 0, 0
    k = min(length - 1, max(1, _half_up(val_fraction * length)))
    occupied = np.zeros(length, dtype=np.int64)
    for t in tiles:
        occupied[t[axis]] += 1
    starts = list(range(length - k + 1))
    good = [
        s for s in starts
        if occupied[s:s + k].sum() >= math.ceil(k * across / 2)
    ]
    start = int(rng.choice(good or starts))
    return axis, start, start + k


def _cap_indices(n: int, cap: int, rng: np.random.Generator) -> List[int]:
    if n <= cap:
        return list(range(n))
    return sorted(rng.choice(n, size=cap, replace=False).tolist())


# --------------------------------------------------------------------------
# dataset building
# --------------------------------------------------------------------------
def make_params(sources: Sequence[Tuple[str, str]], tile: int,
                min_visible: float, val_fraction: float, seed: int,
                max_tiles_per_image: int) -> dict:
    """Parameters that determine the output (stored in ``meta.json``)."""
    return dict(
        package=f'{PACKAGE}=={VERSION}',
        sources=[[png, xml] for png, xml in sources],
        tile=int(tile),
        min_visible=float(min_visible),
        val_fraction=float(val_fraction),
        seed=int(seed),
        max_tiles_per_image=int(max_tiles_per_image),
        format=META_FORMAT)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)


def ann_file(out_dir: str, split: str) -> str:
    """Path of a split's COCO annotation file."""
    return osp.join(out_dir, 'annotations', f'instances_{split}.json')


def is_prepared(out_dir: str,
                params: dict,
                wheel_sha256: Optional[str] = None) -> bool:
    """Whether ``out_dir`` already holds a complete dataset for ``params``."""
    meta = _read_json(osp.join(out_dir, 'meta.json'))
    if not meta or meta.get('params') != params:
        return False
    if wheel_sha256 is not None and \
            meta.get('wheel', {}).get('sha256') != wheel_sha256:
        return False
    if not all(osp.isfile(ann_file(out_dir, s)) for s in SPLITS):
        return False
    return all(
        osp.isfile(osp.join(out_dir, 'images', t['file_name']))
        for t in meta.get('tiles', []))


def _image_size(zf: zipfile.ZipFile, png_name: str) -> Tuple[int, int]:
    """Size of an image of the wheel, read from its header only."""
    try:
        with Image.open(io.BytesIO(zf.read(png_name))) as image:
            return image.size
    except (OSError, ValueError) as err:
        raise PrepareError(f'cannot read image {png_name}: {err}') from err


def _load_image(zf: zipfile.ZipFile, png_name: str) -> Image.Image:
    """Decode an image of the wheel as RGB."""
    try:
        image = Image.open(io.BytesIO(zf.read(png_name)))
        image.load()
    except (OSError, ValueError) as err:
        raise PrepareError(f'cannot read image {png_name}: {err}') from err
    if image.mode != 'RGB':
        image = image.convert('RGB')
    return image


def build_dataset(wheel_path: str,
                  out_dir: str,
                  sources: Sequence[Tuple[str, str]] = DEFAULT_SOURCES,
                  tile: int = 320,
                  min_visible: float = 0.5,
                  val_fraction: float = 0.25,
                  seed: int = 0,
                  max_tiles_per_image: int = 64,
                  data_prefix: str = DATA_PREFIX,
                  log: Callable[[str], None] = print) -> dict:
    """Build the COCO-format demo dataset from a wheel.

    Args:
        wheel_path (str): The ``deepforest`` wheel (or any zip laid out the
            same way).
        out_dir (str): Output folder (created if needed).
        sources (Sequence[tuple[str, str]]): ``(png, xml)`` file names,
            relative to ``data_prefix`` inside the wheel.
        tile (int): Target tile size in pixels.
        min_visible (float): Minimum visible share of a box kept in a tile.
        val_fraction (float): Share of each tiled image (and of the whole
            images) held out for validation.
        seed (int): Seed of the deterministic split / subsampling.
        max_tiles_per_image (int): Cap on the tiles taken from one image.
        data_prefix (str): Folder of the data files inside the wheel.
        log (callable): Where progress lines go.

    Returns:
        dict: The content written to ``meta.json``.

    Raises:
        PrepareError: For a missing/unreadable wheel, missing files in it,
            malformed XML or unreadable images.
    """
    if tile <= 0:
        raise PrepareError(f'--tile must be positive, got {tile}')
    if not 0 < min_visible <= 1:
        raise PrepareError(f'--min-visible must be in (0, 1], got '
                           f'{min_visible}')
    if not 0 <= val_fraction < 1:
        raise PrepareError(f'--val-fraction must be in [0, 1), got '
                           f'{val_fraction}')
    if max_tiles_per_image < 1:
        raise PrepareError('--max-tiles-per-image must be >= 1')
    if not sources:
        raise PrepareError('no sources given')
    params = make_params(sources, tile, min_visible, val_fraction, seed,
                         max_tiles_per_image)
    wheel_name = osp.basename(wheel_path)
    rng = np.random.default_rng(seed)

    with open_wheel(wheel_path) as zf:
        check_members(zf, [data_prefix + n for pair in sources for n in pair],
                      wheel_name)
        # Pass 1: annotations, grids and the split (cheap, no pixels).
        anns = []
        for png, xml in sources:
            xml_name = data_prefix + xml
            anns.append(parse_voc(zf.read(xml_name), xml_name))
        categories: List[str] = []
        for ann in anns:
            for label in ann['labels']:
                if label not in categories:
                    categories.append(label)
        cat_ids = {name: i + 1 for i, name in enumerate(categories)}

        plans = []
        whole = []  # indices of sources kept as a single tile
        for i, (png, xml) in enumerate(sources):
            size = _image_size(zf, data_prefix + png)
            ann = anns[i]
            if (ann['width'], ann['height']) not in ((None, None), size):
                log(f'  note: {xml} says {ann["width"]}x{ann["height"]} but '
                    f'{png} is {size[0]}x{size[1]}; using the image size')
            tiles = tile_boxes(ann['boxes'], size, tile, min_visible)
            grid = (len(grid_edges(size[1], tile)) - 1,
                    len(grid_edges(size[0], tile)) - 1)
            plan = dict(
                png=png, xml=xml, size=size, grid=grid, tiles=tiles,
                band=None)
            if grid == (1, 1):
                whole.append(i)
                for t in tiles:
                    t['split'] = 'train'
            else:
                axis, start, stop = choose_val_band(tiles, grid, val_fraction,
                                                    rng)
                plan['band'] = [axis, start, stop]
                for t in tiles:
                    t['split'] = 'val' if start <= t[axis] < stop else 'train'
                by_split = {
                    s: [t for t in tiles if t['split'] == s]
                    for s in SPLITS
                }
                if len(tiles) > max_tiles_per_image:
                    n_val = min(
                        len(by_split['val']),
                        _half_up(max_tiles_per_image * val_fraction))
                    n_train = max_tiles_per_image - n_val
                    keep = [
                        by_split['train'][j] for j in _cap_indices(
                            len(by_split['train']), n_train, rng)
                    ] + [
                        by_split['val'][j] for j in _cap_indices(
                            len(by_split['val']), n_val, rng)
                    ]
                    keep_ids = {id(t) for t in keep}
                    plan['tiles'] = [t for t in tiles if id(t) in keep_ids]
            plans.append(plan)
        n_whole_val = int(math.floor(val_fraction * len(whole)))
        if n_whole_val:
            for j in rng.choice(len(whole), size=n_whole_val, replace=False):
                for t in plans[whole[int(j)]]['tiles']:
                    t['split'] = 'val'

        # Pass 2: write the tiles and collect COCO records.
        old_meta = _read_json(osp.join(out_dir, 'meta.json')) or {}
        img_dir = osp.join(out_dir, 'images')
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
        coco = {
            s: dict(
                info=dict(
                    description=f'mmlocal demo: tree crowns from '
                    f'{PACKAGE}=={VERSION} ({s})',
                    version=VERSION),
                licenses=[],
                images=[],
                annotations=[],
                categories=[
                    dict(id=cat_ids[c], name=c, supercategory='tree')
                    for c in categories
                ])
            for s in SPLITS
        }
        tile_records = []
        image_id = ann_id = 0
        for plan, ann in zip(plans, anns):
            if not plan['tiles']:
                continue
            image = _load_image(zf, data_prefix + plan['png'])
            stem = osp.splitext(osp.basename(plan['png']))[0]
            for t in plan['tiles']:
                image_id += 1
                file_name = f'{stem}_x{t["x"]}_y{t["y"]}.png'
                crop = image.crop((t['x'], t['y'], t['x'] + t['width'],
                                   t['y'] + t['height']))
                crop.save(osp.join(img_dir, file_name), format='PNG')
                split = t['split']
                coco[split]['images'].append(
                    dict(
                        id=image_id,
                        file_name=file_name,
                        width=t['width'],
                        height=t['height']))
                for src_idx, box in zip(t['indices'], t['boxes']):
                    ann_id += 1
                    w, h = float(box[2] - box[0]), float(box[3] - box[1])
                    coco[split]['annotations'].append(
                        dict(
                            id=ann_id,
                            image_id=image_id,
                            category_id=cat_ids[ann['labels'][src_idx]],
                            bbox=[float(box[0]), float(box[1]), w, h],
                            area=w * h,
                            iscrowd=0))
                tile_records.append(
                    dict(
                        file_name=file_name,
                        image_id=image_id,
                        split=split,
                        source=data_prefix + plan['png'],
                        source_xml=data_prefix + plan['xml'],
                        offset=[t['x'], t['y']],
                        size=[t['width'], t['height']],
                        grid_index=[t['row'], t['col']],
                        num_boxes=len(t['indices'])))
            image.close()

    for split in SPLITS:
        _write_json(ann_file(out_dir, split), coco[split])

    # Remove tiles of a previous run (listed in its meta.json) that this run
    # did not write again. Nothing else in out_dir is ever deleted.
    new_files = {r['file_name'] for r in tile_records}
    for rec in old_meta.get('tiles', []) if isinstance(old_meta, dict) else []:
        name = rec.get('file_name') if isinstance(rec, dict) else None
        if (isinstance(name, str) and name not in new_files
                and osp.basename(name) == name):
            path = osp.join(img_dir, name)
            if osp.isfile(path):
                os.remove(path)

    counts = {}
    for split in SPLITS:
        per_class = {c: 0 for c in categories}
        names = {cat_ids[c]: c for c in categories}
        for a in coco[split]['annotations']:
            per_class[names[a['category_id']]] += 1
        counts[split] = dict(
            images=len(coco[split]['images']),
            boxes=len(coco[split]['annotations']),
            per_class=per_class)
    meta = dict(
        params=params,
        wheel=dict(name=wheel_name, sha256=sha256_of(wheel_path)),
        categories=[dict(id=cat_ids[c], name=c) for c in categories],
        sources=[
            dict(
                image=data_prefix + p['png'],
                annotation=data_prefix + p['xml'],
                width=p['size'][0],
                height=p['size'][1],
                num_boxes=len(a['boxes']),
                grid=list(p['grid']),
                val_band=p['band']) for p, a in zip(plans, anns)
        ],
        tiles=tile_records,
        counts=counts)
    _write_json(osp.join(out_dir, 'meta.json'), meta)
    return meta


def format_summary(meta: dict, out_dir: str) -> str:
    """A short human-readable summary of a prepared dataset."""
    lines = [
        f'demo data from {meta["wheel"]["name"]} at {out_dir} '
        f'(tile {meta["params"]["tile"]} px)',
        '  classes: ' + ', '.join(c['name'] for c in meta['categories'])
    ]
    for split in SPLITS:
        c = meta['counts'][split]
        per_class = ', '.join(f'{k} {v}' for k, v in c['per_class'].items())
        lines.append(f'  {split:<5}: {c["images"]:3d} images, '
                     f'{c["boxes"]:4d} boxes ({per_class})')
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Build a small COCO-format tree-crown detection dataset '
        f'from the images shipped in the {PACKAGE}=={VERSION} wheel.')
    parser.add_argument(
        '--out', default='data/demo', help='output folder (data/demo)')
    parser.add_argument(
        '--cache',
        default='data/cache',
        help='folder for the downloaded wheel (data/cache)')
    parser.add_argument(
        '--wheel',
        default=None,
        help='use this local wheel file instead of downloading (offline)')
    parser.add_argument(
        '--tile', type=int, default=320, help='target tile size in px')
    parser.add_argument(
        '--min-visible',
        type=float,
        default=0.5,
        help='keep a box in a tile if at least this share of its area is '
        'inside (then clip it)')
    parser.add_argument(
        '--val-fraction',
        type=float,
        default=0.25,
        help='share of each image region held out for validation')
    parser.add_argument('--seed', type=int, default=0, help='split seed')
    parser.add_argument(
        '--max-tiles-per-image',
        type=int,
        default=64,
        help='cap on the tiles taken from one source image')
    parser.add_argument(
        '--sources',
        nargs='+',
        default=None,
        metavar='STEM',
        help='source image stems in the wheel (default: all four annotated '
        'images: ' + ', '.join(osp.splitext(p)[0]
                               for p, _ in DEFAULT_SOURCES) + ')')
    parser.add_argument(
        '--force', action='store_true', help='rebuild even if up to date')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns 0 or raises ``SystemExit``."""
    args = parse_args(argv)
    sources = DEFAULT_SOURCES if args.sources is None else tuple(
        (f'{s}.png', f'{s}.xml') for s in args.sources)
    params = make_params(sources, args.tile, args.min_visible,
                         args.val_fraction, args.seed,
                         args.max_tiles_per_image)
    try:
        wheel_sha = None
        if args.wheel is not None:
            open_wheel(args.wheel).close()
            wheel_sha = sha256_of(args.wheel)
        if not args.force and is_prepared(args.out, params, wheel_sha):
            print(f'demo data already prepared at {args.out} '
                  '(use --force to rebuild)')
            return 0
        wheel = args.wheel or download_wheel(args.cache)
        meta = build_dataset(
            wheel,
            args.out,
            sources=sources,
            tile=args.tile,
            min_visible=args.min_visible,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_tiles_per_image=args.max_tiles_per_image)
    except PrepareError as err:
        raise SystemExit(f'prepare_demo: error: {err}') from None
    print(format_summary(meta, args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
