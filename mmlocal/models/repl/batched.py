"""Batched synthesis: every replaced block of a backbone in a few large ops.

The per-block path (:meth:`~.synthesis.BlockReplacement.synthesize`) runs
the transformation once per tensor (or per pair of norm vectors) of every
replaced block, then folds each norm into its conv and updates each norm's
running statistics with a dozen small ops: +110-166 kernels per replaced
Bottleneck and step (``tools/analysis/count_ops.py``). On a GPU a step of
small kernels is bound by their launches. This module computes the same
tensors with the same formulas, batched:

1. **gather**: one ``cat`` of every transformation parameter of the
   backbone and one of every neighbour tensor (projected ones included),
   laid out so that each *class* -- the items (a transform and the tensors
   it maps) of equal transform type and shapes, e.g. ``conv1`` of
   ``layer3.{1,3,5}`` -- is a contiguous ``(n, C_out, cols)`` view. For
   ResNet light layers all norm vectors form one class, zero-padded to
   the widest (exact: a zero channel adds nothing and gets no gradient).
   In a training forward of the backbone (:meth:`RepLBackbone.forward`)
   the neighbour tensors are gathered by :class:`_GatherSources`, which
   also hands each neighbour block an alias of its own parameter for that
   forward (:meth:`BatchedSynthesis.shared_sources`): the two gradients of
   a neighbour parameter (its own use, the synthesis) are then added for
   all parameters in a few ``foreach`` ops instead of one ``add`` each;
2. **transform**: one batched call per class, both neighbours in the same
   ops (:meth:`~.transforms.BaseRepLTransform.batched`: 2 ops for the scalar
   and per-channel mixes, 4 for the low-rank one, whatever ``n``; the
   low-rank one has a hand-written backward of 7 ops). The matrix classes
   of the per-channel and low-rank mixes (ResNet-50: six conv shapes) are
   one **tiled** call instead (:class:`_TiledMix`, from three classes
   on): every matrix cut into equal ``h x w`` tiles, 12 ops forward and
   16 backward for all of them;
3. **fold** (ResNet light layer): every norm of every replaced block at
   once, ``s = gamma / sqrt(var + eps)``, ``b = beta - s mu`` over the
   concatenated vectors; ``W * s`` inside each conv class's transform
   call;
4. **statistics**: each conv updates, in one kernel
   (``torch.batch_norm_update_stats``), running statistics kept in the
   conv's *output* space (mean ``beta``, variance ``s^2 var``: the affine
   map ``y = s z + b`` commutes with the running average); they are mapped
   back to the norms' buffers for all norms at once after the last
   replaced block (:meth:`BatchedSynthesis.flush`).

The result is the same as the per-block path up to float rounding (tested
to 1e-5: outputs, gradients and statistics). The synthesised tensors of a
forward pass are computed when the first replaced block runs and used by
the others; they are recomputed when a block's entry was used already,
when a backward pass went through them (``LocalLearner`` backpropagates
module by module), when the grad mode changed, or when a parameter or
buffer they depend on was modified in place.

Used for ``layer='light'`` (``synthesis='batched'``, the default); not for
``layer='full'`` (the stock forward reads the tensors as attributes), for
custom transforms that are not column-separable, for blocks that keep own
parameters, or for norms with ``momentum=None``: those keep the per-block
path. The first training pass after a reset of the statistics runs the
per-block path too (it calibrates them from the batch).
"""
import contextlib
import math

import torch
from torch._utils import _flatten_dense_tensors

from mmlocal.utils.compile import CompiledMethods, check_compile_option
from .light import STATS_READY
from .synthesis import OWN, PROJ, RULE_SOURCES, SAME, _module

#: the most tiles (both sides) of a tiled group (its 0/1 matrices grow
#: with the tiles times the blocks or column blocks)
MAX_TILES = 4096
#: the fewest matrix classes worth a tiled group (with two, e.g. a ViT's
#: fc1 and fc2, the tiled call launches about as many kernels as the two
#: batched calls: 263 vs 264 per tiny ViT step, and computes more)
MIN_TILED_CLASSES = 3


class _Item:
    """One transform call of the per-block path: a transform and the
    tensors it maps (a matrix, or the vectors of one layer)."""

    def __init__(self, rep, index, tkey, tensors, shape):
        self.rep = rep  # position in BatchedSynthesis.reps
        self.index = index
        self.tkey = tkey
        self.tensors = tensors  # [(path, name)]
        self.shape = shape  # of each tensor
        self.vector = len(shape) == 1
        self.channels = shape[0]
        self.cols = len(tensors) if self.vector else \
            int(torch.Size(shape).numel()) // shape[0]


class BatchedSynthesis:
    """Synthesis (and, for ResNet light layers, folding and statistics) of
    all replaced blocks of a :class:`~.repl_backbone.RepLBackbone` in
    batched ops (see the module docstring).

    Args:
        reps (list[BlockReplacement]): The replacements, in forward order.
        compile (bool | dict): Run the pure tensor computation (gather,
            transforms, fold: :meth:`_compute`, static shapes) under
            ``torch.compile`` through :mod:`mmlocal.utils.compile` (True:
            inductor's defaults; a dict: ``torch.compile``
            arguments, e.g. ``dict(backend='aot_eager')``). Default False.
    """

    def __init__(self, reps, compile=False):
        self.reps = list(reps)
        self.compile = check_compile_option(compile, 'compile_synthesis')
        self._compiler = CompiledMethods(self.compile)
        self._cache = None
        self._pending = None
        self._zero_bufs = {}
        self._tile_bufs = {}
        self._max_pad = 0
        self._shared = None
        # host work kept between steps (parameter objects are stable
        # during training, as an optimizer or DDP assumes; reset() drops
        # them): the transform parameters in layout order, the source
        # layout of shared_sources; and the folded norms of this pass
        self._param_leaves = None
        self._gather_plan = None
        self._pass_norms = None
        self._dep_lists = None
        self.reason = self._unsupported()
        if self.reason is None:
            self._plan()

    # ------------------------------------------------------------ plan
    def _unsupported(self):
        for rep in self.reps:
            if rep.light is None:
                return "layer='full'"
            if any(r == OWN for r in rep.rules.values()):
                return f'{rep.block_name} keeps own parameters'
            for t in rep.transforms.values():
                if not getattr(type(t), 'batched', None) or not getattr(
                        t, 'column_separable', False):
                    return f'{type(t).__name__} has no batched form'
            if rep.light.kind != 'vit':
                for conv, norm in _pairs(rep):
                    if conv.bias is not None or norm.momentum is None:
                        return (f'{rep.block_name}: conv bias or cumulative '
                                'norm momentum')
        return None

    def _plan(self):
        items = []
        for r, rep in enumerate(self.reps):
            groups = {}
            for path, name in rep.synthesized:
                shape = tuple(rep.shapes[(path, name)])
                tkey = rep._transform_of[(path, name)]
                key = (tkey, shape) if len(shape) == 1 else \
                    (tkey, path, name)
                groups.setdefault(key, []).append((path, name))
            for key, tensors in groups.items():
                items.append(
                    _Item(r, len(items), key[0], tensors,
                          rep.shapes[tensors[0]]))
        # ResNet light layers: every vector is a norm's weight or bias
        # that is folded into its conv (gathered from the class output by
        # one index); then vectors of every width share one class: their
        # channels (and tensor counts) are zero-padded to the largest,
        # which keeps the result exact (a zero channel has zero
        # coefficients, contributes nothing to the channel mixing and gets
        # no gradient) for a few extra KiB instead of one batched call per
        # width
        self.pad_vectors = all(rep.light.kind != 'vit' for rep in self.reps)
        classes = {}
        for item in items:
            t = self.reps[item.rep].transforms[item.tkey]
            shapes = tuple((n, tuple(p.shape))
                           for n, p in t.named_parameters())
            if item.vector and self.pad_vectors:
                key = (type(t), True,
                       tuple((n, s[1:], len(s)) for n, s in shapes))
            elif item.vector:
                key = (type(t), True, item.channels, item.cols, shapes)
            else:
                key = (type(t), False, item.channels, item.cols, shapes)
            classes.setdefault(key, []).append(item)
        # vector classes first: the matrix classes are then one contiguous
        # region of the gathered buffers (the tiled group, _plan_tiles)
        self.classes = sorted(classes.values(), key=lambda c: not c[0].vector)
        # padded size of each class: (channels, cols)
        self.class_dims = [(max(i.channels for i in cls),
                            max(i.cols for i in cls))
                           for cls in self.classes]
        self.param_names = [[
            name for pair in type(self.reps[c[0].rep].transforms[
                c[0].tkey]).pairs for name in pair
        ] for c in self.classes]
        # ResNet light layers: (rep, conv path, norm path) per folded conv,
        # ordered class by class so that the scales of one conv class are
        # one contiguous slice
        self.folds = []
        self.fold_slices = {}
        for ci, cls in enumerate(self.classes):
            if cls[0].vector:
                continue
            start = sum(
                self.reps[r].block.get_submodule(p).out_channels
                for r, p, _ in self.folds)
            n = 0
            for item in cls:
                rep = self.reps[item.rep]
                if rep.light.kind == 'vit':
                    continue
                path = item.tensors[0][0]
                norm = _norm_of(rep, path)
                if norm is None:
                    continue
                self.folds.append((item.rep, path, norm))
                n += 1
            if n:
                if n != len(cls):  # pragma: no cover - same block kinds
                    raise RuntimeError('mixed conv class')
                self.fold_slices[ci] = (start, n)
        # what the pure computation needs, as plain values (no module
        # access inside it: torch.compile traces it)
        self.class_meta = []
        for ci, cls in enumerate(self.classes):
            first = self.reps[cls[0].rep].transforms[cls[0].tkey]
            c, cols = self.class_dims[ci]
            self.class_meta.append(
                (len(cls), c, cols, cls[0].vector, type(first).batched,
                 [(pair, (c, ) + tuple(getattr(first, pair[0]).shape[1:])
                   if getattr(first, pair[0]).dim() else ())
                  for pair in type(first).pairs]))
        # the longest zero pad a leaf list needs (one buffer, made once)
        self._max_pad = max([0] + [
            c * max([cols] + [_numel(shape[1:]) for _, shape in shapes])
            for _, c, cols, _, _, shapes in self.class_meta
        ])
        self.fold_meta = [(ci, start, n, self.classes[ci][0].channels)
                          for ci, (start, n) in self.fold_slices.items()]
        self.fold_channels = [
            self.reps[r].block.get_submodule(p).out_channels
            for r, p, _ in self.folds
        ]
        # every matrix class in one tiled call where the transforms allow
        # it (see _TiledMix); None: one batched call per class
        self.tile = self._plan_tiles()
        group = self.tile['group'] if self.tile else ()
        # the parameter layout: (class, pair) in order; the tiled group's
        # pairs last, pair-major over its classes (each pair of the group
        # one contiguous region)
        self.param_layout = [(ci, k) for ci, meta in enumerate(
            self.class_meta) if ci not in group for k in range(len(meta[5]))]
        if group:
            self.param_layout += [(ci, k) for k in range(
                len(self.class_meta[group[0]][5])) for ci in group]

        # sizes of the pieces the flat parameter / source buffers are split
        # into (one split each: slicing pieces one by one would give each a
        # full-size gradient buffer in backward); the tiled group's
        # parameters in one piece per kind (the coefficients, the low-rank
        # factors) and its sources in one piece
        def psize(ci, k):
            n, shapes = self.class_meta[ci][0], self.class_meta[ci][5]
            return 2 * n * _numel(shapes[k][1])

        self.param_part = {}
        self.param_sizes = []
        for ci, k in self.param_layout:
            if ci in group:
                continue
            self.param_part[(ci, k)] = len(self.param_sizes)
            self.param_sizes.append(psize(ci, k))
        if group:
            self.param_sizes.append(sum(psize(ci, 0) for ci in group))
            if self.tile['low_rank']:
                self.param_sizes.append(
                    sum(psize(ci, k) for ci in group for k in (1, 2)))
        self.source_sizes = [
            2 * n * c * cols for ci, (n, c, cols, _, _, _) in enumerate(
                self.class_meta) if ci not in group
        ]
        if group:
            self.source_sizes.append(
                sum(2 * self.class_meta[ci][0] * self.class_meta[ci][1] *
                    self.class_meta[ci][2] for ci in group))
        # raw synthesised tensors handed to the blocks (all but the folded
        # ResNet convs); vectors are split out of each vector class
        self.raw_keys = []
        for ci, cls in enumerate(self.classes):
            if cls[0].vector and self.pad_vectors:
                continue  # folded: gathered by fold_index
            if cls[0].vector:
                for item in cls:
                    self.raw_keys.extend(
                        (item.rep, key) for key in item.tensors)
            elif ci not in self.fold_slices:
                self.raw_keys.extend(
                    (item.rep, item.tensors[0]) for item in cls)
        self.raw_index = {k: i for i, k in enumerate(self.raw_keys)}
        # positions of the folded norms' weights, then biases, in the
        # flattened [item, C, vector] output of the (padded) vector class
        self.fold_index = None
        if self.pad_vectors and self.folds:
            where = {}
            for ci, cls in enumerate(self.classes):
                if not cls[0].vector:
                    continue
                c, cols = self.class_dims[ci]
                for i, item in enumerate(cls):
                    for j, key in enumerate(item.tensors):
                        where[(item.rep, key)] = (ci, i * c * cols + j, cols)
            index = []
            for name in ('weight', 'bias'):
                for (r, path, norm), width in zip(self.folds,
                                                  self.fold_channels):
                    ci, start, step = where[(r, (norm, name))]
                    index.extend(range(start, start + width * step, step))
            self.fold_class = ci
            self.fold_index = index
        else:
            self.fold_gamma = [
                self.raw_index[(r, (norm, 'weight'))]
                for r, _, norm in self.folds
            ]
            self.fold_beta = [
                self.raw_index[(r, (norm, 'bias'))]
                for r, _, norm in self.folds
            ]
        self.fold_class_sizes = [n * c for _, _, n, c in self.fold_meta]

    def _plan_tiles(self):
        """The tiled group (:class:`_TiledMix`): every matrix class in one
        call, or None (one batched call per class).

        The classes differ in ``(C_out, cols)`` (ResNet-50: six conv
        shapes), so each would be its own batched call. A column-separable
        transform maps column blocks independently and mixes rows only
        through per-row coefficients and (low-rank) a reduction over the
        rows: every item is cut into ``h x w`` tiles (``h``, ``w`` the
        greatest common divisors of the classes' ``C_out`` and ``cols``),
        each tile gets its rows' coefficients by a 0/1 matrix product and
        the low-rank reduction is summed over the tiles of a column block
        by two more: the same values, in one set of ops for all classes.
        Used for :class:`~.transforms.RepLChannelMix` and
        :class:`~.transforms.RepLLowRankMix` (``tiled``) when there are
        :data:`MIN_TILED_CLASSES` classes or more, all of one transform and
        rank, all folded or none, and at most :data:`MAX_TILES` tiles.
        """
        group = [ci for ci, cls in enumerate(self.classes)
                 if not cls[0].vector]
        if len(group) < MIN_TILED_CLASSES:
            return None
        kinds = {
            type(self.reps[self.classes[ci][0].rep].transforms[
                self.classes[ci][0].tkey])
            for ci in group
        }
        kind = getattr(next(iter(kinds)), 'tiled', None)
        if len(kinds) != 1 or kind not in ('channel', 'low_rank'):
            return None
        low_rank = kind == 'low_rank'
        r = 0
        if low_rank:
            ranks = {
                shape[1:]
                for ci in group for _, shape in self.class_meta[ci][5][1:]
            }
            if len(ranks) != 1 or len(next(iter(ranks))) != 1:
                return None
            r = next(iter(ranks))[0]
        folded = [ci in self.fold_slices for ci in group]
        if any(folded) and (not all(folded) or
                            [m[0] for m in self.fold_meta] != group):
            return None
        meta = {ci: self.class_meta[ci][:3] for ci in group}  # n, c, cols
        h = math.gcd(*(c for _, c, _ in meta.values()))
        w = math.gcd(*(cols for _, _, cols in meta.values()))
        if 2 * sum(n * (c // h) * (cols // w)
                   for n, c, cols in meta.values()) > MAX_TILES:
            return None
        # offsets of each class in the group's source region and
        # coefficient region ([2, n, C, ...]: prev side, then next side)
        src_off, a_off = {}, {}
        o = oa = 0
        for ci in group:
            n, c, cols = meta[ci]
            src_off[ci], a_off[ci] = o, oa
            o += 2 * n * c * cols
            oa += 2 * n * c
        # the tiles of one side (item order, then row block, column
        # block) and, per output row of w columns, its tile row
        tiles, items, sizes = [], [], []
        out_index = [0] * (o // 2 // w)
        out_off = 0
        for ci in group:
            n, c, cols = meta[ci]
            for i, item in enumerate(self.classes[ci]):
                items.append(item)
                sizes.append(c * cols)
                for ri in range(c // h):
                    for j in range(cols // w):
                        t = len(tiles)
                        tiles.append((ci, i, ri, j))
                        for rho in range(h):
                            out_index[(out_off + (ri * h + rho) * cols +
                                       j * w) // w] = t * h + rho
                out_off += c * cols
        seg, keys, blk_a, blk_s = [], [], [], []
        for side in (0, 1):
            for ci, i, ri, j in tiles:
                n, c, cols = meta[ci]
                k = side * n + i  # the item's row in its class's [2n, ...]
                base = src_off[ci] + k * c * cols + ri * h * cols + j * w
                seg.extend((base + rho * cols) // w for rho in range(h))
                keys.append((side, ci, i, j))
                blk_a.append((a_off[ci] + k * c + ri * h) // h)
        # (the u and v regions have the coefficient region's layout with
        # r columns per channel: a tile's block is the same in all three)
        if folded[0]:
            for ci, i, ri, _ in tiles:
                c = meta[ci][1]
                blk_s.append((self.fold_slices[ci][0] + i * c + ri * h) // h)
        ids = {key: v for v, key in enumerate(dict.fromkeys(keys))}
        return dict(
            group=tuple(group), low_rank=low_rank, folded=folded[0],
            dims=(len(tiles), h, w, r), items=items, item_sizes=sizes,
            seg=seg, out_index=out_index, blk_a=(blk_a, oa // h),
            blk_s=(blk_s, sum(self.fold_channels) // h if folded[0] else 0),
            groups=([ids[key] for key in keys], len(ids)))

    # ------------------------------------------------------- leaves
    def _leaves(self):
        """``(params, sources)``: the flat lists the pure computation
        reads, in the layout of :meth:`_compute` (zero pads of the vector
        classes included)."""
        shared, self._shared = self._shared, None
        params = self._params()
        if shared is not None:  # gathered by shared_sources
            return params, [shared]
        sources = []
        for ci, cls in enumerate(self.classes):
            c, cols = self.class_dims[ci]
            for side in (0, 1):
                for item in cls:
                    rep = self.reps[item.rep]
                    for path, name in item.tensors:
                        t = _side_tensor(rep, side, path, name)
                        sources.append(t)
                        if item.vector and item.channels < c:
                            sources.append(self._zeros(t, c - item.channels))
                    if item.cols < cols:  # vector items only
                        sources.append(self._zeros(t, (cols - item.cols) * c))
        return params, sources

    def _params(self):
        """The transform parameters (and zero pads) in layout order; made
        once, again after :meth:`reset` or a move to another device or
        dtype."""
        first = self.reps[self.classes[0][0].rep].transforms[
            self.classes[0][0].tkey]
        like = next(first.parameters())
        cached = self._param_leaves
        if cached is not None and cached[0] == (like.dtype, like.device) \
                and cached[1][0] is like:
            return cached[1]
        params = []
        for ci, k in self.param_layout:
            cls = self.classes[ci]
            c, cols = self.class_dims[ci]
            for pname in self.param_names[ci][2 * k:2 * k + 2]:
                for item in cls:
                    p = getattr(self.reps[item.rep].transforms[item.tkey],
                                pname)
                    params.append(p)
                    if p.dim() and p.shape[0] < c:
                        params.append(
                            self._zeros(p, (c - p.shape[0]) *
                                        (p.numel() // p.shape[0])))
        self._param_leaves = ((like.dtype, like.device), params)
        self._dep_lists = None  # (parameters moved or replaced)
        return params

    def _zeros(self, like, n):
        """A 1-d zero tensor of ``n`` elements, a view of a buffer made
        once; the views are kept too (no kernel, no dispatch per step)."""
        key = (like.dtype, like.device)
        view = self._zero_bufs.get(key + (n, ))
        if view is not None:
            return view
        buf = self._zero_bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, self._max_pad), dtype=like.dtype,
                              device=like.device)
            self._zero_bufs = {key: buf}  # views of an older buffer: gone
        view = self._zero_bufs[key + (n, )] = buf[:n]
        return view

    def _dependency_lists(self):
        """Per replaced block, the leaves its tensors depend on: its
        transforms' and projections' parameters, the neighbour parameters
        it reads and its folded norms' statistics. Kept like the parameter
        list (host work: no module walk per step); the neighbours'
        parameters themselves, also when found inside
        :meth:`shared_sources` (an alias shares its parameter's version
        counter)."""
        if self._dep_lists is None:
            lists = {}
            for r, rep in enumerate(self.reps):
                lists[r] = [
                    t if t._base is None else t._base
                    for t in _dependencies(rep)
                ]
            for (r, _, _), norm in zip(self.folds, self._norms()):
                lists[r].extend((norm.running_mean, norm.running_var))
            self._dep_lists = lists
        return self._dep_lists

    def _norms(self):
        """The folded norm modules, looked up once per forward pass."""
        if self._pass_norms is None:
            self._pass_norms = [self.reps[r].block.get_submodule(p)
                                for r, _, p in self.folds]
        return self._pass_norms

    def _stats(self):
        means, variances, eps = [], [], []
        for norm in self._norms():
            means.append(norm.running_mean)
            variances.append(norm.running_var)
            eps.append(norm.eps)
        return means, variances, eps

    # ------------------------------------------------------ compute
    def _compute(self, params, sources, means, variances, eps,
                 fold_index=None, tile_tensors=None):
        """Pure tensor computation.

        Returns:
            tuple: ``raw`` (the synthesised tensors of :attr:`raw_keys`),
            and for the ResNet light layers (else None) ``(weights, shifts,
            scale, shift, beta, var, mean)``: the folded weight and shift of
            each conv of :attr:`folds`, and the flat vectors the statistics
            need.
        """
        # (one C++ loop of views and one cat each: no Python per tensor)
        flat_p = _flatten_dense_tensors(params)
        # (one tensor: the buffer shared_sources gathered)
        flat_s = sources[0].reshape(-1) if len(sources) == 1 else \
            _flatten_dense_tensors(sources)
        p_parts = flat_p.split(self.param_sizes)
        s_parts = flat_s.split(self.source_sizes)
        tile = self.tile
        group = tile['group'] if tile else ()

        def run(ci, scale=None):
            n, c, cols, vector, batched, shapes = self.class_meta[ci]
            stacked = {}
            for k, (pair, shape) in enumerate(shapes):
                # prev side's n, then next side's
                stacked[pair] = p_parts[self.param_part[(ci, k)]].view(
                    (2 * n, ) + shape)
            if vector:  # [side, item, vector, C] -> [., C, vector]
                out = batched(stacked,
                              s_parts[ci].view(2 * n, cols, c).transpose(1, 2))
                if self.pad_vectors:  # read by fold_index
                    return out
                # [item, vector, C], each vector its own contiguous piece
                return out.transpose(1, 2).reshape(n * cols, c)
            return batched(stacked, s_parts[ci].view(2 * n, c, cols), scale)

        def run_group(scale=None):
            """Every item of the tiled group, in class order."""
            low_rank = tile['low_rank']
            flat = _TiledMix.apply(s_parts[-1], p_parts[-1 - low_rank],
                                   p_parts[-1] if low_rank else None, scale,
                                   tile['dims'], *tile_tensors)
            return [
                t.view(item.shape)
                for t, item in zip(flat.split(tile['item_sizes']),
                                   tile['items'])
            ]

        # the classes that are not folded first (the folds need the norms)
        outs, raw = {}, []
        for ci, (n, c, cols, vector, _, _) in enumerate(self.class_meta):
            if ci in self.fold_slices:
                continue
            if ci in group:  # not folded: the whole group once
                if ci == group[0]:
                    raw.extend(run_group())
                continue
            out = outs[ci] = run(ci)
            if vector and not self.pad_vectors:
                raw.extend(out.unbind(0))
            elif not vector:
                raw.extend(
                    t.view(item.shape)
                    for t, item in zip(out.unbind(0) if n > 1 else [out],
                                       self.classes[ci]))
        if not self.folds:
            return raw, None
        if fold_index is not None:  # one gather: weights, then biases
            gamma, beta = outs[self.fold_class].view(-1).index_select(
                0, fold_index).chunk(2)
        else:
            gamma = torch.cat([raw[i] for i in self.fold_gamma])
            beta = torch.cat([raw[i] for i in self.fold_beta])
        mean, var = torch.cat(means + variances).chunk(2)
        if len(set(eps)) == 1:
            scale = gamma * torch.rsqrt(var + eps[0])
        else:
            e = torch.cat(
                [torch.full_like(m, v) for m, v in zip(means, eps)])
            scale = gamma * torch.rsqrt(var + e)
        shift = torch.addcmul(beta, mean, scale, value=-1)
        if group and group[0] in self.fold_slices:
            # every conv of every class and the fold's W * s: one call
            weights = run_group(scale)
        else:
            weights = []
            # the transform and the fold's W * s in one call per conv class
            for (ci, _, n, c), s in zip(self.fold_meta,
                                        scale.split(self.fold_class_sizes)):
                folded = run(ci, s.view(n, c))
                # (one item: a view, no stack of one gradient in backward)
                weights.extend(
                    t.view(item.shape) for t, item in zip(
                        folded.unbind(0) if n > 1 else [folded],
                        self.classes[ci]))
        shifts = shift.split(self.fold_channels)
        return raw, (weights, shifts, scale, shift, beta, var, mean)

    def _run(self):
        leaves = self._leaves()
        stats = self._stats() if self.folds else ([], [], [])
        like = leaves[0][0]
        index = None
        if self.fold_index is not None:
            index = self._zero_bufs.get(('index', like.device))
            if index is None:
                index = torch.tensor(self.fold_index, device=like.device)
                self._zero_bufs[('index', like.device)] = index
        tiles = None
        if self.tile is not None:
            key = (like.dtype, like.device)
            tiles = self._tile_bufs.get(key)
            if tiles is None:
                tiles = self._tile_bufs[key] = _tile_tensors(
                    self.tile, like.dtype, like.device)
        # (eager unless compile_synthesis: mmlocal.utils.compile); in the
        # parameters' own precision under AMP too: the convs cast the
        # synthesised weights as they cast any weight, and the statistics
        # stay in float32 (bf16 matrix products here made the running
        # statistics bf16, which BN's statistics kernel refused)
        with torch.autocast(like.device.type, enabled=False):
            return self._compiler(self, '_compute', *leaves, *stats, index,
                                  tiles), leaves

    # --------------------------------------------------- shared sources
    def _source_owners(self):
        """Every source tensor of the layout of :meth:`_compute`, with
        ``(module, name)`` where it is a neighbour's own parameter (else
        None: projected tensors, zero pads)."""
        out = []
        for ci, cls in enumerate(self.classes):
            c, cols = self.class_dims[ci]
            for side in (0, 1):
                for item in cls:
                    rep = self.reps[item.rep]
                    how = None
                    for path, name in item.tensors:
                        t = _side_tensor(rep, side, path, name)
                        how = RULE_SOURCES[rep.rules[(path, name)]]
                        src = side if how[side] is not None else 1 - side
                        owner = None
                        if how[src] == SAME:
                            module = _module(rep._neighbours[src], path)
                            if module._parameters.get(name) is t:
                                owner = (module, name)
                        out.append((t, owner))
                        if item.vector and item.channels < c:
                            out.append((self._zeros(t, c - item.channels),
                                        None))
                    if item.cols < cols:
                        out.append((self._zeros(t, (cols - item.cols) * c),
                                    None))
        return out

    def _gather_layout(self):
        """``(inputs, layout, aliased, owners, sizes)`` of
        :class:`_GatherSources`
        for :meth:`shared_sources`: kept between steps unless a source is
        computed (projected), again after :meth:`reset` or a move."""
        cached = self._gather_plan
        if cached is not None:
            key, out = cached
            inputs, _, aliased, _, _ = out
            if key == (inputs[0].dtype, inputs[0].device) and \
                    all(inputs[i].requires_grad for i in aliased):
                return out
        pairs = self._source_owners()
        inputs, index, layout, owners = [], {}, [], []
        for t, owner in pairs:
            i = index.get(id(t))
            if i is None:
                i = index[id(t)] = len(inputs)
                inputs.append(t)
                owners.append(None)
            if owner is not None:
                owners[i] = owner
            layout.append(i)
        aliased = tuple(i for i, o in enumerate(owners)
                        if o is not None and inputs[i].requires_grad)
        # the size of each piece of the flat buffer (split in backward)
        sizes = tuple(inputs[i].numel() for i in layout)
        out = (inputs, tuple(layout), aliased, owners, sizes)
        projected = any(how == PROJ for rep in self.reps
                        for rule in rep.rules.values()
                        for how in RULE_SOURCES.get(rule, ()))
        self._gather_plan = None if projected else \
            ((inputs[0].dtype, inputs[0].device), out)
        return out

    @contextlib.contextmanager
    def shared_sources(self):
        """Run the backbone's forward with every neighbour parameter that
        the synthesis reads replaced, for the duration of the forward, by
        an alias produced together with the gathered source buffer by one
        autograd function (:class:`_GatherSources`).

        A neighbour parameter is used twice: by its own block and by the
        synthesis. Through the alias both gradients reach that function,
        which adds them for all parameters in a few ``foreach`` ops; used
        directly, autograd would add them one parameter at a time (about
        80 kernels per step for ResNet-50 i2). Values and gradients are the
        same. Only with gradients enabled, when the batched path runs and
        no neighbour checkpoints its forward (``with_cp``); otherwise a
        no-op.
        """
        reps = self.reps
        if not torch.is_grad_enabled() or not self.usable(reps[0]) or any(
                getattr(b, 'with_cp', False) for rep in reps
                for b in rep._neighbours if b is not None):
            yield
            return
        inputs, layout, aliased, owners, sizes = self._gather_layout()
        if not aliased:
            yield
            return
        flat, *aliases = _GatherSources.apply((layout, sizes), aliased,
                                              *inputs)
        swapped = []
        try:
            for i, alias in zip(aliased, aliases):
                module, name = owners[i]
                swapped.append((module, name, module._parameters[name]))
                module._parameters[name] = alias
            self._shared = flat
            yield
        finally:
            self._shared = None
            for module, name, param in reversed(swapped):
                module._parameters[name] = param

    # ----------------------------------------------------- per block
    def usable(self, rep):
        """Whether ``rep``'s forward can take the batched path now."""
        if self.reason is not None:
            return False
        if rep is self.reps[0]:  # a new pass: look the norms up again
            self._pass_norms = None
        if rep.block.training:
            # the first training pass after a reset calibrates the
            # statistics from the batch: per-block path
            for norm in self._norms():
                if not getattr(norm, STATS_READY, False):
                    return False
        return True

    def entry(self, rep):
        """``(tensors, folds)`` of ``rep`` for this forward: its synthesised
        tensors ``{(path, name): tensor}`` other than the folded convs', and
        for a ResNet light layer ``{conv path: (folded weight, shift,
        output-space mean, variance, fold index, cache)}`` (else None)."""
        r = self.reps.index(rep)
        cache = self._cache
        if cache is None or not cache.valid(r, rep):
            self.flush()
            cache = self._cache = _Cache(self)
        cache.used.add(r)
        out = cache.tensors(r), cache.folds(r)
        return out

    def after_forward(self, rep):
        """After ``rep``'s forward: the last block of the pass writes the
        statistics back and drops the cache."""
        if rep is self.reps[-1]:
            self.flush()
            self._cache = None

    def flush(self):
        """Write the statistics updated in the convs' output space back to
        the norms' buffers (those whose conv ran)."""
        pending, self._pending = self._pending, None
        if not pending:
            return
        cache, ran = pending
        with torch.no_grad():
            s, t = cache.scale.detach(), cache.shift.detach()
            ok = s.abs() > 1e-12
            inv = s.reciprocal()  # (inf where s == 0: not selected below)
            mean = torch.where(ok, (cache.aux_mean - t) * inv, cache.mean)
            var = torch.where(ok, cache.aux_var * inv * inv, cache.var)
            sizes = [len(m) for m in cache.means]
            idx = sorted(ran)
            new_m = mean.split(sizes)
            new_v = var.split(sizes)
            torch._foreach_copy_(
                [cache.means[i] for i in idx] + [cache.vars[i] for i in idx],
                [new_m[i] for i in idx] + [new_v[i] for i in idx])
            torch._foreach_add_([cache.counts[i] for i in idx], 1)

    def reset(self):
        """Drop the cache and any pending statistics (the buffers are
        about to be reset or loaded), and the parameter lists kept between
        steps (call it after replacing parameter objects)."""
        self._cache = None
        self._pending = None
        self._param_leaves = None
        self._gather_plan = None
        self._pass_norms = None
        self._dep_lists = None

    def mark_ran(self, cache, fold):
        if self._pending is None:
            self._pending = (cache, set())
        elif self._pending[0] is not cache:  # pragma: no cover
            self.flush()
            self._pending = (cache, set())
        self._pending[1].add(fold)

    def __getstate__(self):
        # deep copies and pickles carry the plan, not a step's tensors
        state = dict(self.__dict__)
        state['_cache'] = None
        state['_pending'] = None
        state['_zero_bufs'] = {}
        state['_tile_bufs'] = {}
        state['_param_leaves'] = None
        state['_gather_plan'] = None
        state['_pass_norms'] = None
        state['_dep_lists'] = None
        return state


class _GatherSources(torch.autograd.Function):
    """``(flat, *aliases)``: the concatenated source buffer of the batched
    synthesis (``layout``: the input of each piece, in order, ``sizes``:
    their numels) and an alias
    (a view) of each input of ``aliased``. In backward each input's
    gradient is its alias's gradient plus that of its pieces, added for all
    inputs at once (one ``foreach`` op per number of terms)."""

    @staticmethod
    def forward(ctx, layout_sizes, aliased, *inputs):
        layout, ctx.sizes = layout_sizes
        ctx.layout, ctx.aliased = layout, aliased
        ctx.shapes = [t.shape for t in inputs]
        ctx.needs = [t.requires_grad for t in inputs]
        flat = _flatten_dense_tensors([inputs[i] for i in layout])
        return (flat, ) + tuple(inputs[i].view_as(inputs[i])
                                for i in aliased)

    @staticmethod
    def backward(ctx, flat_grad, *alias_grads):
        terms = [[] for _ in ctx.shapes]
        for i, g in zip(ctx.aliased, alias_grads):
            if g is not None:
                terms[i].append(g)
        if flat_grad is not None:
            pieces = flat_grad.split(ctx.sizes)
            for i, g in zip(ctx.layout, pieces):
                terms[i].append(g.view(ctx.shapes[i]))
        grads = [t[0] if t and need else None
                 for t, need in zip(terms, ctx.needs)]
        level = 1
        while True:
            idx = [i for i, t in enumerate(terms)
                   if len(t) > level and ctx.needs[i]]
            if not idx:
                break
            more = [terms[i][level] for i in idx]
            if level == 1:  # new tensors (the first terms may be views)
                sums = torch._foreach_add([grads[i] for i in idx], more)
                for i, g in zip(idx, sums):
                    grads[i] = g
            else:
                torch._foreach_add_([grads[i] for i in idx], more)
            level += 1
        return (None, None) + tuple(grads)


def _tile_tensors(tile, dtype, device):
    """The index and 0/1 matrices of a tiled group (made once per dtype
    and device): ``(seg, seg_inv, out_index, out_inv, r_a, r_s, s)``,
    None where the group does not need one."""
    def onehot(blocks):
        rows, n = blocks
        out = torch.zeros(len(rows), n, dtype=dtype, device=device)
        out[torch.arange(len(rows), device=device),
            torch.tensor(rows, dtype=torch.long, device=device)] = 1
        return out

    # (int32: index_select takes it, half the bytes of int64)
    seg = torch.tensor(tile['seg'], dtype=torch.int32, device=device)
    out_index = torch.tensor(tile['out_index'], dtype=torch.int32,
                             device=device)
    r_s = s = None
    if tile['low_rank']:  # (groups x tiles): the tiles of each group
        s = onehot(tile['groups']).t().contiguous()
    if tile['folded']:
        r_s = onehot(tile['blk_s'])
    return (seg, torch.argsort(seg).int(), out_index,
            torch.argsort(out_index).int(), onehot(tile['blk_a']), r_s, s)


class _TiledMix(torch.autograd.Function):
    r"""Every item of a tiled group (:meth:`BatchedSynthesis._plan_tiles`)
    mixed, and scaled by its folded norm, in one set of ops.

    Per tile ``t`` (``h x w``, of item ``i``, side ``s`` (prev, next),
    rows ``R`` of the item, a column block):

    .. math::  Y_t = \mathrm{diag}(s_R) \sum_{s} \big(\mathrm{diag}(a_R)
               W_t + U_R \sum_{t' \sim t} V_{R'}^\top W_{t'}\big)

    where ``t' ~ t`` are the tiles of the same item, side and column block
    (the low-rank reduction over all the item's rows): for one item this
    is ``diag(s) (A W^- + B W^+)``, the transform's formula, on the item's
    columns ``[.., w)``. Inputs: ``src`` the group's gathered sources,
    ``ab`` and ``uv`` its coefficients and low-rank factors (pair-major
    regions), ``scale`` the folded norms' scales (or None); the rows of
    ``w`` columns are permuted into tiles and back by ``seg`` and
    ``out_index``, each tile's rows of the coefficients, factors and
    scales are picked by the 0/1 matrices ``r_a`` (the coefficients and,
    for both factors in one batched product, the low-rank factors: their
    regions share the layout) and ``r_s``, and the reduction over
    ``t' ~ t`` is a product with the ``(groups x tiles)`` 0/1 matrix ``s``
    and one with its transpose. Forward 12 ops, backward 16 (hand-written:
    a permutation's gradient is the inverse permutation, a pick's the
    transposed product; the tiles are gathered again instead of being
    kept).
    """

    @staticmethod
    def forward(ctx, src, ab, uv, scale, dims, seg, seg_inv, out_index,
                out_inv, r_a, r_s, s):
        t, h, w, r = dims
        tiles = src.view(-1, w).index_select(0, seg).view(2 * t, h, w)
        a_t = torch.mm(r_a, ab.view(-1, h))
        both = a_t.unsqueeze(-1) * tiles
        u_t = v_t = low = None
        if uv is not None:
            uvt = torch.bmm(r_a.expand((2, ) + r_a.shape),
                            uv.view(2, -1, h * r)).view(4 * t, h, r)
            u_t, v_t = uvt[:2 * t], uvt[2 * t:]
            low = torch.bmm(v_t.transpose(1, 2), tiles)  # (2T, r, w)
            low = torch.mm(s.t(), torch.mm(s, low.view(2 * t, r * w)))
            low = low.view(2 * t, r, w)
            both = torch.baddbmm(both, u_t, low)
        out = torch.add(both[:t], both[t:])
        s_t = None
        if scale is not None:
            s_t = torch.mm(r_s, scale.view(-1, h))
            res = out * s_t.unsqueeze(-1)
        else:
            res = out
        ctx.dims = dims
        # the gathered buffer, not its tiled copy: the buffer is kept for
        # backward anyway (the vector classes save views of it), the copy
        # would double it; the backward tiles it again (one op)
        ctx.save_for_backward(src, a_t, u_t, v_t, low, s_t,
                              out if scale is not None else None, seg,
                              seg_inv, out_inv, r_a, r_s, s)
        return res.view(-1, w).index_select(0, out_index).view(-1)

    @staticmethod
    def backward(ctx, grad):
        (src, a_t, u_t, v_t, low, s_t, out, seg, seg_inv, out_inv, r_a,
         r_s, s) = ctx.saved_tensors
        t, h, w, r = ctx.dims
        need_src, need_ab, need_uv, need_scale = ctx.needs_input_grad[:4]
        tiles = None
        if need_uv or need_ab:
            tiles = src.view(-1, w).index_select(0, seg).view(2 * t, h, w)
        g = grad.reshape(-1, w).index_select(0, out_inv).view(t, h, w)
        grad_src = grad_ab = grad_uv = grad_scale = None
        if s_t is not None:
            if need_scale:  # sum_j g * out, per tile row
                gs = torch.bmm(g.view(t * h, 1, w), out.view(t * h, w, 1))
                grad_scale = torch.mm(r_s.t(), gs.view(t, h)).view(-1)
            # the output gradient for both sides, scaled, in one op
            g2 = torch.mul(g.unsqueeze(0).expand(2, t, h, w),
                           s_t.unsqueeze(-1))
        else:
            g2 = g.unsqueeze(0).expand(2, t, h, w).contiguous()
        g2 = g2.view(2 * t, h, w)
        glow = None
        if u_t is not None and (need_uv or need_src):
            glow = torch.bmm(u_t.transpose(1, 2), g2)
            glow = torch.mm(s.t(), torch.mm(s, glow.view(2 * t, r * w)))
            glow = glow.view(2 * t, r, w)
        if need_uv:
            buf = g2.new_empty(4 * t, h, r)
            torch.bmm(g2, low.transpose(1, 2), out=buf[:2 * t])
            torch.bmm(tiles, glow.transpose(1, 2), out=buf[2 * t:])
            picks = r_a.t()
            grad_uv = torch.bmm(picks.expand((2, ) + picks.shape),
                                buf.view(2, 2 * t, h * r)).view(-1)
        if need_ab:  # sum_j g * W, per tile row
            ga = torch.bmm(g2.view(2 * t * h, 1, w),
                           tiles.view(2 * t * h, w, 1))
            grad_ab = torch.mm(r_a.t(), ga.view(2 * t, h)).view(-1)
        if need_src:
            gt = a_t.unsqueeze(-1) * g2
            if glow is not None:
                gt = torch.baddbmm(gt, v_t, glow)
            grad_src = gt.view(-1, w).index_select(0, seg_inv).view(-1)
        return (grad_src, grad_ab, grad_uv, grad_scale) + (None, ) * 8


class _Cache:
    """The batched tensors of one forward pass."""

    def __init__(self, engine):
        self.engine = engine
        self.grad = torch.is_grad_enabled()
        self.used = set()
        self.stale = False
        (raw, fold), _ = engine._run()
        self.raw = raw
        # what each rep's tensors depend on (leaves), to notice in-place
        # changes (an optimizer step, a load) before the cache is used
        self.deps = engine._dependency_lists()
        self.versions = {r: [t._version for t in ts]
                         for r, ts in self.deps.items()}
        self.fold = fold is not None
        watched = list(raw)
        if self.fold:
            (self.weights, self.shifts, self.scale, self.shift, beta, var,
             mean) = fold
            watched.append(self.scale)
            self.mean, self.var = mean, var
            self.means, self.vars, _ = engine._stats()
            self.counts = [norm.num_batches_tracked
                           for norm in engine._norms()]
            with torch.no_grad():
                s = self.scale.detach()
                # y = s z + b: the output-space running mean is beta, the
                # variance s^2 var
                self.aux_mean = beta.detach().clone()
                self.aux_var = s * s * var
                self.aux = list(
                    zip(self.aux_mean.split(engine.fold_channels),
                        self.aux_var.split(engine.fold_channels)))
        if self.grad:
            # a backward through them frees their graph: recompute after
            for t in watched:
                if t.requires_grad:
                    t.register_hook(self._consumed)

    def _consumed(self, grad):
        self.stale = True
        return grad

    def valid(self, r, rep):
        if self.stale or r in self.used or \
                self.grad != torch.is_grad_enabled():
            return False
        deps = self.deps.get(r)
        return deps is None or [t._version for t in deps] == \
            self.versions[r]

    def tensors(self, r):
        return {
            key: self.raw[i]
            for (rr, key), i in self.engine.raw_index.items() if rr == r
        }

    def folds(self, r):
        if not self.fold:
            return None
        out = {}
        for i, (rr, path, _) in enumerate(self.engine.folds):
            if rr == r:
                out[path] = (self.weights[i], self.shifts[i], *self.aux[i],
                             i, self)
        return out


def _numel(shape):
    out = 1
    for d in shape:
        out *= d
    return out


def _pairs(rep):
    block = rep.block
    if rep.light.kind == 'bottleneck':
        return [(block.conv1, block.norm1), (block.conv3, block.norm3)]
    return [(block.conv2, block.norm2)]


def _norm_of(rep, conv_path):
    block = rep.block
    names = {'conv1': 'norm1_name', 'conv2': 'norm2_name',
             'conv3': 'norm3_name'}
    attr = names.get(conv_path)
    return getattr(block, attr) if attr else None


def _dependencies(rep):
    deps = list(rep.transforms.parameters()) + list(
        rep.projections.parameters())
    for path, name in rep.synthesized:
        for side, how in enumerate(RULE_SOURCES[rep.rules[(path, name)]]):
            if how is not None:
                deps.append(
                    _module(rep._neighbours[side], path)._parameters[name])
    return deps


def _side_tensor(rep, side, path, name):
    how = RULE_SOURCES[rep.rules[(path, name)]]
    t = rep._source(side, how[side], path, name)
    if t is None:  # mirrored: the other neighbour in both slots
        t = rep._source(1 - side, how[1 - side], path, name)
    return t
