"""Memory-balanced split points (InfoPro*-style split by cost, not count).

An even split by block count leaves the modules very unequal in memory: the
early blocks hold large activations, the last module carries the neck and
the heads, and an auxiliary net costs more at a high-resolution boundary.
The training-step peak of local learning is set by the *largest* module, so
the split should minimise that. With per-part costs measured once (see
``tools/analysis/plan_split.py``), the estimated peak of module ``k`` with
range ``[s_k, e_k)`` and cascade span ``w`` is

.. math::
    C_k = [j_k = 0] \\, c_{stem} + \\sum_{b = s_{j_k}}^{e_k - 1} c_b
          + \\begin{cases} a(e_k) & k < K - 1 \\\\ c_{head} & k = K - 1
          \\end{cases}, \\qquad j_k = \\max(0, k - w + 1)

(``c_b``: activations block ``b`` saves for backward, ``a(e)``: peak of the
auxiliary net at the boundary before block ``e``, ``c_head``: peak of the
neck, heads and losses). :func:`balanced_split_points` returns the points
minimising ``max_k C_k``, then the second largest ``C_k`` and so on (so the
other modules keep headroom for the estimate's error).
"""
import itertools

__all__ = ['module_costs', 'balanced_split_points']

# above this many candidate splits: the (largest, total) DP, span 1 only
MAX_COMBINATIONS = 200_000


def _ranges(points, num_blocks):
    bounds = [0] + list(points) + [num_blocks]
    return list(zip(bounds[:-1], bounds[1:]))


def module_costs(points, block_costs, aux_costs, head_cost, stem_cost=0,
                 span=1):
    """Estimated peak of each module for split ``points``.

    Args:
        points (Sequence[int]): Block indices where a new module starts.
        block_costs (Sequence[float]): ``c_b`` per block.
        aux_costs (Mapping[int, float]): ``a(e)`` per allowed split point.
        head_cost (float): ``c_head``, added to the last module.
        stem_cost (float): Added to every window that includes module 0.
        span (int): Modules whose graphs are alive together (cascade
            families: ``cascade_span``; 1 otherwise).

    Returns:
        list[float]: ``C_k`` for ``k = 0..K-1``.
    """
    ranges = _ranges(points, len(block_costs))
    costs = []
    for k, (_, end) in enumerate(ranges):
        first = max(0, k - span + 1) if k < len(ranges) - 1 else k
        start = ranges[first][0]
        cost = sum(block_costs[start:end])
        if first == 0:
            cost += stem_cost
        cost += head_cost if k == len(ranges) - 1 else aux_costs[end]
        costs.append(cost)
    return costs


def _key(costs):
    # the largest module first, then the next largest, ...: the other
    # modules keep as much headroom as they can (the estimate is not exact)
    return sorted(costs, reverse=True)


def balanced_split_points(block_costs, aux_costs, head_cost, num_modules,
                          stem_cost=0, span=1):
    """Split points that minimise the largest estimated module peak.

    Args:
        block_costs, aux_costs, head_cost, stem_cost, span: As in
            :func:`module_costs`; the keys of ``aux_costs`` are the allowed
            split points (e.g. not inside frozen stages).
        num_modules (int): ``K``.

    Returns:
        list[int]: ``K - 1`` strictly increasing split points.

    Raises:
        ValueError: ``num_modules`` larger than the allowed points allow, or
            too many candidate splits to try.
    """
    allowed = sorted(int(p) for p in aux_costs)
    if num_modules < 1:
        raise ValueError(f'num_modules={num_modules} must be >= 1')
    if num_modules - 1 > len(allowed):
        raise ValueError(
            f'num_modules={num_modules} needs {num_modules - 1} split points '
            f'but only {len(allowed)} are allowed: {allowed}')
    if num_modules == 1:
        return []
    count = 1
    for i in range(num_modules - 1):  # C(n, k) without overflow worries
        count = count * (len(allowed) - i) // (i + 1)
    if count <= MAX_COMBINATIONS:
        return list(min(
            itertools.combinations(allowed, num_modules - 1),
            key=lambda pts: _key(module_costs(pts, block_costs, aux_costs,
                                              head_cost, stem_cost, span))))
    if span == 1:  # too many to try: least (largest, total), exactly
        return _minimax_dp(block_costs, aux_costs, head_cost, num_modules,
                           stem_cost, allowed)
    raise ValueError(
        f'{count} candidate splits for num_modules={num_modules} and '
        f'cascade span {span}: too many to try; give split_points')


def _minimax_dp(block_costs, aux_costs, head_cost, num_modules, stem_cost,
                allowed):
    """Exact for ``span == 1`` (modules are independent given their
    ranges), in two passes: the least achievable largest cost ``M``, then
    the least total among the splits whose modules all cost at most ``M``
    (both decompose over prefixes, the pair does not)."""
    prefix = [0.]
    for c in block_costs:
        prefix.append(prefix[-1] + c)
    num_blocks = len(block_costs)

    def cost(start, end):
        c = prefix[end] - prefix[start] + (stem_cost if start == 0 else 0)
        return c + (head_cost if end == num_blocks else aux_costs[end])

    def search(value, combine, feasible):
        # best[e]: (value, points) over modules covering [0, e)
        best = {e: (value(cost(0, e)), [e]) for e in allowed
                if feasible(cost(0, e))}
        for k in range(1, num_modules):
            ends = [num_blocks] if k == num_modules - 1 else allowed
            nxt = {}
            for e in ends:
                options = [(combine(v, value(cost(s, e))), pts + [e])
                           for s, (v, pts) in best.items()
                           if s < e and feasible(cost(s, e))]
                if options:
                    nxt[e] = min(options)
            best = nxt
        return best[num_blocks]

    largest, _ = search(lambda c: c, max, lambda c: True)
    tol = 1e-9 * max(1., abs(largest))
    _, points = search(lambda c: c, lambda a, b: a + b,
                       lambda c: c <= largest + tol)
    return points[:-1]
