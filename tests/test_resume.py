"""Checkpoints and resume: an interrupted run, resumed, ends exactly where an uninterrupted one does.

Also determinism: the same seed gives the same masks and weights on the same device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_opt
from safetensors.torch import load_file

import surgeon
from surgeon.checkpoint import Checkpointer
from surgeon.config import MethodConfig, option
from surgeon.methods import METHODS
from surgeon.methods.base import register

REPO = Path(__file__).resolve().parent.parent
FAST = {"correlation": "row", "max_correlate": 64}


@pytest.fixture
def calib4():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (4, 16), generator=g)


class Crash(Exception):
    pass


class CrashAfter(Checkpointer):
    """Writes checkpoints like the real one, then fails after the n-th, like a machine lost mid-run."""

    def __init__(self, path, n):
        super().__init__(path)
        self.n = n

    def __call__(self, kind, state):
        super().__call__(kind, state)
        if self.saved >= self.n:
            raise Crash(kind)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def _surgeon(structure, shots=3):
    cls = METHODS["llm-surgeon"][0]
    return cls(sparsity=0.3 if structure == "structured" else 0.5, structure=structure, shots=shots, **FAST)


@pytest.mark.parametrize(("family", "structure"), [("llama", "structured"), ("opt", "unstructured")])
def test_interrupted_run_resumes_to_the_same_model(tmp_path, calib4, family, structure):
    make = make_llama if family == "llama" else make_opt
    cfg = _surgeon(structure)
    ref = make()
    ref_report = surgeon.prune(ref, cfg, calib4, device="cpu", progress=False)

    model = make()
    with pytest.raises(Crash):
        surgeon.prune(model, cfg, calib4, device="cpu", progress=False, checkpoint=CrashAfter(tmp_path / "ckpt", 1))

    ckpt = Checkpointer(tmp_path / "ckpt")
    state = ckpt.load_state()
    assert state["next_shot"] == 1 and state["_kind"] == "shot" and len(state["shots"]) == 1
    resumed = ckpt.load_model(attn_implementation="eager")
    report = surgeon.prune(resumed, cfg, calib4, device="cpu", progress=False, checkpoint=ckpt, resume_state=state)

    _same_weights(resumed, ref)
    with torch.no_grad():
        assert torch.equal(resumed(calib4).logits, ref(calib4).logits)
    assert report.params_before == ref_report.params_before
    assert report.params_after == ref_report.params_after
    assert [s["shot"] for s in report.shots] == [1, 2, 3]
    assert [s["achieved_sparsity"] for s in report.shots] == [s["achieved_sparsity"] for s in ref_report.shots]
    assert report.extra["resumed"] == 1
    assert report.extra.get("kept_structures") == ref_report.extra.get("kept_structures")
    assert (structure == "structured") == ("kept_structures" in report.extra)
    assert ckpt.load_state()["next_shot"] == 3  # the resumed run kept checkpointing
    ckpt.clear()
    assert not ckpt.exists() and not (tmp_path / "ckpt").exists()


def test_nm_resume_with_zeros_already_in_the_weights(tmp_path, calib4):
    """Exact zeros of a dequantised checkpoint look like removals after a resume: the pattern still holds."""
    cfg = METHODS["llm-surgeon"][0](structure="2:4", shots=3, **FAST)

    def zeroed():
        model = make_llama()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "proj" in name:
                    p[torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) < 0.4] = 0
        return model

    with pytest.raises(Crash):
        surgeon.prune(zeroed(), cfg, calib4, device="cpu", progress=False, checkpoint=CrashAfter(tmp_path / "c", 1))
    ckpt = Checkpointer(tmp_path / "c")
    model = ckpt.load_model(attn_implementation="eager")
    surgeon.prune(model, cfg, calib4, device="cpu", progress=False, checkpoint=ckpt, resume_state=ckpt.load_state())
    for name, p in model.named_parameters():
        if "proj" in name:
            assert int((p.view(p.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name


def test_kill_mid_swap_falls_back_to_previous_checkpoint(tmp_path, calib4):
    cfg = _surgeon("unstructured", shots=2)
    with pytest.raises(Crash):
        surgeon.prune(make_llama(), cfg, calib4, device="cpu", progress=False, checkpoint=CrashAfter(tmp_path / "c", 1))
    # a kill between the two renames of a swap leaves only the previous checkpoint, under its old name
    os.replace(tmp_path / "c", tmp_path / ".c.old")
    ckpt = Checkpointer(tmp_path / "c")
    assert ckpt.exists() and ckpt.load_state()["next_shot"] == 1
    assert ckpt.load_model() is not None
    assert Checkpointer(tmp_path / "none").load_state() is None


def test_resume_with_another_config_is_refused(tmp_path, calib4):
    with pytest.raises(Crash):
        surgeon.prune(make_llama(), _surgeon("unstructured", shots=2), calib4, device="cpu", progress=False,
                      checkpoint=CrashAfter(tmp_path / "c", 1))
    ckpt = Checkpointer(tmp_path / "c")
    other = _surgeon("unstructured", shots=3)
    with pytest.raises(ValueError, match="another config"):
        surgeon.prune(ckpt.load_model(), other, calib4, device="cpu", progress=False, resume_state=ckpt.load_state())


def test_min_interval_skips_checkpoints(tmp_path, calib4):
    ckpt = Checkpointer(tmp_path / "c", min_interval_s=3600)
    surgeon.prune(make_llama(), _surgeon("unstructured", shots=2), calib4, device="cpu", progress=False, checkpoint=ckpt)
    assert ckpt.saved == 1 and ckpt.load_state()["next_shot"] == 1


def test_unbound_checkpointer_explains_itself(tmp_path):
    with pytest.raises(RuntimeError, match="surgeon.prune"):
        Checkpointer(tmp_path)("shot", {})


# -- a layer-sequential method checkpointing per layer -------------------------------------------------
@dataclass(frozen=True)
class _LayerwiseConfig(MethodConfig):
    method = "test-layerwise"
    scale: float = option(0.5, "how strongly each layer's weights are perturbed before pruning")


def _layerwise(ctx):
    """Per layer: perturb with the global RNG (so a resume must restore it), then zero the smallest weights."""
    start = int((ctx.resume_state or {}).get("next_layer", 0))
    for i in range(start, len(ctx.adapter.layers)):
        for lin in ctx.adapter.layer_linears(i).values():
            w = lin.weight.data
            w.add_(torch.randn(w.shape) * ctx.config.scale * w.std())
            w.masked_fill_(w.abs() < w.abs().median(), 0)
        if ctx.checkpoint is not None:
            ctx.checkpoint("layer", {"next_layer": i + 1})


@pytest.fixture
def layerwise():
    register(_LayerwiseConfig)(_layerwise)
    yield _LayerwiseConfig()
    METHODS.pop("test-layerwise", None)


def _kill_and_resume_by_layer(tmp_path, calib4, cfg, crash_after):
    """Run ``cfg`` uninterrupted, then killed after ``crash_after`` layer checkpoints and resumed:
    both must end with the same weights."""
    ref = make_llama(layers=3)
    surgeon.prune(ref, cfg, calib4, device="cpu", progress=False)
    with pytest.raises(Crash):
        surgeon.prune(make_llama(layers=3), cfg, calib4, device="cpu", progress=False,
                      checkpoint=CrashAfter(tmp_path / "c", crash_after))
    ckpt = Checkpointer(tmp_path / "c")
    state = ckpt.load_state()
    assert state["_kind"] == "layer" and state["next_layer"] == crash_after
    model = ckpt.load_model(attn_implementation="eager")
    surgeon.prune(model, cfg, calib4, device="cpu", progress=False, checkpoint=ckpt, resume_state=state)
    _same_weights(model, ref)


def test_layer_checkpoints_resume(tmp_path, calib4, layerwise):
    _kill_and_resume_by_layer(tmp_path, calib4, layerwise, 2)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_layer_sequential_methods_resume(tmp_path, calib4, method):
    """Killed after its first block, a layer-sequential run resumes to the model of an uninterrupted run."""
    _kill_and_resume_by_layer(tmp_path, calib4, METHODS[method][0](sparsity=0.5), 1)


# -- determinism --------------------------------------------------------------------------------------
def test_same_seed_same_weights(calib4):
    cfg = _surgeon("unstructured", shots=2)
    a, b = make_llama(), make_llama()
    surgeon.prune(a, cfg, calib4, device="cpu", progress=False)
    surgeon.prune(b, cfg, calib4, device="cpu", progress=False)
    _same_weights(a, b)
    masks = [(lin.weight == 0) for lin in surgeon.adapters.adapter_for(a).linears().values()]
    assert 0.45 < sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) < 0.55


# -- the command line, killed for real ----------------------------------------------------------------
def test_cli_killed_after_first_checkpoint_resumes(tmp_path, calib4):
    """A ``surgeon prune`` process killed (SIGKILL, no cleanup) right after its first checkpoint; the same
    command with ``--resume`` writes exactly the model of an uninterrupted run."""
    from surgeon.cli import main

    make_llama().save_pretrained(tmp_path / "base")
    torch.save(calib4, tmp_path / "calib.pt")
    args = ["prune", "--model", str(tmp_path / "base"), "--method", "llm-surgeon", "--structure", "structured",
            "--sparsity", "0.3", "--shots", "2", "--correlation", "row", "--max-correlate", "64",
            "--calibration", str(tmp_path / "calib.pt"), "--nsamples", "4", "--seqlen", "16", "--device", "cpu",
            "--quiet"]
    script = textwrap.dedent("""
        import os, signal, sys
        from surgeon.checkpoint import Checkpointer
        from surgeon.cli import main
        save = Checkpointer.save
        def save_then_die(self, kind, state):
            save(self, kind, state)
            os.kill(os.getpid(), signal.SIGKILL)
        Checkpointer.save = save_then_die
        main(sys.argv[1:])
    """)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, *args, "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "surgeon_config.json"]  # no final model yet
    assert main(["report", str(out), "--no-plot"]) == 0  # the report so far, from the checkpoint

    assert main([*args, "--output", str(out), "--resume"]) == 0
    assert main([*args, "--output", str(tmp_path / "ref")]) == 0
    assert not (out / "checkpoint").exists()
    got, ref = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
