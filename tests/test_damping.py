"""The two ways of damping a curvature factor against a dense numpy reference, and that a run uses the one
it is told to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgeon
from surgeon.linalg import add_damping, damped, damped_inverse
from surgeon.methods.surgeon import SurgeonConfig

from conftest import make_llama


def psd(n: int, seed: int, dead: int) -> np.ndarray:
    """A PSD matrix with badly scaled coordinates (as LLM activations) and ``dead`` all-zero ones."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n + 3)) * np.exp(rng.uniform(-3, 3, size=(n, 1)))
    M = X @ X.T
    M[:dead] = 0.0
    M[:, :dead] = 0.0
    return M


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**31 - 1), rel=st.floats(0.0, 2.0), dead=st.integers(0, 2))
def test_damping_modes_against_numpy(n, seed, rel, dead):
    M = psd(n, seed, min(dead, n - 1))
    d = np.diag(M)
    live = d > 0
    T = torch.from_numpy(M)
    mean_ref = M + rel * d.mean() * np.eye(n)
    np.testing.assert_allclose(add_damping(T, rel).numpy(), mean_ref, rtol=1e-12)
    diag_ref = M + np.diag(np.where(live, rel * d, rel * d.mean()))  # no curvature of its own: the mean form
    np.testing.assert_allclose(add_damping(T, rel, "diagonal").numpy(), diag_ref, rtol=1e-12)
    # the inverse is of the damped live block; dead coordinates stay out of it
    sub = M[np.ix_(live, live)]
    ref = np.linalg.inv(sub + rel * np.diag(np.diag(sub)))
    inv = damped_inverse(T, rel, mode="diagonal").numpy()
    np.testing.assert_allclose(inv[np.ix_(live, live)], ref, rtol=1e-5, atol=1e-8 * np.abs(ref).max())
    assert not inv[~live].any() and not inv[:, ~live].any()
    Dm = damped(T, rel, "diagonal").numpy()
    np.testing.assert_allclose(Dm[np.ix_(live, live)], sub + rel * np.diag(np.diag(sub)), rtol=1e-12)
    assert not Dm[~live].any()


def test_diagonal_damping_is_scale_free_per_coordinate():
    """Rescaling one input (D M D) rescales the diagonally damped inverse the same way; the mean form mixes
    the scales of all coordinates, so one outlier sets every other coordinate's damping."""
    M = torch.from_numpy(psd(6, 0, 0))
    D = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 100.0], dtype=M.dtype))
    a = damped_inverse(D @ M @ D, 0.1, mode="diagonal")
    b = torch.linalg.inv(D) @ damped_inverse(M, 0.1, mode="diagonal") @ torch.linalg.inv(D)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=0)
    a = damped_inverse(D @ M @ D, 0.1, mode="mean")
    b = torch.linalg.inv(D) @ damped_inverse(M, 0.1, mode="mean") @ torch.linalg.inv(D)
    assert not torch.allclose(a, b, rtol=1e-3)


def test_bad_damping_mode_is_named():
    with pytest.raises(ValueError, match="damp_mode"):
        SurgeonConfig(damp_mode="trace")
    with pytest.raises(ValueError, match="damping mode"):
        add_damping(torch.eye(3), 0.1, "trace")


def test_a_run_damps_the_way_it_is_told(calib):
    weights = {}
    for mode in ("mean", "diagonal"):
        model = make_llama()
        surgeon.prune(model, SurgeonConfig(structure="2:4", shots=1, damp_mode=mode, cg_iterations=5), calib,
                      device="cpu", progress=False)
        weights[mode] = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(weights["mean"], weights["diagonal"]))


def test_damp_mode_a_damps_A_alone(calib, monkeypatch):
    """``damp_mode_a`` changes how A is damped and leaves G to ``damp_mode``: the modes every inverse and
    damped factor of a run was built with, by factor."""
    import surgeon.methods.surgeon as ms

    seen: dict[str, set[str]] = {"G": set(), "A": set()}
    real_inverse = ms.damped_inverse

    def spy_inverse(M, rel, *, name="", mode="mean", **kw):
        seen[name.split()[-1]].add(mode)
        return real_inverse(M, rel, name=name, mode=mode, **kw)

    monkeypatch.setattr(ms, "damped_inverse", spy_inverse)
    model = make_llama()
    surgeon.prune(model, SurgeonConfig(structure="2:4", shots=1, damp_mode_a="diagonal", cg_iterations=5), calib,
                  device="cpu", progress=False)
    assert seen == {"G": {"mean"}, "A": {"diagonal"}}
    assert SurgeonConfig(damp_mode="diagonal").a_damp_mode == "diagonal"
    assert SurgeonConfig(damp_mode="diagonal", damp_mode_a="mean").a_damp_mode == "mean"
    with pytest.raises(ValueError, match="damp_mode_a"):
        SurgeonConfig(damp_mode_a="trace")


def test_nm_default_damps_A_diagonally_and_is_that_value(calib):
    """The N:M default is A damped 0.03 of its own diagonal: the same model as asking for it, another one than
    the mean form it replaced."""
    weights = {}
    for label, kw in (("default", {}), ("asked", {"damp_a": 0.03, "damp_mode_a": "diagonal"}),
                      ("before", {"damp_a": 0.01, "damp_mode_a": "mean"})):
        model = make_llama()
        surgeon.prune(model, SurgeonConfig(structure="2:4", shots=1, cg_iterations=5, **kw), calib, device="cpu",
                      progress=False)
        weights[label] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights["default"], weights["asked"]))
    assert any(not torch.equal(a, b) for a, b in zip(weights["default"], weights["before"]))
