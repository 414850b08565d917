"""The deterministic mode: same weights twice, and every setting it changes is restored afterwards."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_llama

import surgeon
from surgeon import determinism
from surgeon.methods.surgeon import SurgeonConfig


def _settings():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_settings_inside_and_restored_after():
    before = _settings()
    with determinism.deterministic(warn_only=False):
        assert determinism.active()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.get_float32_matmul_precision() == "highest"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
        with determinism.deterministic():  # nested blocks restore their own entry state
            assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled() and determinism.active()
    assert not determinism.active()
    assert _settings() == before


def test_restored_after_an_error_and_disabled_is_a_no_op():
    before = _settings()
    with pytest.raises(RuntimeError):
        with determinism.deterministic():
            raise RuntimeError("boom")
    assert _settings() == before and not determinism.active()
    with determinism.deterministic(enabled=False):
        assert not determinism.active() and _settings() == before


def test_math_attention_gives_the_same_outputs():
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with determinism.deterministic():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("config", [
    SurgeonConfig(sparsity=0.5, shots=2, solver="cg", lowrank_rank=2, lowrank_steps=3, lowrank_target="dense",
                  lowrank_holdout=0.25, lowrank_masked=True, lowrank_eval_every=1),
    SurgeonConfig(structure="2:4", shots=2, correlation="row", constrain_removed=True, fisher="sampled"),
])
def test_two_runs_give_identical_weights(config, calib):
    weights, reports = [], []
    for _ in range(2):
        model = make_llama(seed=5)
        model.config._attn_implementation = "sdpa"
        reports.append(surgeon.prune(model, config, calib, device="cpu", progress=False, deterministic=True))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    assert reports[0].extra["deterministic"] is True
    assert [s["estimated_loss"] for s in reports[0].shots] == [s["estimated_loss"] for s in reports[1].shots]
