"""Parity of the selection and schedule kernels: native (Rust), torch twin, and a plain NumPy oracle.

Every public function of ``surgeon._backend`` runs under each available implementation (the
``kern`` fixture) and is compared with a slow reference written here from the documented rules:
the global order is (cost, array index, position), found with ``np.lexsort`` on the concatenation;
``-0.0`` and ``0.0`` are the same cost; NaN is an error naming the array.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from surgeon import _backend

REQUIRE_NATIVE = _backend._truthy(os.environ.get("SURGEON_REQUIRE_NATIVE"))
F32 = np.finfo(np.float32)
KINDS = ("linear", "cubic", "exponential")


@pytest.fixture(scope="module", params=["rust", "torch"])
def kern(request):
    """One implementation of the kernels; the native one is skipped (or fails) when not built."""
    if request.param == "rust" and not _backend.native_available():
        reason = (
            f"surgeon._native is not built ({_backend.NATIVE_IMPORT_ERROR}); "
            "run `maturin develop --release` to test the native kernels"
        )
        if REQUIRE_NATIVE:
            pytest.fail(reason)
        pytest.skip(reason)
    return _backend.get_backend(request.param)


# --------------------------------------------------------------------------------------------------
# NumPy oracle


def _nan_check(arrays, names=None):
    for i, a in enumerate(arrays):
        if np.isnan(a).any():
            label = f" ('{names[i]}')" if names is not None else ""
            raise ValueError(f"cost array {i}{label} contains NaN")


def ref_order(arrays):
    """(cost, owner, position, order): the concatenation and its global order (the slow oracle)."""
    arrays = [np.asarray(a, dtype=np.float32).ravel() for a in arrays]
    _nan_check(arrays)
    if not arrays or sum(a.size for a in arrays) == 0:
        return None
    cost = np.concatenate(arrays)
    cost = np.where(cost == 0, np.float32(0), cost)  # -0.0 is the same cost as 0.0
    owner = np.concatenate([np.full(a.size, i, dtype=np.int64) for i, a in enumerate(arrays)])
    pos = np.concatenate([np.arange(a.size, dtype=np.int64) for a in arrays])
    return cost, owner, pos, np.lexsort((pos, owner, cost))


def ref_select(arrays, k, weights=None, prepared=None):
    """(threshold, counts, positions) of the longest weighted prefix of the global order."""
    n = len(arrays)
    prepared = prepared if prepared is not None else ref_order(arrays)
    if prepared is None:
        return float("-inf"), [0] * n, [np.zeros(0, np.int64) for _ in arrays]
    cost, owner, pos, order = prepared
    weights = list(weights) if weights is not None else [1] * n
    cum = np.cumsum(np.asarray(weights, dtype=np.int64)[owner[order]])
    taken = int(np.searchsorted(cum, min(int(k), int(cum[-1])), side="right"))
    sel = order[:taken]
    threshold = float(cost[sel[-1]]) if taken else float("-inf")
    counts = np.bincount(owner[sel], minlength=n).tolist()
    positions = [np.sort(pos[sel][owner[sel] == i]) for i in range(n)]
    return threshold, counts, positions


def ref_rank(costs, k):
    c = np.asarray(costs, dtype=np.float32).ravel()
    _nan_check([c])
    c = np.where(c == 0, np.float32(0), c)
    return np.lexsort((np.arange(c.size), c))[: min(int(k), c.size)].astype(np.int64)


def ref_nm(scores, n, m):
    s = np.asarray(scores, dtype=np.float32)
    rows, cols = s.shape
    groups = s.reshape(rows, cols // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")  # highest first, ties by position
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows, cols)


def ref_schedule(f, shots, kind):
    out, prev = [], 0.0
    for t in range(1, shots + 1):
        u = t / shots
        if t == shots:
            s = f
        elif kind == "linear":
            s = f * u
        elif kind == "cubic":
            s = f * (1.0 - (1.0 - u) * (1.0 - u) * (1.0 - u))
        else:
            s = 1.0 - math.pow(1.0 - f, u)
        prev = min(max(s, prev), f)
        out.append(prev)
    return out


def ref_counts(total, f, shots, kind):
    def count(s):
        return min(total, max(0, math.floor(s * total + 1e-9)))

    final = count(f)
    out, prev = [], 0
    for t, s in enumerate(ref_schedule(f, shots, kind)):
        prev = final if t == shots - 1 else max(min(count(s), final), prev)
        out.append(prev)
    return out


def bits(x):
    """Bit pattern of a float32, so that 0.0 and -0.0 differ."""
    return np.float32(x).tobytes()


# --------------------------------------------------------------------------------------------------
# Strategies

POOL = [
    -np.inf, np.inf, -0.0, 0.0, 1.0, -1.0, 2.5, 3.0,
    float(F32.max), float(F32.min), float(F32.smallest_subnormal), -float(F32.smallest_subnormal),
    float(F32.smallest_normal), 1e-40,
]
values = st.one_of(
    st.sampled_from(POOL),
    st.sampled_from([0.0, -0.0, 1.0, 2.0]),  # many ties
    st.floats(width=32, allow_nan=False),
)
cost_array = hnp.arrays(np.float32, st.integers(0, 30), elements=values)
cost_lists = st.lists(cost_array, min_size=0, max_size=6)


@st.composite
def selections(draw):
    """(arrays, k, weights): weights None or small positive ints; k around the total, or huge."""
    arrays = draw(cost_lists)
    weights = draw(st.one_of(st.none(), st.lists(st.integers(1, 4), min_size=len(arrays), max_size=len(arrays))))
    w = weights or [1] * len(arrays)
    total = sum(a.size * wi for a, wi in zip(arrays, w))
    k = draw(st.one_of(st.integers(0, total + 3), st.sampled_from([0, total, 2**62, 2**80])))
    return arrays, k, weights


# --------------------------------------------------------------------------------------------------
# Global threshold and selection


@given(case=selections())
def test_global_threshold_matches_reference(kern, case):
    arrays, k, weights = case
    threshold, counts = kern.global_threshold(arrays, k, weights)
    want_t, want_c, _ = ref_select(arrays, k, weights)
    assert counts == want_c
    assert bits(threshold) == bits(want_t)
    assert isinstance(threshold, float) and all(type(c) is int for c in counts)


@given(case=selections())
def test_select_smallest_matches_reference(kern, case):
    arrays, k, weights = case
    got = kern.select_smallest(arrays, k, weights)
    _, counts, want = ref_select(arrays, k, weights)
    assert len(got) == len(want)
    for g, w, c in zip(got, want, counts):
        assert g.dtype == np.int64 and g.ndim == 1
        np.testing.assert_array_equal(g, w)
        assert g.size == c


@given(arrays=cost_lists, fraction=st.floats(0.0, 1.0))
def test_fraction_is_floor_of_total(kern, arrays, fraction):
    total = sum(a.size for a in arrays)
    k = min(total, math.floor(fraction * total + 1e-9))
    assert kern.global_threshold(arrays, fraction=fraction) == kern.global_threshold(arrays, k)


@given(costs=cost_array, k=st.integers(0, 40))
def test_rank_matches_reference(kern, costs, k):
    got = kern.rank(costs, k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref_rank(costs, k))


def test_edge_cases(kern):
    a = np.array([3.0, 1.0, 2.0], np.float32)
    b = np.array([1.0, 0.5], np.float32)
    empty = np.zeros(0, np.float32)
    assert kern.global_threshold([], 5) == (float("-inf"), [])
    assert kern.global_threshold([empty, empty], 0) == (float("-inf"), [0, 0])
    assert kern.global_threshold([a, b], 0) == (float("-inf"), [0, 0])
    assert kern.global_threshold([a, b], 2) == (1.0, [1, 1])  # the tie at 1.0 goes to array 0 first
    assert kern.global_threshold([a, empty, b], 5) == (3.0, [3, 0, 2])  # k == n
    assert kern.global_threshold([a, b], 2**100) == (3.0, [3, 2])  # k > n
    assert kern.global_threshold([np.array([7.0], np.float32)], 1) == (7.0, [1])
    # The prefix stops at the first entry that does not fit, even if a later one would.
    assert kern.global_threshold([np.array([1.0], np.float32), np.array([2.0], np.float32)], 4, [5, 1]) == (
        float("-inf"),
        [0, 0],
    )
    # -inf costs: threshold -inf, but counts say something was selected.
    assert kern.global_threshold([np.array([-np.inf, 0.0], np.float32)], 1) == (float("-inf"), [1])
    # -0.0 and 0.0 tie: order by array index, then position; the threshold is +0.0.
    t, c = kern.global_threshold([np.array([0.0, -0.0], np.float32), np.array([-0.0], np.float32)], 2)
    assert (bits(t), c) == (bits(0.0), [2, 0])
    got = kern.select_smallest([np.array([0.0, -0.0, 0.0], np.float32), np.array([-0.0], np.float32)], 2)
    assert [g.tolist() for g in got] == [[0, 1], []]
    np.testing.assert_array_equal(kern.rank(np.array([2.0, -0.0, 1.0, 0.0], np.float32), 3), [1, 3, 2])
    assert kern.rank(empty, 3).tolist() == []


def test_large_arrays_with_partial_ties(kern):
    """Arrays larger than one native work chunk (2**20), with the cut inside a run of ties."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 50, size=s).astype(np.float32) for s in (1_100_000, 5, 1_200_001)]
    arrays[1][:] = 7.0
    weights = [1, 3, 2]
    total = sum(a.size * w for a, w in zip(arrays, weights))
    prepared = ref_order(arrays)
    for k in (0, 123_457, total // 3 + 1, total - 1):
        t, counts = kern.global_threshold(arrays, k, weights)
        want_t, want_c, want_p = ref_select(arrays, k, weights, prepared)
        assert (t, counts) == (want_t, want_c)
        for g, w in zip(kern.select_smallest(arrays, k, weights), want_p):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(kern.rank(arrays[0], 200_000), ref_rank(arrays[0], 200_000))


def test_backends_agree_directly():
    if not _backend.native_available():
        pytest.skip("surgeon._native is not built")
    rust, twin = _backend.get_backend("rust"), _backend.get_backend("torch")
    rng = np.random.default_rng(1)
    arrays = [np.round(rng.standard_normal(n), 1).astype(np.float32) for n in (0, 1, 1000, 40_000)]
    for k in (0, 1, 999, 20_000, 41_001, 10**9):
        assert rust.global_threshold(arrays, k, [2, 1, 3, 1]) == twin.global_threshold(arrays, k, [2, 1, 3, 1])
        for r, t in zip(rust.select_smallest(arrays, k), twin.select_smallest(arrays, k)):
            np.testing.assert_array_equal(r, t)
    scores = np.round(rng.standard_normal((64, 96)), 1).astype(np.float32)
    np.testing.assert_array_equal(rust.nm_mask(scores, 2, 4), twin.nm_mask(scores, 2, 4))


# --------------------------------------------------------------------------------------------------
# Inputs: tensors, dtypes, shapes


def test_accepts_tensors_and_other_dtypes(kern):
    a = torch.tensor([[3.0, 1.0], [2.0, -0.0]])  # 2-D: flat positions
    b = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    c = np.array([5.0, 0.25], dtype=">f4")  # big-endian
    d = torch.arange(10, dtype=torch.float32)[::3]  # non-contiguous
    e = torch.tensor([1.5, 0.0], dtype=torch.bfloat16)
    arrays = [a, b, c, d, e]
    ref_arrays = [np.asarray(x.detach().float().numpy() if isinstance(x, torch.Tensor) else x) for x in arrays]
    for k in range(0, 13):
        assert kern.global_threshold(arrays, k) == ref_select(ref_arrays, k)[:2]
    got = kern.select_smallest(arrays, 4)
    assert all(isinstance(g, np.ndarray) and g.dtype == np.int64 for g in got)
    assert [g.tolist() for g in got] == [[3], [], [1], [0], [1]]  # three zeros by array index, then 0.25
    np.testing.assert_array_equal(kern.rank(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), 3), [2, 1, 0])
    mask = kern.nm_mask(torch.tensor([[1.0, 2.0, 4.0, 3.0]], dtype=torch.float64), 2, 4)
    assert mask.dtype == np.bool_ and mask.tolist() == [[False, False, True, True]]


def test_host_conversion_is_zero_copy_for_contiguous_float32():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert np.shares_memory(_backend._host_f32(t), t.numpy())
    n = np.arange(6, dtype=np.float32)
    assert np.shares_memory(_backend._host_f32(n), n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu(kern):
    rng = np.random.default_rng(2)
    arrays = [np.round(rng.standard_normal(n), 1).astype(np.float32) for n in (10, 5000, 70_000)]
    cuda = [torch.from_numpy(a).cuda() for a in arrays]
    for k in (0, 17, 30_000, 10**6):
        assert kern.global_threshold(cuda, k, [1, 2, 1]) == kern.global_threshold(arrays, k, [1, 2, 1])
        for g, w in zip(kern.select_smallest(cuda, k), kern.select_smallest(arrays, k)):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(kern.rank(cuda[2], 999), kern.rank(arrays[2], 999))
    s = np.round(rng.standard_normal((128, 64)), 1).astype(np.float32)
    s[0, :4] = [0.0, -0.0, 0.0, -0.0]
    np.testing.assert_array_equal(kern.nm_mask(torch.from_numpy(s).cuda(), 2, 4), ref_nm(s, 2, 4))


# --------------------------------------------------------------------------------------------------
# Errors


@given(arrays=st.lists(cost_array, min_size=1, max_size=5), data=st.data())
def test_nan_names_the_first_array_with_nan(kern, arrays, data):
    arrays = [a.copy() for a in arrays]
    hit = sorted(data.draw(st.sets(st.integers(0, len(arrays) - 1), min_size=1)))
    for i in hit:
        arrays[i] = np.append(arrays[i], np.float32("nan"))
        arrays[i] = np.array(data.draw(st.permutations(arrays[i].tolist())), dtype=np.float32)
    names = [f"layer{i}.weight" for i in range(len(arrays))]
    k = data.draw(st.integers(0, 2 * sum(a.size for a in arrays)))
    first = hit[0]
    with pytest.raises(ValueError, match=rf"^cost array {first} contains NaN$"):
        kern.global_threshold(arrays, k)
    with pytest.raises(ValueError, match=rf"^cost array {first} \('layer{first}.weight'\) contains NaN$"):
        kern.global_threshold(arrays, k, names=names)
    with pytest.raises(ValueError, match=rf"^cost array {first} \('layer{first}.weight'\) contains NaN$"):
        kern.select_smallest(arrays, k, names=names)
    with pytest.raises(ValueError, match="contains NaN"):
        kern.rank(arrays[first], k)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.global_threshold([np.ones(3, np.float32)], -1), "k must be >= 0"),
        (lambda b: b.global_threshold([np.ones(3, np.float32)], 1.5), "k must be an integer"),
        (lambda b: b.global_threshold([np.ones(3, np.float32)]), "exactly one of k and fraction"),
        (lambda b: b.global_threshold([np.ones(3, np.float32)], 1, fraction=0.5), "exactly one of k and fraction"),
        (lambda b: b.global_threshold([np.ones(3, np.float32)], fraction=1.5), "fraction must satisfy"),
        (lambda b: b.global_threshold(np.ones(3, np.float32), 1), "not a single array"),
        (lambda b: b.global_threshold([np.ones(2, np.complex64)], 1), "real numbers"),
        (lambda b: b.global_threshold([np.ones(2, np.float32)], 1, [0]), r"weights\[0\] is 0"),
        (lambda b: b.global_threshold([np.ones(2, np.float32)], 1, [-2]), r"weights\[0\] is -2"),
        (lambda b: b.global_threshold([np.ones(2, np.float32)], 1, [1, 2]), "weights has 2 entries for 1 arrays"),
        (lambda b: b.select_smallest([np.ones(2, np.float32)] * 2, 1, [2**62, 2**62]), "must be below 2"),
        (lambda b: b.select_smallest([np.ones(2, np.float32)], 1, names=["a", "b"]), "names has 2 entries"),
        (lambda b: b.rank(np.ones(3, np.float32), -3), "k must be >= 0"),
    ],
)
def test_selection_argument_errors(kern, call, message):
    with pytest.raises(ValueError, match=message):
        call(kern)


# --------------------------------------------------------------------------------------------------
# N:M

NM = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (3, 5), (10, 40)]


@given(data=st.data(), nm=st.sampled_from(NM))
def test_nm_mask_matches_reference(kern, data, nm):
    n, m = nm
    rows = data.draw(st.integers(0, 5))
    groups = data.draw(st.integers(0, 4))
    scores = data.draw(hnp.arrays(np.float32, (rows, groups * m), elements=values))
    got = kern.nm_mask(scores, n, m)
    assert got.dtype == np.bool_ and got.shape == scores.shape
    np.testing.assert_array_equal(got, ref_nm(scores, n, m))
    if scores.size:
        assert (got.reshape(rows, groups, m).sum(-1) == n).all()


@pytest.mark.parametrize(
    ("shape", "n", "m", "message"),
    [
        ((2, 6), 2, 4, "m to divide the row length"),
        ((2, 8), 0, 4, "0 < n < m"),
        ((2, 8), 4, 4, "0 < n < m"),
        ((2, 8), 5, 4, "0 < n < m"),
        ((2, 8), 2, 0, "0 < n < m"),
        ((8,), 2, 4, "must be 2-D"),
        ((2, 2, 4), 2, 4, "must be 2-D"),
    ],
)
def test_nm_mask_invalid(kern, shape, n, m, message):
    with pytest.raises(ValueError, match=message):
        kern.nm_mask(np.ones(shape, np.float32), n, m)


def test_nm_mask_nan_names_the_row(kern):
    s = np.ones((4, 8), np.float32)
    s[3, 1] = s[2, 7] = np.nan
    with pytest.raises(ValueError, match=r"^scores contain NaN in row 2$"):
        kern.nm_mask(s, 2, 4)


# --------------------------------------------------------------------------------------------------
# Schedules

finals = st.one_of(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1 - 1e-12]), st.floats(0.0, 1.0, exclude_max=True))


@given(f=finals, shots=st.integers(1, 60), kind=st.sampled_from(KINDS), total=st.integers(0, 10**12))
def test_schedule_matches_reference(kern, f, shots, kind, total):
    s = kern.schedule(f, shots, kind)
    assert s == ref_schedule(f, shots, kind)
    assert all(type(x) is float for x in s)
    assert len(s) == shots and s[-1] == f and 0.0 <= s[0]
    assert all(x <= y for x, y in zip(s, s[1:])) and all(x <= f for x in s)
    counts = kern.cumulative_counts(total, f, shots, kind)
    assert counts.dtype == np.int64 and counts.shape == (shots,)
    assert counts.tolist() == ref_counts(total, f, shots, kind)
    final = min(total, math.floor(f * total + 1e-9))
    assert counts[-1] == final and (np.diff(counts) >= 0).all() and (counts <= final).all()


@given(f=finals, shots=st.integers(1, 30), kind=st.sampled_from(KINDS), total=st.integers(0, 10**6), data=st.data())
def test_next_count_tracks_cumulative_counts(kern, f, shots, kind, total, data):
    counts = kern.cumulative_counts(total, f, shots, kind).tolist()
    removed = 0
    for shot in range(shots):
        step = kern.next_count(removed, shot, total, f, shots, kind)
        assert type(step) is int and step >= 0
        removed += step
        assert removed == counts[shot]
        # With more already removed (by other means): what is left of this shot's count, never negative.
        extra = data.draw(st.integers(0, total + 5))
        assert kern.next_count(removed + extra, shot, total, f, shots, kind) == max(0, counts[shot] - removed - extra)


def test_schedule_known_values(kern):
    assert kern.schedule(0.5, 4, "linear") == [0.125, 0.25, 0.375, 0.5]
    assert kern.schedule(0.0, 3, "exponential") == [0.0, 0.0, 0.0]
    assert kern.schedule(0.75, 2, "exponential") == pytest.approx([0.5, 0.75], abs=1e-15)
    assert kern.schedule(0.8, 2, "cubic") == pytest.approx([0.7, 0.8], abs=1e-15)
    assert kern.cumulative_counts(10, 0.3, 3, "linear").tolist() == [1, 2, 3]
    assert kern.next_count(0, 0, 10, 0.3, 3, "linear") == 1
    assert kern.next_count(100, 2, 10, 0.3, 3, "linear") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.0, 3, "linear"), "0 <= final_sparsity < 1"),
        ((-0.1, 3, "linear"), "0 <= final_sparsity < 1"),
        ((float("nan"), 3, "linear"), "0 <= final_sparsity < 1"),
        ((0.5, 0, "linear"), "shots must be between 1"),
        ((0.5, 2.0, "linear"), "shots must be an integer"),
        ((0.5, 3, "quadratic"), "unknown schedule kind 'quadratic'"),
    ],
)
def test_schedule_errors(kern, args, message):
    with pytest.raises(ValueError, match=message):
        kern.schedule(*args)
    with pytest.raises(ValueError, match=message):
        kern.cumulative_counts(100, *args)
    with pytest.raises(ValueError, match=message):
        kern.next_count(0, 0, 100, *args)


def test_count_argument_errors(kern):
    with pytest.raises(ValueError, match="total must satisfy"):
        kern.cumulative_counts(-1, 0.5, 3, "linear")
    with pytest.raises(ValueError, match="shot must satisfy"):
        kern.next_count(0, 3, 100, 0.5, 3, "linear")
    with pytest.raises(ValueError, match="removed_so_far must be >= 0"):
        kern.next_count(-1, 0, 100, 0.5, 3, "linear")


# --------------------------------------------------------------------------------------------------
# Choice of implementation


def test_backend_follows_environment():
    choice = os.environ.get("SURGEON_BACKEND", "auto").strip().lower() or "auto"
    expected = choice if choice != "auto" else ("rust" if _backend.native_available() else "torch")
    assert _backend.backend_name() == expected
    assert _backend.available_backends()[-1] == "torch"


def test_environment_selects_and_rejects():
    script = "import surgeon._backend as b; print(b.backend_name())"
    env = {**os.environ, "SURGEON_BACKEND": "torch", "SURGEON_REQUIRE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["SURGEON_BACKEND"] = "fortran"
    bad = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "SURGEON_BACKEND must be" in bad.stderr


def test_set_backend_switches_module_functions():
    before = _backend.backend_name()
    try:
        for name in _backend.available_backends():
            _backend.set_backend(name)
            assert _backend.backend_name() == name
            assert _backend.global_threshold([np.array([2.0, 1.0], np.float32)], 1) == (1.0, [1])
        with pytest.raises(ValueError, match="unknown backend"):
            _backend.set_backend("fortran")
    finally:
        _backend.set_backend(before)
