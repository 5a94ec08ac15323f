"""Tests for the merge-pattern search of many groups (more than 6) in mrgd_ext.planning.search.

Beyond 6 groups the search does not try every merge pattern, so these tests check what it promises: its seed
and neighbour patterns are valid partitions with the structure they are built for, the plan it returns is at
least as good as the patterns it always searches (all groups merged into one Chebyshev cycle, no group
merged), it cuts at a gap too large to merge across, it is deterministic, and bad input fails as before.
The shortcut that assembles only the finalists that can win is checked against the assembled plans, and the
in-place accumulation of runs against a brute-force walk of the step sequence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mrgd_ext.planning import ScaleGroup, groups_from_scales, plan_multirate
from mrgd_ext.planning.groups import validate_groups
from mrgd_ext.planning.polynomials import Runs, level_runs
from mrgd_ext.planning.search import (
    SearchCache,
    _best_over_merges,
    _neighbours,
    _search,
    _seed_patterns,
    fine_counts,
    predicted_range,
)

TOL = 1e-6


def _dense(n: int) -> list[ScaleGroup]:
    # Narrow groups a factor 2 apart: merging pays, the planner's hardest family (benchmarks/bench_planner.py).
    return groups_from_scales(n, 0.5, 0.3)


def _huge_gap() -> list[ScaleGroup]:
    # Four close groups, a gap of 1e4, four more close groups: merging across the gap costs a condition of
    # ~1e4 more, so a good plan never does.
    top = groups_from_scales(4, 0.5, 0.3)
    return top + [ScaleGroup(g.a * 1e-4, g.b * 1e-4) for g in top]


def _irregular() -> list[ScaleGroup]:
    # Gaps and widths of different sizes, fixed numbers (no randomness in the test).
    b, out = 1.0, []
    for width, gap in [(0.3, 0.5), (0.6, 0.05), (0.2, 0.7), (0.5, 0.4), (0.4, 0.02), (0.3, 0.6), (0.7, 0.5),
                       (0.2, 0.3), (0.4, 1.0)]:
        a = b * (1.0 - width)
        out.append(ScaleGroup(a, b))
        b = a * gap
    return out


def _is_partition(members, n: int) -> bool:
    return all(members) and [i for run in members for i in run] == list(range(n)) and all(
        list(run) == list(range(run[0], run[-1] + 1)) for run in members
    )


# --------------------------------------------------------------------------------------------------------
# Seeds and neighbours


@pytest.mark.parametrize("groups", [_dense(12), _irregular(), _huge_gap()], ids=["dense12", "irregular", "gap"])
def test_seed_patterns_are_partitions_for_every_run_count(groups):
    n = len(groups)
    seeds = _seed_patterns(validate_groups(groups))
    assert all(_is_partition(p, n) for p in seeds)
    assert sorted({len(p) for p in seeds}) == list(range(1, n + 1))
    assert len(set(seeds)) == len(seeds)  # no pattern searched twice


def test_seed_patterns_balance_runs_where_the_gaps_are_alike():
    # Equal gaps and equal relative widths: the least sum of sqrt(run condition) splits into runs whose
    # sizes differ by at most one (the cost of a run grows geometrically with its size).
    seeds = _seed_patterns(validate_groups(_dense(12)))
    for m in range(1, 13):
        assert any(max(map(len, p)) - min(map(len, p)) <= 1 for p in seeds if len(p) == m), m


def test_seed_patterns_cut_at_a_huge_gap():
    seeds = _seed_patterns(validate_groups(_huge_gap()))
    assert [p for p in seeds if len(p) == 2] == [((0, 1, 2, 3), (4, 5, 6, 7))]


def test_neighbours_move_merge_and_split_one_run():
    n, members = 9, ((0, 1, 2), (3,), (4, 5, 6, 7), (8,))
    nbs = _neighbours(members, n)
    assert all(_is_partition(p, n) for p in nbs) and members not in nbs
    assert len(set(nbs)) == len(nbs)
    # Cuts before 3, 4, 8.  Moves: 3 -> 2 (4 is taken), 4 -> 5 (3 is taken), 8 -> 7 (9 is the end).
    assert ((0, 1), (2, 3), (4, 5, 6, 7), (8,)) in nbs
    assert ((0, 1, 2), (3, 4), (5, 6, 7), (8,)) in nbs
    assert ((0, 1, 2), (3,), (4, 5, 6), (7, 8)) in nbs
    # Merges: one per cut.
    assert ((0, 1, 2, 3), (4, 5, 6, 7), (8,)) in nbs and ((0, 1, 2), (3,), (4, 5, 6, 7, 8)) in nbs
    # Splits in the middle of each run longer than one.
    assert ((0,), (1, 2), (3,), (4, 5, 6, 7), (8,)) in nbs and ((0, 1, 2), (3,), (4, 5), (6, 7), (8,)) in nbs
    assert len(nbs) == 3 + 3 + 2
    # The unmerged pattern: only merges (the first round of pairwise merging).
    unmerged = tuple((i,) for i in range(n))
    assert sorted(map(len, _neighbours(unmerged, n))) == [n - 1] * (n - 1)


# --------------------------------------------------------------------------------------------------------
# The plan


@pytest.mark.parametrize("groups", [_dense(12), _irregular()], ids=["dense12", "irregular"])
def test_merge_search_is_no_worse_than_the_patterns_it_always_searches(groups):
    # Coarse grid, where the search ranks: the best Chebyshev-nested candidate over merge patterns against a
    # direct degree search of the all-merged and the unmerged pattern.
    spectrum = validate_groups(groups)
    n = len(spectrum)
    found = _best_over_merges(spectrum, "chebyshev", "optimal", TOL, 512, 1_000_000, True)
    best = min(c.predicted for c, _ in found)
    cache = SearchCache(spectrum)
    for members in [(tuple(range(n)),), tuple((i,) for i in range(n))]:
        direct = _search(spectrum, members, "chebyshev", "optimal", TOL, 512, 1_000_000, cache)
        assert direct is None or best <= direct.predicted
    # And the plans (fine grid): auto is no worse than one Chebyshev cycle or than planning without merging.
    plan = plan_multirate(groups, tol=TOL)
    assert plan.predicted_iterations() <= plan_multirate(groups, tol=TOL, strategy="chebyshev").predicted_iterations()
    assert plan.predicted_iterations() <= plan_multirate(groups, tol=TOL, merge=False).predicted_iterations()


def test_dense_groups_merge_into_one_chebyshev_cycle():
    # Twelve groups a factor 2 apart: the gaps are too small to pay for separate levels.  Pairwise greedy
    # merging from the unmerged pattern stopped at 10 levels and 708 predicted iterations here; one Chebyshev
    # cycle needs 384.
    plan = plan_multirate(_dense(12), tol=TOL)
    single = plan_multirate(_dense(12), tol=TOL, strategy="chebyshev")
    assert plan.predicted_iterations() <= single.predicted_iterations() < 708


def test_many_groups_are_cut_at_a_huge_gap():
    plan = plan_multirate(_huge_gap(), tol=TOL)
    assert all(not (run[0] <= 3 and run[-1] >= 4) for run in plan.members), plan.members
    assert plan.contraction < 1.0


def test_many_group_planning_is_deterministic():
    first = plan_multirate(_irregular(), tol=TOL).to_dict()
    assert plan_multirate(_irregular(), tol=TOL).to_dict() == first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(merge="yes"), "merge must be True or False"),
        (dict(tol=2.0), "tol"),
        (dict(strategy="greedy"), "unknown strategy"),
        (dict(max_degree=0), "max_degree"),
    ],
)
def test_bad_arguments_with_many_groups_are_value_errors_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_multirate(_dense(12), **kwargs)


def test_bad_group_among_many_is_a_value_error_naming_it():
    groups = _dense(12)
    groups[5], groups[6] = groups[6], groups[5]
    with pytest.raises(ValueError, match=r"groups\[6\]"):
        plan_multirate(groups)


# --------------------------------------------------------------------------------------------------------
# Assembling only the finalists that can win


@pytest.mark.parametrize(
    "groups, kwargs",
    [
        (_dense(3), dict(strategy="chebyshev-nested")),
        (_dense(12), dict(strategy="chebyshev")),
        (_irregular(), dict()),
        (_huge_gap(), dict(strategy="nested")),
        ([(0.5, 1.0), (0.5e-3, 1e-3)], dict(strategy="chebyshev-nested", merge=False)),
    ],
)
def test_predicted_range_brackets_the_assembled_prediction(groups, kwargs):
    plan = plan_multirate(groups, tol=TOL, **kwargs)
    kind = "nested" if plan.strategy == "nested" else "chebyshev"
    counts, log_rho = fine_counts(plan.spectrum, plan.members, kind, plan.rate_rule, plan.degrees, TOL)
    assert counts == plan.counts
    lo, hi = predicted_range(plan.cycle_length, log_rho, TOL)
    assert lo <= plan.predicted_iterations() <= hi
    # The slack is far below one cycle's worth of log-contraction except at a rounding boundary.
    assert hi - lo <= plan.cycle_length


def test_predicted_range_edges():
    assert predicted_range(10, -math.inf, TOL) == (10.0, 10.0)
    assert predicted_range(10, 0.0, TOL) == (0.0, math.inf)  # may not contract: assembled and judged as before
    lo, hi = predicted_range(10, math.log(TOL) / 3.0, TOL)  # exactly three cycles, up to rounding
    assert lo <= 30.0 <= hi


# --------------------------------------------------------------------------------------------------------
# In-place accumulation of runs


def _brute_runs(seq: np.ndarray) -> tuple[np.ndarray, ...]:
    """total, best prefix, best suffix, best contiguous run (each >= 0 but total) of the rows of ``seq``
    [steps, points], by trying every start and end."""
    L = seq.shape[0]
    sums = {(i, j): seq[i:j].sum(axis=0) for i in range(L + 1) for j in range(i, L + 1)}
    total = sums[(0, L)]
    prefix = np.max([sums[(0, j)] for j in range(L + 1)], axis=0)
    suffix = np.max([sums[(i, L)] for i in range(L + 1)], axis=0)
    run = np.max(list(sums.values()), axis=0)
    return total, prefix, suffix, run


@pytest.mark.parametrize("with_block", [False, True])
def test_level_runs_matches_a_brute_force_walk(with_block):
    rng = np.random.default_rng(0)
    npts, steps = 5, 6
    factors = [rng.normal(0.0, 1.0, npts) for _ in range(steps)]
    block_steps = rng.normal(-0.3, 1.0, (3, npts))
    block = None
    seq = np.stack(factors)
    if with_block:
        block = Runs(*_brute_runs(block_steps))
        seq = np.concatenate([np.concatenate([block_steps, f[None]]) for f in factors])
    got = level_runs(block, factors, npts)
    # Sums of a dozen O(1) terms in another order: agreement to 1e-12.
    for name, want in zip(("total", "prefix", "suffix", "run"), _brute_runs(seq)):
        np.testing.assert_allclose(getattr(got, name), want, rtol=1e-12, atol=1e-12, err_msg=name)
    # Runs.then gives the same, and leaves its operands alone.
    start = Runs.empty(npts)
    acc = start
    for f in factors:
        if block is not None:
            acc = acc.then(block)
        acc = acc.then(Runs.step(f))
    for name in ("total", "prefix", "suffix", "run"):
        np.testing.assert_array_equal(getattr(acc, name), getattr(got, name))
    assert all(not getattr(start, name).any() for name in ("total", "prefix", "suffix", "run"))
