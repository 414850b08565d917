"""Data-parallel calibration: two gloo processes on the CPU prune exactly as one process does.

Tolerance: a rank averages its factor over its own windows, the reduction multiplies that back by its
token count and adds the ranks, so factors differ from a one-process run only in the order and
rounding of fp32 additions (about 1e-7 relative). Masks must be identical; weights, which go through
damped inverses and OBS updates, agree to ``atol=1e-5 * max|W|`` (``rtol=1e-5``); the differences seen
are below 1e-6 of max|W|.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_llama

from surgeon import distributed
from surgeon.adapters import adapter_for
from surgeon.curvature import KFactors, estimate_kfac

WORLD = 2
SHOTS = 2
STRUCTURES = ("structured", "unstructured", "2:4")


def _calibration() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 96, (5, 16), generator=g)  # 5 windows: shares of 3 and 2


def _config(structure: str):
    from surgeon.methods.surgeon import SurgeonConfig

    # the empirical Fisher: sampled labels are drawn per rank, so they are another draw than one process's
    # 2:4 also refits (rank 0 solves, broadcasts)
    extra = {"refit": "admm"} if structure == "2:4" else {"sparsity": 0.25}
    return SurgeonConfig(structure=structure, shots=SHOTS, seed=0, fisher="empirical", **extra)


def _prune(structure: str) -> dict[str, torch.Tensor]:
    import surgeon

    model = make_llama(seed=0)
    surgeon.prune(model, _config(structure), _calibration(), device="cpu", progress=False)
    return {n: m.weight.detach().clone() for n, m in adapter_for(model).linears().items()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clone(factors: dict[str, KFactors]) -> dict[str, KFactors]:
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for n, f in factors.items():
        A = copies.setdefault(id(f.A), f.A.clone())
        G = copies.setdefault(id(f.G), f.G.clone())
        out[n] = KFactors(A=A, G=G, n_tokens=f.n_tokens)
    return out


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SURGEON_DEBUG_DISTRIBUTED="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        assert distributed.active() and distributed.rank() == rank and distributed.is_main() == (rank == 0)
        model = make_llama(seed=0)
        linears = adapter_for(model).linears()
        mine = distributed.shard(_calibration())
        local = estimate_kfac(model, linears, list(mine.split(1)))
        assert next(iter(local.values())).n_tokens == mine.numel()

        everywhere = distributed.reduce_factors(_clone(local))
        q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
        assert everywhere[q].A is everywhere[k].A  # shared inputs stay shared
        # owners: each factor summed onto one rank only
        names = sorted(local)
        owners = dict(zip(names, distributed.assign([distributed.inversion_work(local)[n] for n in names])))
        owned = distributed.reduce_factors(_clone(local), owners=owners)
        assert set(owned) == {n for n in names if owners[n] == rank}
        for n, f in owned.items():
            torch.testing.assert_close(f.G, everywhere[n].G, rtol=1e-5, atol=1e-7 * float(f.G.abs().max()))
            torch.testing.assert_close(f.A, everywhere[n].A, rtol=1e-5, atol=1e-7 * float(f.A.abs().max()))
        # inverses computed on their owners and broadcast equal the ones computed everywhere
        inverses = distributed.spread(
            names, lambda n: everywhere[n].inverses(0.01, 0.01)[0], owners,
            lambda n: ((linears[n].out_features,) * 2, torch.float32, torch.device("cpu")))
        for n in names:
            assert torch.equal(inverses[n], everywhere[n].inverses(0.01, 0.01)[0])
        distributed.assert_same("identical", [everywhere[q].A])
        try:
            distributed.assert_same("rank-dependent", [torch.full((3,), float(rank))])
            raise AssertionError("assert_same missed a difference")
        except RuntimeError as e:
            assert "differ between ranks" in str(e)
        torch.save({"factors": {n: (f.A, f.G, f.n_tokens) for n, f in everywhere.items()}},
                   Path(out) / f"factors{rank}.pt")
        exact = distributed.reduce_factors(estimate_kfac(model, linears, list(mine.split(1)), dtype=torch.float64))
        torch.save({n: (f.A.float(), f.G.float()) for n, f in exact.items()}, Path(out) / f"exact{rank}.pt")
        for structure in STRUCTURES:
            torch.save(_prune(structure), Path(out) / f"{structure}{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


# -- one process: everything is a no-op ------------------------------------------------------------


def test_single_process_is_a_no_op():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main() and distributed.rank_seed(7) == 7
    calib = _calibration()
    assert distributed.shard(calib) is calib
    factors = {"x": KFactors(A=torch.eye(2), G=torch.eye(3), n_tokens=4)}
    assert distributed.reduce_factors(factors) is factors
    distributed.assert_same("anything", [torch.randn(3)])
    assert distributed.spread(["a"], lambda k: torch.ones(1), {"a": 0}, lambda k: ((1,), torch.float32, "cpu"))["a"] == 1


@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (2, 2), (16, 8), (3, 1)])
def test_shards_are_contiguous_balanced_and_cover_everything(n, world):
    bounds = [distributed.shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_assign_is_longest_processing_time_first():
    work = [11008.0**3, 4096.0**3, 4096.0**3, 11008.0**3, 1.0, 11008.0**3]
    owners = distributed.assign(work, 2)
    assert owners == [0, 1, 1, 1, 1, 0]  # largest first, each to the least loaded rank (ties: lower rank)
    assert distributed.assign([3.0, 3.0, 2.0, 2.0, 2.0], 2) == [0, 1, 0, 1, 0]
    assert distributed.assign([1.0, 2.0], 4) == [1, 0]
    with pytest.raises(ValueError):
        distributed.assign([1.0], 0)


# -- two processes ---------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_prune_like_one_process(tmp_path, monkeypatch):
    if Path("/sys/class/net/lo").exists() and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback, whatever the host name resolves to
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # the factors of two ranks are those of one process over all windows
    model = make_llama(seed=0)
    ref = estimate_kfac(model, adapter_for(model).linears(), list(_calibration().split(1)))
    got = [torch.load(tmp_path / f"factors{r}.pt")["factors"] for r in range(WORLD)]
    for name, f in ref.items():
        A0, G0, n0 = got[0][name]
        A1, G1, n1 = got[1][name]
        assert n0 == n1 == f.n_tokens == _calibration().numel()
        assert torch.equal(A0, A1) and torch.equal(G0, G1)
        torch.testing.assert_close(A0, f.A, rtol=1e-5, atol=1e-6 * float(f.A.abs().max()))
        torch.testing.assert_close(G0, f.G, rtol=1e-5, atol=1e-6 * float(f.G.abs().max()))
    # summed in float64, the factors are those of one process to the last bit of their fp32 values
    exact = estimate_kfac(model, adapter_for(model).linears(), list(_calibration().split(1)), dtype=torch.float64)
    for r in range(WORLD):
        for name, (A, G) in torch.load(tmp_path / f"exact{r}.pt").items():
            assert torch.equal(A, exact[name].A.float()) and torch.equal(G, exact[name].G.float()), name

    for structure in STRUCTURES:
        ranks = [torch.load(tmp_path / f"{structure}{r}.pt") for r in range(WORLD)]
        single = _prune(structure)
        for name, w in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{structure} {name}: ranks differ"
            d = ranks[0][name]
            assert d.shape == w.shape, f"{structure} {name}: {tuple(d.shape)} vs {tuple(w.shape)}"
            assert torch.equal(d != 0, w != 0), f"{structure} {name}: masks differ"
            torch.testing.assert_close(d, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
        if structure == "structured":
            assert any(single[n].shape != make_llama(seed=0).get_submodule(n).weight.shape for n in single)
        else:
            assert sum(int((w == 0).sum()) for w in single.values()) > 0


def test_init_from_env_outside_torchrun_and_bad_devices(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is None and not distributed.active()
    distributed.barrier()  # no-ops in one process
    distributed.finish()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="each rank takes its own device"):
        distributed.init_from_env("cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.init_from_env("cuda")
