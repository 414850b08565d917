"""2:4 detection and conversion to torch's semi-structured format: checks on CPU, the conversion on a GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import surgeon
from surgeon import sparse24
from surgeon.masks import nm_mask
from surgeon.methods.magnitude import MagnitudeConfig
from surgeon.sparse24 import NEEDS_GPU, check_2to4, convertible_linears, kernel_block, to_semi_structured

from conftest import make_llama


def reference_2to4(w: np.ndarray) -> bool:
    """Loop-by-loop definition: every row, every group of 4 consecutive entries, at most 2 non-zeros."""
    rows, cols = w.shape
    if cols % 4:
        return False
    for r in range(rows):
        for c in range(0, cols, 4):
            if sum(1 for x in w[r, c:c + 4] if x != 0) > 2:
                return False
    return True


def pruned_llama(*, dtype: torch.dtype = torch.float32, **shape) -> nn.Module:
    model = make_llama(**shape)
    calib = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    surgeon.prune(model, MagnitudeConfig(structure="2:4"), calib, device="cpu", progress=False)
    return model.to(dtype)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- check_2to4 -------------------------------------------------------------------------------------


@given(rows=st.integers(1, 6), groups=st.integers(1, 6), extra_cols=st.sampled_from([0, 0, 0, 1, 2, 3]),
       density=st.floats(0.0, 1.0), make_24=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32]))
def test_check_2to4_matches_reference(rows, groups, extra_cols, density, make_24, seed, dtype):
    rng = np.random.default_rng(seed)
    cols = 4 * groups + extra_cols
    w = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < density)
    if make_24 and not extra_cols:  # zero the two smallest of every group, then maybe break one group
        w = w * nm_mask(torch.from_numpy(np.abs(w)), 2, 4).numpy()
        if rng.random() < 0.5:
            r, g = rng.integers(rows), rng.integers(groups)
            w[r, 4 * g:4 * g + 3] = 1.0
    if dtype == torch.int32:
        w = np.sign(w) * np.ceil(np.abs(w))  # integers, keeping zeros where they are
    assert check_2to4(torch.from_numpy(w).to(dtype)) == reference_2to4(w)


def test_check_2to4_edge_cases():
    assert check_2to4(torch.tensor([[-0.0, -0.0, 1.0, 2.0]]))
    assert not check_2to4(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    assert not check_2to4(torch.zeros(2, 6))  # 4 does not divide the inputs
    assert check_2to4(torch.zeros(0, 8))
    assert not check_2to4(torch.tensor(0.0))
    assert not check_2to4(torch.tensor([[float("nan"), 1.0, 2.0, 0.0]]))


def test_magnitude_24_model_is_2to4():
    model = pruned_llama(hidden=128, mlp=256)
    linears = surgeon.adapters.adapter_for(model).linears()
    assert all(check_2to4(m.weight) for m in linears.values())
    assert not check_2to4(make_llama(hidden=128, mlp=256).model.layers[0].mlp.up_proj.weight)


# -- checks that need no GPU ------------------------------------------------------------------------


def test_kernel_block_follows_backend(monkeypatch):
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    assert kernel_block(torch.float16) == (16, 16)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    assert kernel_block(torch.bfloat16) == (32, 64)


def test_not_2to4_names_first_linear_before_any_device_check(no_cuda):
    model = make_llama(hidden=128, mlp=256).half()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: .*not 2:4"):
        to_semi_structured(model)


def test_no_gpu_is_a_clear_error_and_leaves_model_unchanged(no_cuda):
    model = pruned_llama(hidden=128, mlp=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"{NEEDS_GPU} \(no CUDA device is available\)"):
        to_semi_structured(model, dtype=torch.float16)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_old_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.version, "hip", None)
    model = pruned_llama(dtype=torch.float16, hidden=128, mlp=256)
    with pytest.raises(RuntimeError, match=rf"{NEEDS_GPU}; Tesla T4 has 7\.5"):
        to_semi_structured(model)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(RuntimeError, match=r"weights are on cpu: move the model to the GPU"):
        to_semi_structured(model)


def test_dtype_errors(no_cuda):
    model = pruned_llama(hidden=128, mlp=256)
    with pytest.raises(ValueError, match=r"dtype torch\.float32 is not supported"):
        to_semi_structured(model, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"linear weights are torch\.float32; .*float16 or bfloat16"):
        to_semi_structured(model)
    assert len(convertible_linears(model, dtype=torch.bfloat16)) == 14


def test_shape_refused_names_layer_and_min_features_skips_it(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    model = pruned_llama(dtype=torch.float16, hidden=40, mlp=64, heads=4, kv_heads=2)  # 40 is no multiple of 16
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: shape \(40, 40\) is refused "
                                         r"by the cusparselt kernels .* multiple of 16 and columns of 16"):
        to_semi_structured(model)
    assert convertible_linears(model, strict=False) == []
    assert to_semi_structured(model, min_features=48) == []  # all small: nothing to do, no GPU needed
    assert not isinstance(model.model.layers[0].mlp.up_proj.weight, torch.sparse.SparseSemiStructuredTensor)


def test_cutlass_limits_apply_when_forced(no_cuda, monkeypatch):
    model = pruned_llama(dtype=torch.float16, hidden=32, mlp=64)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    assert len(convertible_linears(model)) == 14
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    with pytest.raises(ValueError, match=r"q_proj: shape \(32, 32\) is refused by the cutlass kernels"):
        convertible_linears(model)
    # only down_proj (32 x 64) fits the (32, 64) block
    assert convertible_linears(model, strict=False) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def test_strict_false_leaves_non_24_linears_dense():
    model = pruned_llama(dtype=torch.float16, hidden=128, mlp=256)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(1.0)
    names = convertible_linears(model, strict=False)
    assert len(names) == 13 and "model.layers.1.self_attn.o_proj" not in names
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj: .*not 2:4"):
        convertible_linears(model)


def test_conversion_plumbing_without_gpu(monkeypatch):
    """With the GPU check and torch's compression stubbed out: which weights are replaced, and how."""
    monkeypatch.setattr(sparse24, "_require_gpu", lambda devices: None)
    monkeypatch.setattr(sparse24, "to_sparse_semi_structured", lambda w: w.clone())
    model = pruned_llama(hidden=128, mlp=256)
    ref = copy.deepcopy(model).half()
    names = to_semi_structured(model, dtype=torch.float16, min_features=128)  # k_proj, v_proj (64 x 128) stay
    kept = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in kept]
    assert all(p.dtype == torch.float16 for p in model.parameters())
    for name, lin in surgeon.adapters.adapter_for(model).linears().items():
        expected = ref.get_submodule(name).weight
        assert torch.equal(lin.weight, expected)
        assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad == (name not in names)


# -- on a GPU ---------------------------------------------------------------------------------------


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _sm80(), reason="needs an NVIDIA GPU with compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_llama_matches_dense_with_zeros(dtype):
    dense = pruned_llama(hidden=128, mlp=256).to("cuda", dtype)
    sparse = copy.deepcopy(dense)
    names = to_semi_structured(sparse)
    assert len(names) == 14
    assert all(isinstance(sparse.get_submodule(n).weight, torch.sparse.SparseSemiStructuredTensor) for n in names)
    ids = torch.randint(0, 96, (3, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids, use_cache=False).logits.float()
        out = sparse(input_ids=ids, use_cache=False).logits.float()
        one = sparse(input_ids=ids[:1, :1], use_cache=False).logits.float()  # a single token: padded by torch
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(one, ref[:1, :1], atol=tol, rtol=tol)
    assert to_semi_structured(sparse) == []  # already converted
