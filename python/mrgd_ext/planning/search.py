"""Searching the plan structure: candidate degrees per level, the least counts, merge patterns of adjacent
groups, and :func:`plan_multirate`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrgd_ext._validation import check_count
from mrgd_ext.planning.groups import ScaleGroup, check_tol, hulls, validate_groups
from mrgd_ext.planning.plan import RATE_RULES, STRATEGIES, MultiratePlan, assemble
from mrgd_ext.planning.polynomials import (
    Grid,
    allowed_degree,
    chebyshev_growth,
    chebyshev_log_poly,
    cycles_needed,
    least_count,
    level_rates_unordered,
    log_abs_poly,
)

__all__ = ["plan_multirate", "MAX_GROUPS"]

#: Most groups plan_multirate accepts.  Beyond 6 groups the merge search visits O(n) patterns and evaluating
#: a plan grows with its degree and the number of groups; measured 0.7-1.9 CPU s at 24 groups
#: (benchmarks/bench_planner.py; bounds in plan_multirate's docstring).  Beyond this it is an immediate error.
MAX_GROUPS = 24

_MAX_EXHAUSTIVE_GAPS = 5  # 2**5 merge patterns; beyond that _search_many


def fine_counts(
    spectrum: Sequence[ScaleGroup], members: Sequence[Sequence[int]], kind: str, rate_rule: str,
    degrees: Sequence[int], tol: float, rows: dict[tuple[float, float, int], np.ndarray] | None = None,
) -> tuple[tuple[int, ...], float] | None:
    """The count rule evaluated on the fine grid (the search used the coarse one), and the log-contraction
    max log|P_cycle| of the resulting cycle on that grid (summed in another order than :func:`assemble` does).

    ``rows`` keeps each level's log|P| on the fine grid for further calls with the same spectrum, kind and rate
    rule: the grid's points do not depend on the merge pattern (only which level owns them does).
    """
    groups = hulls(spectrum, members)
    grid = Grid.build(spectrum, members, fine=True)
    lam, owner = grid.points, grid.owner
    rows = {} if rows is None else rows
    counts: list[int] = []
    log_p = np.zeros(0)  # set by the first group
    for k, g in enumerate(groups):
        rates = level_rates_unordered(kind, rate_rule, g, degrees[k])
        key = (g.a, g.b, int(degrees[k]))
        if key not in rows:
            # A Chebyshev level by its closed form, as in the search: a few passes over the grid instead of
            # one logarithm pass per node (a degree-512 level over ~60k points took ~0.05 s).  It agrees with
            # the sum over the nodes to ~1e-13 in log|P| away from exact roots, far inside the slack of
            # predicted_range; assemble() then reports what the actual rates do.
            if kind == "nested" or g.b == g.a or len(rates) == 1:
                rows[key] = log_abs_poly(rates, lam)
            else:
                rows[key] = chebyshev_log_poly(len(rates), g, lam)
        s = rows[key]
        if k == 0:
            log_p = s
            continue
        log_t = max(float(s[owner == k].max()), math.log(tol))
        fin = owner < k
        n = least_count(log_p[fin], s[fin], len(rates), log_t)
        if n is None:
            return None
        counts.append(n)
        log_p = n * len(rates) * log_p + s
    return tuple(counts), float(log_p.max())


def predicted_range(cycle_length: int, log_rho: float, tol: float) -> tuple[float, float]:
    """Bounds on the predicted iterations of a cycle whose log-contraction is ``log_rho`` up to rounding.

    :func:`assemble` sums the same log-factors in another order (relative error far below 1e-6 even over a
    million steps), so its prediction lies in these bounds; an unbounded top means "may not contract".
    """
    if log_rho == -math.inf:
        return float(cycle_length), float(cycle_length)
    slack = 1e-6 * abs(log_rho) + 1e-9
    if log_rho + slack >= 0.0:  # assembled and judged as before: it may contract by a hair, or be refused
        return 0.0, math.inf
    return (float(cycle_length * cycles_needed(log_rho - slack, tol)),
            float(cycle_length * cycles_needed(log_rho + slack, tol)))


def cycle_length_of(degrees: Sequence[int], counts: Sequence[int]) -> int:
    length = degrees[0]
    for d, n in zip(degrees[1:], counts):
        length = d * (n * length + 1)
    return length


@dataclass(frozen=True)
class _Candidate:
    predicted: int
    cycle_length: int
    degrees: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.predicted, self.cycle_length)


def _degree_candidates(g: ScaleGroup, log_damping: float, max_degree: int) -> list[int]:
    """Degrees worth trying for an inner level: every allowed degree up to 16, then about four per octave,
    up to the degree whose Chebyshev cycle alone damps by exp(log_damping) (never more is needed)."""
    if g.b == g.a:
        return [1]
    t = chebyshev_growth(g)
    cap = min(max_degree, max(1, math.ceil((log_damping + math.log(2.0)) / t)))
    out: list[int] = []
    for d in range(1, cap + 1):
        if allowed_degree(d) and (d <= 16 or d >= out[-1] * 1.19 or d == cap):
            out.append(d)
    if not allowed_degree(cap) and (not out or out[-1] < cap):
        nxt = cap + 1
        while not allowed_degree(nxt):
            nxt += 1
        if nxt <= max_degree:
            out.append(nxt)
    return out


def _top_degree_candidates(g: ScaleGroup, tol: float, max_degree: int, keep: int = 8) -> list[int]:
    """Allowed degrees for the outermost level ranked by the single-group cost d * ceil(ln tol / ln(1/T_d))."""
    if g.b == g.a:
        return [1]
    t = chebyshev_growth(g)
    # Capped first: for a very wide group d_one is astronomically large and only degrees <= max_degree count.
    d_one = min(max_degree, max(1, math.ceil((math.log(1.0 / tol) + math.log(2.0)) / t)))
    while not allowed_degree(d_one):
        d_one += 1
    ds = np.array([d for d in range(1, min(max_degree, d_one) + 1) if allowed_degree(d)], dtype=np.float64)
    log_t = ds * t + np.log1p(np.exp(-2.0 * ds * t)) - math.log(2.0)  # log T_d(mu0), mu0 > 1
    with np.errstate(divide="ignore"):  # log_t == 0 for a group too wide to damp: infinite cost, ranked last
        cost = ds * np.ceil(math.log(1.0 / tol) / log_t * (1.0 - 1e-12))
    order = np.lexsort((ds, cost))
    return [int(ds[i]) for i in order[:keep]]


def least_counts(log_p: np.ndarray, s: np.ndarray, reps: Any, log_t: np.ndarray) -> np.ndarray:
    """Vectorised :func:`least_count` over rows: 0 marks "no count works".

    Row r pairs the inner cycle's log|P| ``log_p`` with a level's large-step log-factors ``s`` on the same
    points, ``reps`` large steps per count and the level's target ``log_t``.  Either operand may be a single
    row broadcast against the other (one inner cycle against every candidate degree, or one degree against
    every inner cycle); ``reps`` and ``log_t`` then have one entry per row of ``s``.
    """
    log_p, s = np.atleast_2d(log_p), np.atleast_2d(s)
    nrows = max(log_p.shape[0], s.shape[0])
    if log_p.shape[-1] == 0:
        return np.ones(nrows, dtype=np.int64)
    excess = s - np.asarray(log_t, dtype=np.float64).reshape(-1, 1)
    need = excess > 0  # points the large steps leave above the level's target: the inner cycles must damp them
    # n * reps * log_p + s <= log_t wherever need, i.e. n >= excess / (-reps * log_p) where log_p < 0.
    req = np.zeros(np.broadcast_shapes(excess.shape, log_p.shape))
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(excess, -np.asarray(reps).reshape(-1, 1) * log_p, out=req, where=need)
    worst = np.fmax.reduce(req, axis=1)  # fmax: a NaN (never expected) cannot hide a finite requirement
    # No count works where a point needs damping that the inner cycle does not contract (log_p >= 0), or
    # where the requirement is infinite.  Most inner cycles contract every finer point: test those rows cheaply.
    bad = worst == np.inf
    grows = log_p.max(axis=1) >= 0.0
    if grows.any():
        bad |= np.any(need & (log_p >= 0.0), axis=1)
    with np.errstate(invalid="ignore"):
        n: np.ndarray = np.maximum(1, np.ceil(worst * (1.0 - 1e-12))).astype(np.int64)
    n[bad] = 0
    return n


_NO_PLAN = np.iinfo(np.int64).max
_ROWS_PER_BATCH = 4  # next-to-last-level rows per batch of the exhaustive search (pruning vs. batching)


class SearchCache:
    """What the searches of every merge pattern of one spectrum share (for one kind and rate rule: the
    large-step rows depend on both).

    The coarse grid's points do not depend on the merge pattern (group i always owns the slice
    ``bounds[i]:bounds[i + 1]``, groups in order), so a merged level owns a contiguous slice and the levels finer
    than it a prefix of the grid; and a large-step row depends on its level's hull and degree alone.
    """

    def __init__(self, spectrum: Sequence[ScaleGroup]) -> None:
        grid = Grid.build(spectrum, [(i,) for i in range(len(spectrum))], fine=False)
        self.points = grid.points
        self.bounds = np.concatenate(([0], np.cumsum(np.bincount(grid.owner, minlength=len(spectrum)))))
        self.rows: dict[tuple[float, float, int], np.ndarray] = {}


@dataclass
class _Rows:
    """Partial cycles C_k for a batch of candidate structures, one row each (levels 0..k chosen)."""

    log_p: np.ndarray  # [rows, npts]: log|P_{C_k}| on the coarse grid
    length: np.ndarray  # [rows]: cycle length of C_k
    choice: np.ndarray  # [rows, k + 1]: candidate index per level
    counts: np.ndarray  # [rows, k]: n_0 .. n_{k-1}

    def take(self, sel: np.ndarray) -> _Rows:
        return _Rows(self.log_p[sel], self.length[sel], self.choice[sel], self.counts[sel])

    def shorter_than(self, bound: int | None) -> _Rows:
        """The rows whose cycle is shorter than ``bound`` (all if None).  A longer cycle only grows as levels
        are added and a plan runs at least one cycle, so such a row cannot reach fewer predicted iterations."""
        if bound is None:
            return self
        keep = self.length < bound
        return self if keep.all() else self.take(keep)


class _LevelSearch:
    """Best (degrees, counts) for one merge pattern, ranked on the coarse grid.

    NOTE: [degree search] Up to three levels the search is exhaustive over the candidate degrees; deeper
    nests use coordinate descent from a few starts.  Every candidate is scored by its predicted iterations,
    so the search can only pick among plans whose cost it has actually computed.  The work is batched over
    candidate rows: a level adds its large steps to every row at once (:meth:`extend`), and coordinate descent
    re-uses the partial cycle below the level it varies.  Partial cycles already at least as long as the
    best plan found so far are dropped (they cannot win: see :meth:`_Rows.shorter_than` and :meth:`complete`),
    which changes no result.
    """

    def __init__(
        self, spectrum: tuple[ScaleGroup, ...], members: tuple[tuple[int, ...], ...], kind: str, rate_rule: str,
        tol: float, max_degree: int, max_cycle_length: int, cache: SearchCache | None = None,
    ) -> None:
        groups = hulls(spectrum, members)
        self.m = len(groups) - 1
        cache = SearchCache(spectrum) if cache is None else cache
        lam = cache.points
        # Level k owns the grid slice lo[k]:hi[k]; the finer levels own the prefix :lo[k].
        self.lo = [int(cache.bounds[run[0]]) for run in members]
        hi = [int(cache.bounds[run[-1] + 1]) for run in members]
        self.log_tol = math.log(tol)
        self.max_cycle_length = max_cycle_length
        log_spread = math.log(4.0 * groups[0].b / groups[-1].a) + math.log(1.0 / tol)
        if kind == "nested":
            cands = [[1] for _ in groups]
        else:
            cands = [_degree_candidates(g, log_spread, max_degree) for g in groups[:-1]]
            cands.append(_top_degree_candidates(groups[-1], tol, max_degree))
        # Large-step log-factors of every (level, candidate degree) on the grid: rows of S[k], shared through
        # the cache between the patterns of one search.
        self.S: list[np.ndarray] = []
        for g, ds in zip(groups, cands):
            rows = []
            for d in ds:
                key = (g.a, g.b, int(d))
                if key not in cache.rows:
                    if kind == "nested" or g.b == g.a:
                        cache.rows[key] = log_abs_poly(level_rates_unordered(kind, rate_rule, g, d), lam)
                    else:
                        cache.rows[key] = chebyshev_log_poly(d, g, lam)
                rows.append(cache.rows[key])
            self.S.append(np.stack(rows))
        # Each level's own target: what its large steps leave on its own group, or tol if that is smaller.
        self.T = [np.maximum(Sk[:, self.lo[k]:hi[k]].max(axis=1), self.log_tol) for k, Sk in enumerate(self.S)]
        self.D = [np.asarray(c, dtype=np.int64) for c in cands]

    # -- one level for a batch of rows -----------------------------------------------------------------------
    def start(self, idx: np.ndarray) -> _Rows:
        """Level 0 alone for the candidate rows ``idx``."""
        return _Rows(
            self.S[0][idx], self.D[0][idx].copy(), idx[:, None], np.zeros((idx.size, 0), dtype=np.int64)
        )

    def extend(self, rows: _Rows, idx: np.ndarray | int) -> _Rows:
        """Add level k = (levels in ``rows``) with candidate ``idx[r]`` to row r, with every candidate in
        ``idx`` to a single row, or with the one candidate ``idx`` (an int) to every row; rows with no valid
        count or too long a cycle are dropped."""
        k = rows.choice.shape[1]
        nf = self.lo[k]
        if isinstance(idx, (int, np.integer)):  # one candidate for all rows: broadcast its row
            s, d, log_t = self.S[k][idx:idx + 1], self.D[k][idx:idx + 1], self.T[k][idx:idx + 1]
            idx = np.full(rows.length.size, idx, dtype=np.int64)
        else:
            s, d, log_t = self.S[k][idx], self.D[k][idx], self.T[k][idx]
        n = least_counts(rows.log_p[:, :nf], s[:, :nf], d, log_t)
        if rows.length.size == 1 and idx.size != 1:  # one row against every candidate
            rows = _Rows(*(np.repeat(a, idx.size, axis=0) for a in (rows.log_p, rows.length, rows.choice, rows.counts)))
        d = np.broadcast_to(d, n.shape)
        new_len = d * (n * rows.length + 1)
        ok = (n > 0) & (new_len <= self.max_cycle_length)
        if not ok.all():
            rows, idx, n, d, new_len = rows.take(ok), idx[ok], n[ok], d[ok], new_len[ok]
            s = s if s.shape[0] == 1 else s[ok]
        new_p = (n * d)[:, None] * rows.log_p + s
        return _Rows(new_p, new_len, np.column_stack([rows.choice, idx]), np.column_stack([rows.counts, n]))

    def predicted(self, rows: _Rows) -> np.ndarray:
        """Predicted iterations of complete cycles (``_NO_PLAN`` where the cycle does not contract)."""
        log_rho = rows.log_p.max(axis=1)
        with np.errstate(divide="ignore"):
            cyc = np.where(
                log_rho < 0,
                np.maximum(1, np.ceil(self.log_tol / np.where(log_rho < 0, log_rho, -1.0) * (1 - 1e-12))),
                0,
            )
        cyc = np.where(np.isneginf(log_rho), 1, cyc)
        total = rows.length * cyc  # float: a hopeless cycle count must not wrap around in int64
        ok = (cyc > 0) & (total < 2.0**62)
        out = np.full(total.shape, _NO_PLAN, dtype=np.int64)
        out[ok] = total[ok].astype(np.int64)
        return out

    def candidate(self, rows: _Rows, r: int, pred: int) -> _Candidate:
        degrees = tuple(int(self.D[k][i]) for k, i in enumerate(rows.choice[r]))
        return _Candidate(int(pred), int(rows.length[r]), degrees, tuple(int(c) for c in rows.counts[r]))

    def best_row(self, rows: _Rows) -> _Candidate | None:
        """The complete row with the fewest predicted iterations (then the shortest cycle; then the first)."""
        if rows.length.size == 0:
            return None
        pred = self.predicted(rows)
        j = int(np.lexsort((rows.length, pred))[0])
        return None if pred[j] == _NO_PLAN else self.candidate(rows, j, pred[j])

    def complete(self, rows: _Rows, choice: Sequence[int], start: int, bound: int | None = None) -> _Rows:
        """Extend ``rows`` (levels < start chosen) through the top level with the fixed ``choice``, dropping rows
        that cannot reach fewer than ``bound`` predicted iterations.

        With the degrees above fixed, a cycle of length L at level k - 1 grows to at least d_k (L + 1) at level k
        (every count is >= 1), so the shortest cycle a row can complete to is known before it is extended; a plan
        runs at least one cycle, so a row whose shortest completion reaches ``bound`` cannot win, and one whose
        shortest completion is longer than ``max_cycle_length`` would be dropped at a later level anyway.
        """
        limit = self.max_cycle_length + 1 if bound is None else min(bound, self.max_cycle_length + 1)
        for k in range(start, self.m + 2):
            shortest = rows.length.astype(np.float64)  # float: the bound may pass the int64 range
            for j in range(k, self.m + 1):
                shortest = float(self.D[j][choice[j]]) * (shortest + 1.0)
            keep = shortest < limit * (1.0 + 1e-9)  # margin: float rounding must never drop a winner
            if not keep.all():
                rows = rows.take(keep)
            if k > self.m or rows.length.size == 0:
                break
            rows = self.extend(rows, int(choice[k]))
        return rows

    # -- strategies --------------------------------------------------------------------------------------------
    def best(self) -> _Candidate | None:
        return self.exhaustive() if self.m <= 2 else self.coordinate_descent()

    def exhaustive(self) -> _Candidate | None:
        """Every combination of candidate degrees, depth first, skipping partial cycles already at least as long
        as the best predicted iterations (a cycle is at least as long as its part, so they cannot win).

        The last two levels go in one batch: every row of the next-to-last level times every top candidate.
        Rows stay in depth-first order, so the first of several equally good plans wins, as in a plain walk.
        """
        best: _Candidate | None = None

        def consider(c: _Candidate | None) -> None:
            nonlocal best
            if c is not None and (best is None or c.key < best.key):
                best = c

        def visit(k: int, parent: _Rows | None) -> None:
            idx = np.arange(self.D[k].size)
            rows = self.start(idx) if parent is None else self.extend(parent, idx)
            rows = rows.shorter_than(None if best is None else best.predicted)
            if k == self.m:
                consider(self.best_row(rows))
            elif k == self.m - 1:
                # Pairs (row, top candidate) in batches of a few rows, pruned by the best found so far: the
                # completed cycle is at least d_top * (length + 1) long, and a plan takes at least one cycle.
                ncand, d_top = self.D[self.m].size, self.D[self.m]
                for lo in range(0, rows.length.size, _ROWS_PER_BATCH):
                    sub = rows.take(np.arange(lo, min(lo + _ROWS_PER_BATCH, rows.length.size)))
                    row = np.repeat(np.arange(sub.length.size), ncand)
                    top = np.tile(np.arange(ncand), sub.length.size)
                    if best is not None:
                        keep = d_top[top] * (sub.length[row] + 1) < best.predicted
                        row, top = row[keep], top[keep]
                    if row.size:
                        consider(self.best_row(self.extend(sub.take(row), top)))
            else:
                for r in range(rows.length.size):
                    if best is None or rows.length[r] < best.predicted:
                        visit(k + 1, rows.take(np.array([r])))

        visit(0, None)
        return best

    def prefixes(self, choice: Sequence[int]) -> list[_Rows]:
        """Partial cycles of ``choice`` level by level (fewer than m + 1 entries if a level has no valid count)."""
        out = [self.start(np.array([choice[0]]))]
        for k in range(1, self.m + 1):
            nxt = self.extend(out[-1], int(choice[k]))
            if nxt.length.size == 0:
                break
            out.append(nxt)
        return out

    def coordinate_descent(self, start_degrees: Sequence[int] = (1, 4, 8)) -> _Candidate | None:
        """From a few starts (every inner level at the candidate degree nearest each of ``start_degrees``),
        vary one level at a time to its best candidate until nothing improves.

        Varying level k depends only on the choices at the other levels, so its outcome is remembered: the
        confirming sweep, and starts that reach a choice already seen, re-use it instead of recomputing it.
        An outcome found with rows pruned at ``bound`` answers every later query whose bound is no larger: a
        row better than the current plan is never pruned, so it is found either way.
        """
        best: _Candidate | None = None
        seen: dict[tuple[int, tuple[int, ...]], tuple[_Candidate | None, float]] = {}
        starts: list[list[int]] = []
        for d0 in start_degrees:
            choice = [int(np.argmin(np.abs(self.D[k] - d0))) for k in range(self.m)] + [0]
            if choice not in starts:  # a start already taken ends where it ended before
                starts.append(choice)
        for choice in starts:
            pre = self.prefixes(choice)
            cur = self.best_row(pre[-1]) if len(pre) == self.m + 1 else None
            for _ in range(6):
                improved = False
                for k in range(self.m + 1):
                    if k > 0 and len(pre) < k:
                        break  # the levels below k already fail: no choice at k can help
                    bound = math.inf if cur is None else cur.predicted
                    key = (k, tuple(choice[:k] + choice[k + 1:]))
                    if key in seen and seen[key][1] >= bound:
                        c = seen[key][0]
                    else:
                        idx = np.arange(self.D[k].size)
                        rows = self.start(idx) if k == 0 else self.extend(pre[k - 1], idx)
                        c = self.best_row(self.complete(rows, choice, k + 1, None if cur is None else cur.predicted))
                        seen[key] = (c, bound)
                    if c is not None and (cur is None or c.key < cur.key):
                        cur, improved = c, True
                        choice = [int(self.D[j].tolist().index(dd)) for j, dd in enumerate(c.degrees)]
                        pre = self.prefixes(choice)
                if not improved:
                    break
            if cur is not None and (best is None or cur.key < best.key):
                best = cur
        return best


def _search(
    spectrum: tuple[ScaleGroup, ...], members: tuple[tuple[int, ...], ...], kind: str, rate_rule: str,
    tol: float, max_degree: int, max_cycle_length: int, cache: SearchCache | None = None,
) -> _Candidate | None:
    """Best (degrees, counts) for one merge pattern, ranked on the coarse grid. None if nothing fits.

    ``cache`` shares the grid and large-step rows between calls for the same spectrum, kind and rate rule.
    """
    return _LevelSearch(spectrum, members, kind, rate_rule, tol, max_degree, max_cycle_length, cache).best()


def _merge_patterns(num: int) -> Iterable[tuple[tuple[int, ...], ...]]:
    """All partitions of range(num) into consecutive runs (2**(num-1) of them)."""
    for mask in range(2 ** (num - 1)):
        runs, cur = [], [0]
        for i in range(1, num):
            if mask >> (i - 1) & 1:
                cur.append(i)
            else:
                runs.append(tuple(cur))
                cur = [i]
        runs.append(tuple(cur))
        yield tuple(runs)


Pattern = tuple[tuple[int, ...], ...]


def _runs_from_cuts(n: int, cuts: Iterable[int]) -> Pattern:
    """The pattern of range(n) cut before each group in ``cuts``."""
    b = [0, *sorted(cuts), n]
    return tuple(tuple(range(b[k], b[k + 1])) for k in range(len(b) - 1))


def _cuts_of(members: Pattern) -> frozenset[int]:
    return frozenset(run[0] for run in members[1:])


def _seed_patterns(spectrum: Sequence[ScaleGroup]) -> list[Pattern]:
    """Starting patterns for the merge search of many groups, by number of runs m = 1 .. n.

    Two per m (often the same): the partition minimising the sum over runs of sqrt(b_first / a_last) -- the
    square root of a run's condition, what a Chebyshev cycle on it costs -- which cuts at large gaps and keeps
    runs balanced where the gaps are alike (a dynamic programme over run ends); and the cuts at the m - 1
    largest gaps log(a_k / b_{k+1}), ties broken toward the middle of the spectrum.
    """
    n = len(spectrum)
    log_a = np.log([g.a for g in spectrum])
    log_b = np.log([g.b for g in spectrum])
    # best[m][j]: least cost of the first j groups in m runs; arg[m][j]: where its last run starts.
    best = np.full((n + 1, n + 1), np.inf)
    arg = np.zeros((n + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for m in range(1, n + 1):
        for j in range(m, n + 1):
            i = np.arange(m - 1, j)
            # Halved log-condition, clipped: a run too wide to cost a finite float is as bad as can be.
            c = best[m - 1, i] + np.exp(np.minimum(0.5 * (log_b[i] - log_a[j - 1]), 700.0))
            k = int(np.argmin(c))
            best[m, j], arg[m, j] = c[k], i[k]
    gaps = [float(log_a[i] - log_b[i + 1]) for i in range(n - 1)]
    # Round so that gaps equal up to float noise tie, and break ties toward balanced runs.
    by_size = sorted(range(n - 1), key=lambda i: (-round(gaps[i], 9), abs(i + 1 - n / 2), i))
    out: list[Pattern] = []
    for m in range(1, n + 1):
        cuts, j = [], n
        for mm in range(m, 0, -1):
            j = int(arg[mm, j])
            cuts.append(j)
        for pattern in (_runs_from_cuts(n, [c for c in cuts if c > 0]),
                        _runs_from_cuts(n, [i + 1 for i in by_size[:m - 1]])):
            if pattern not in out:
                out.append(pattern)
    return out


def _neighbours(members: Pattern, n: int) -> list[Pattern]:
    """Patterns one step from ``members``: a cut moved by one group, two adjacent runs merged, or a run split
    in its middle."""
    cuts = _cuts_of(members)
    out: list[Pattern] = []
    for c in sorted(cuts):
        for moved in (c - 1, c + 1):
            if 0 < moved < n and moved not in cuts:
                out.append(_runs_from_cuts(n, (cuts - {c}) | {moved}))
        out.append(_runs_from_cuts(n, cuts - {c}))
    for run in members:
        if len(run) > 1:
            out.append(_runs_from_cuts(n, cuts | {run[len(run) // 2]}))
    return out


_PATIENCE = 3  # run counts in a row without a better plan before the upward scan stops
_REFINE_ROUNDS = 4  # hill-climbing moves per start at most
_UNMERGED_START = 1.5  # the unmerged pattern is refined too when its plan is within this factor of the best
_CLIMB_WITHIN = 2.0  # no refinement when the best seed is this far behind a plan of another kind
_SCREEN_STARTS = (1,)  # coordinate-descent starts while screening patterns (about half the cost of all three)
_POLISH_STARTS = (2, 4, 8)  # further starts for the few best patterns
_POLISHED = 2  # patterns searched again from _POLISH_STARTS


def _search_many(
    spectrum: tuple[ScaleGroup, ...], kind: str, rate_rule: str, tol: float, max_degree: int,
    max_cycle_length: int, cache: SearchCache, beat: int | None = None,
) -> list[tuple[_Candidate, Pattern]]:
    """Merge-pattern search for more groups than can be searched exhaustively.

    NOTE: [merge search] Seed patterns (:func:`_seed_patterns`) are scored from few runs upward -- few runs
    are cheap to search -- until :data:`_PATIENCE` run counts in a row bring no better plan.  The best of
    them, and the unmerged pattern when its plan is within :data:`_UNMERGED_START` of that best, are then
    refined by best-improvement hill climbing over :func:`_neighbours` (at most :data:`_REFINE_ROUNDS` moves
    each).  One merge of the unmerged pattern is one such move (what pairwise merging would try first), and
    the prediction per pattern is uneven -- the degree search is itself a local search -- so a start at
    the finest structure pays on inputs where a few merges win.  No refinement is run when the best seed
    predicts more than :data:`_CLIMB_WITHIN` times ``beat`` (the best plan of the other kind, e.g.
    Chebyshev-nested against nested): refining gains tens of percent, not factors.

    Degree search per pattern: exhaustive up to two levels, as in :func:`_search`; beyond, coordinate descent
    (also for three levels, where :func:`_search` is exhaustive at about ten times the cost) from
    :data:`_SCREEN_STARTS` alone, except for the unmerged pattern and the climb from it, which get every start;
    the :data:`_POLISHED` best screened patterns are searched again from :data:`_POLISH_STARTS`.  Every pattern
    returned was actually searched, so the caller ranks plans whose cost is known.  Deterministic: no
    randomness, fixed visit order.
    """
    n = len(spectrum)
    found: dict[Pattern, _Candidate | None] = {}
    searched_fully: set[Pattern] = set()

    def evaluate(members: Pattern, full: bool = False) -> _Candidate | None:
        """The screening search of a pattern (all the usual starts when ``full``)."""
        if members not in found:
            search = _LevelSearch(spectrum, members, kind, rate_rule, tol, max_degree, max_cycle_length, cache)
            if len(members) <= 2:
                found[members] = search.exhaustive()
            else:
                found[members] = search.coordinate_descent() if full else search.coordinate_descent(_SCREEN_STARTS)
            if full or len(members) <= 2:
                searched_fully.add(members)
        return found[members]

    def better(c: _Candidate | None, than: _Candidate | None) -> bool:
        return c is not None and (than is None or c.key < than.key)

    def climb(cand: _Candidate, members: Pattern, full: bool = False) -> None:
        for _ in range(_REFINE_ROUNDS):
            step = (cand, members)
            for nb in _neighbours(members, n):
                c = evaluate(nb, full)
                if better(c, step[0]):
                    step = (c, nb)  # type: ignore[assignment]
            if step[1] == members:
                return
            cand, members = step

    best: _Candidate | None = None
    best_members: Pattern = ()
    seeds = _seed_patterns(spectrum)
    stale = 0
    for m in range(1, n + 1):
        improved = False
        for members in (p for p in seeds if len(p) == m):
            c = evaluate(members)
            if better(c, best):
                best, best_members, improved = c, members, True
        if best is not None:
            stale = 0 if improved else stale + 1
            if stale >= _PATIENCE:
                break
    unmerged = tuple((i,) for i in range(n))
    fine = evaluate(unmerged, full=True)  # the classic structure: never screened out by a single start
    refine = best is None or beat is None or best.predicted <= _CLIMB_WITHIN * beat
    if refine and best is not None:
        climb(best, best_members)
    if refine and fine is not None and (best is None or fine.predicted <= _UNMERGED_START * best.predicted):
        climb(fine, unmerged, full=True)
    ranked = sorted((c.key, i) for i, c in enumerate(found.values()) if c is not None)
    patterns = list(found)
    for _, i in ranked[:_POLISHED]:
        members = patterns[i]
        if members not in searched_fully:
            search = _LevelSearch(spectrum, members, kind, rate_rule, tol, max_degree, max_cycle_length, cache)
            c = search.coordinate_descent(_POLISH_STARTS)
            if better(c, found[members]):
                found[members] = c
    return [(c, members) for members, c in found.items() if c is not None]


def _best_over_merges(
    spectrum: tuple[ScaleGroup, ...], kind: str, rate_rule: str, tol: float, max_degree: int,
    max_cycle_length: int, merge: bool, beat: int | None = None,
) -> list[tuple[_Candidate, Pattern]]:
    """Best candidate per merge pattern searched (all patterns for few gaps, :func:`_search_many` otherwise;
    ``beat``: the best prediction of another kind, see there)."""
    n = len(spectrum)
    cache = SearchCache(spectrum)
    if merge and n - 1 > _MAX_EXHAUSTIVE_GAPS:
        return _search_many(spectrum, kind, rate_rule, tol, max_degree, max_cycle_length, cache, beat)
    patterns = _merge_patterns(n) if merge and n > 1 else [tuple((i,) for i in range(n))]
    results = []
    for members in patterns:
        cand = _search(spectrum, members, kind, rate_rule, tol, max_degree, max_cycle_length, cache)
        if cand is not None:
            results.append((cand, members))
    return results


def plan_multirate(
    groups: Sequence[ScaleGroup] | Iterable[Any],
    tol: float = 1e-6,
    strategy: str = "auto",
    rate_rule: str = "optimal",
    merge: bool = True,
    *,
    max_degree: int = 512,
    max_cycle_length: int = 1_000_000,
) -> MultiratePlan:
    """Plan a cycle of learning rates for eigenvalue groups (Hessian scale), DESIGN 1.3.

    Args:
        groups: eigenvalue intervals sorted descending (``groups[0].b = lambda_max``) with gaps
            ``b_{k+1} < a_k``; ``ScaleGroup`` or ``(a, b)`` pairs.
        tol: relative error the plan is optimised for (predicted iterations are reported for it), in (0, 1).
        strategy: ``"nested"`` (paper Algorithm 1, reference form), ``"chebyshev-nested"``, ``"chebyshev"``
            (one Chebyshev cycle on ``[lambda_min, lambda_max]``) or ``"auto"`` (least predicted iterations).
        rate_rule: ``"optimal"`` -- ``eta_k = 2/(a_k+b_k)``; ``"safe"`` -- ``eta_k = 1/b_k``, every step
            non-expansive on its own group, robust to a ``b_k`` underestimated by up to 2x.  ``"safe"`` is a
            single-rate rule: it applies to ``"nested"`` (and ``"auto"`` then only considers nested plans);
            combining it with a Chebyshev strategy is an error.
        merge: let adjacent groups be merged when the gap between them is too small to pay for a separate
            level (decided by predicted iterations over all merge patterns up to 6 groups; beyond, over the
            patterns a seeded scan and hill climbing visit, always including all merged and none merged).
        max_degree: largest Chebyshev degree per level.  Chebyshev degrees are of the form ``q * 2**p`` with odd
            ``q <= 13`` (the ones with a stable step order).
        max_cycle_length: plans with longer cycles are not considered.

    Returns:
        The :class:`MultiratePlan` with the fewest predicted iterations to ``tol`` among those considered
        (ties: smaller perturbation amplification, then shorter cycle).

    Planning time: at most :data:`MAX_GROUPS` (24) groups are planned; more is refused at once.  Up to 6 groups
    every merge pattern is searched; beyond, a seeded scan and a local refinement of merge patterns (see the
    note in ``_search_many``).  Measured with ``benchmarks/bench_planner.py`` (CPU seconds, one thread of an
    idle 2-core Xeon): well separated groups (ratio 0.1, relative width 1) take at most 0.48 s up to 20 groups
    and 0.7 s at 24; closely spaced narrow groups (ratio 0.5, width 0.3) 0.22 s at 12, 0.34 s at 16, 0.43 s at 20
    and 1.7-1.9 s at 24; a seeded irregular spectrum (random widths, one gap in four large) 0.33 s at 12, 0.5-0.6 s
    at 16, 0.64-0.70 s at 20 and 1.4-1.5 s at 24.  Most of the time beyond 16 groups goes to evaluating the
    chosen plan on the fine grid, which costs about its Chebyshev degree times the number of groups.

    Raises:
        ValueError: naming the problem -- empty, unsorted or overlapping groups, more than :data:`MAX_GROUPS`
            groups, a spectrum wider than ``lambda_max / lambda_min = 1e150``, a bad group end, ``tol``
            outside (0, 1), unknown ``strategy`` or ``rate_rule``, or no plan within the limits.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if rate_rule not in RATE_RULES:
        raise ValueError(f"unknown rate_rule {rate_rule!r}; choose one of {', '.join(RATE_RULES)}")
    spectrum = validate_groups(groups)
    tol = check_tol(tol)
    if rate_rule == "safe" and strategy in ("chebyshev", "chebyshev-nested"):
        raise ValueError(
            f"rate_rule='safe' is a single-rate rule (eta_k = 1/b_k) and applies to strategy='nested' only, "
            f"not to strategy={strategy!r}"
        )
    max_degree = check_count(max_degree, "max_degree", 1)
    max_cycle_length = check_count(max_cycle_length, "max_cycle_length", 1)
    if not isinstance(merge, (bool, np.bool_)):
        raise ValueError(f"merge must be True or False, got {merge!r}")

    n = len(spectrum)
    if n > MAX_GROUPS:
        raise ValueError(
            f"groups has {n} groups; plan_multirate plans for at most {MAX_GROUPS} (the search over merge patterns "
            f"and degrees grows steeply with the count): merge adjacent groups before planning"
        )
    all_merged = (tuple(range(n)),)
    options: list[tuple[str, _Candidate, tuple[tuple[int, ...], ...]]] = []

    def add(label: str, found: list[tuple[_Candidate, tuple[tuple[int, ...], ...]]]) -> None:
        for cand, members in found:
            # Under "auto", a Chebyshev-nested plan over one merged group *is* the plain Chebyshev cycle.
            lab = "chebyshev" if (strategy == "auto" and label != "nested" and members == all_merged) else label
            options.append((lab, cand, members))

    # Chebyshev-nested is searched first: its best plan tells the nested search when refining is pointless.
    cheb_nested = []
    if strategy == "chebyshev-nested" or (strategy == "auto" and rate_rule == "optimal"):
        cheb_nested = _best_over_merges(spectrum, "chebyshev", rate_rule, tol, max_degree, max_cycle_length, merge)
    if strategy in ("nested", "auto"):
        beat = min((cand.predicted for cand, _ in cheb_nested), default=None)
        add("nested", _best_over_merges(spectrum, "nested", rate_rule, tol, max_degree, max_cycle_length, merge, beat))
    add("chebyshev-nested", cheb_nested)
    if strategy == "chebyshev" or (strategy == "auto" and rate_rule == "optimal" and not merge and n > 1):
        cand = _search(spectrum, all_merged, "chebyshev", rate_rule, tol, max_degree, max_cycle_length)
        if cand is not None:
            options.append(("chebyshev", cand, all_merged))
    if not options:
        raise ValueError(
            f"no {strategy} plan with cycle length <= {max_cycle_length} and degree <= {max_degree} "
            f"contracts every group; raise the limits or merge groups"
        )

    # Re-evaluate the most promising few on the fine grid (counts may grow by one there) and pick the best.
    options.sort(key=lambda o: (o[1].predicted, o[1].cycle_length))
    finalists = options[:3]
    scored = []
    fine_rows: dict[str, dict[tuple[float, float, int], np.ndarray]] = {"nested": {}, "chebyshev": {}}
    for label, cand, members in finalists:
        kind = "nested" if label == "nested" else "chebyshev"
        fine = fine_counts(spectrum, members, kind, rate_rule, cand.degrees, tol, fine_rows[kind])
        if fine is None or cycle_length_of(cand.degrees, fine[0]) > max_cycle_length:
            continue
        counts, log_rho = fine
        scored.append((label, members, cand.degrees, counts,
                       predicted_range(cycle_length_of(cand.degrees, counts), log_rho, tol)))
    # Only finalists that may tie the least prediction can win: assemble (the costly part) just those.
    least_top = min((bounds[1] for *_, bounds in scored), default=math.inf)
    plans = [
        assemble(spectrum, members, label, rate_rule, degrees, counts, tol)
        for label, members, degrees, counts, bounds in scored
        if bounds[0] <= least_top
    ]
    if not plans:
        raise ValueError(f"no {strategy} plan contracts every group on the fine grid; merge groups")
    rank = {"nested": 0, "chebyshev-nested": 1, "chebyshev": 2}
    return min(
        plans,
        key=lambda p: (
            p.predicted_iterations(), p.perturbation_amplification, p.cycle_length, rank[p.strategy]
        ),
    )
