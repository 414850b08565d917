"""K-FAC factors from hooks against a brute-force reference on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from surgeon.adapters import adapter_for
from surgeon.curvature import KFACCollector, KFactors, cast_factors, equalize_norms, estimate_kfac


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def make_batches():
    g = torch.Generator().manual_seed(0)
    ids2 = torch.randint(0, 64, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    return [torch.randint(0, 64, (2, 12), generator=g), {"input_ids": ids2, "attention_mask": mask}]


def brute_force(model: nn.Module, names: list[str], batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token inputs and output gradients captured directly, then averaged explicitly in fp64."""
    mods = dict(model.named_modules())
    store: dict[str, list] = {n: [] for n in names}

    def capture(name):
        def hook(module, inputs, output):
            output.retain_grad()
            store[name].append((inputs[0].detach(), output))

        return hook

    handles = [mods[n].register_forward_hook(capture(n)) for n in names]
    masks = []
    for batch in batches:
        ids, attn = (batch["input_ids"], batch["attention_mask"]) if isinstance(batch, dict) else (batch, None)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        token_loss = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        real = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
        token_loss = token_loss * (real[:, 1:] & real[:, :-1])
        token_loss.sum().backward()
        masks.append(real.reshape(-1))
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    ref = {}
    for name in names:
        a_rows, g_rows = [], []
        for (x, y), m in zip(store[name], masks):
            a_rows.append(x.reshape(-1, x.shape[-1])[m].double())
            g_rows.append(y.grad.reshape(-1, y.shape[-1])[m].double())
        a, g = torch.cat(a_rows), torch.cat(g_rows)
        n = a.shape[0]
        A = sum(torch.outer(v, v) for v in a) / n
        G = sum(torch.outer(v, v) for v in g) / n
        ref[name] = (A, G)
    return ref


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def reference(model):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj",
             "model.layers.1.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    return brute_force(model, names, make_batches())


def test_factors_match_brute_force(model, reference):
    calls = []
    factors = estimate_kfac(model, linears(model), make_batches(), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 2), (2, 2)]
    n_real = 2 * 12 + 10 + 6
    for name, (A, G) in reference.items():
        f = factors[name]
        assert f.n_tokens == n_real
        assert f.A.dtype == torch.float32 and f.G.dtype == torch.float32
        torch.testing.assert_close(f.A.double(), A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(f.G.double(), G, rtol=1e-5, atol=1e-6 * G.abs().max().item())


def test_model_left_as_it_was(model):
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    estimate_kfac(model, linears(model), make_batches()[:1])
    assert model.training
    model.eval()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_shared_inputs_are_accumulated_once(model, reference):
    mods = linears(model)
    shared = estimate_kfac(model, mods, make_batches())
    separate = estimate_kfac(model, mods, make_batches(), share_inputs=False)
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert shared[f"{attn}.q_proj"].A is shared[f"{attn}.k_proj"].A is shared[f"{attn}.v_proj"].A
        assert shared[f"{mlp}.gate_proj"].A is shared[f"{mlp}.up_proj"].A
        assert shared[f"{attn}.o_proj"].A is not shared[f"{attn}.q_proj"].A
        assert shared[f"{mlp}.down_proj"].A is not shared[f"{mlp}.up_proj"].A
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert separate[q].A is not separate[k].A
    for name in mods:
        torch.testing.assert_close(shared[name].A, separate[name].A, rtol=0, atol=0)
        torch.testing.assert_close(shared[name].G, separate[name].G, rtol=0, atol=0)
    torch.testing.assert_close(shared[k].A.double(), reference[k][0], rtol=1e-5, atol=1e-7)


def test_collector_reports_sharing_and_removes_hooks(model):
    mods = linears(model)
    with KFACCollector(mods) as col:
        model(input_ids=torch.randint(0, 64, (1, 5)), use_cache=False).logits.sum().backward()
    model.zero_grad(set_to_none=True)
    assert col.shared_inputs["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert col.shared_inputs["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert "model.layers.1.mlp.down_proj" not in col.shared_inputs
    assert all(not m._forward_hooks for m in mods.values())
    assert col.factors()["model.layers.0.mlp.down_proj"].n_tokens == 5

    with pytest.raises(RuntimeError, match="boom"), KFACCollector(mods):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in mods.values())


def test_sampled_fisher_is_seeded_and_differs_from_empirical(model):
    mods = linears(model)
    emp = estimate_kfac(model, mods, make_batches())
    s1 = estimate_kfac(model, mods, make_batches(), fisher="sampled", seed=1)
    s2 = estimate_kfac(model, mods, make_batches(), fisher="sampled", seed=1)
    s3 = estimate_kfac(model, mods, make_batches(), fisher="sampled", generator=torch.Generator().manual_seed(2))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(s1[name].G, s2[name].G)
    assert not torch.allclose(s1[name].G, emp[name].G, rtol=1e-3)
    assert not torch.allclose(s1[name].G, s3[name].G, rtol=1e-3)
    torch.testing.assert_close(s1[name].A, emp[name].A)  # the same forward passes
    with pytest.raises(ValueError, match="fisher"):
        estimate_kfac(model, mods, make_batches(), fisher="true")


def test_nan_names_the_module(model):
    target = "model.layers.1.mlp.down_proj"
    module = dict(model.named_modules())[target]
    handle = module.register_forward_pre_hook(lambda m, args: (args[0] * float("nan"),))
    try:
        with pytest.raises(ValueError, match=target.replace(".", r"\.")):
            estimate_kfac(model, linears(model), make_batches())
    finally:
        handle.remove()
    assert all(not m._forward_hooks for m in linears(model).values())
    assert all(p.requires_grad for p in model.parameters())


def test_offload_and_autocast(model):
    mods = linears(model)
    base = estimate_kfac(model, mods, make_batches())
    off = estimate_kfac(model, mods, make_batches(), offload=True)
    tf32 = estimate_kfac(model, mods, make_batches(), tf32=True)  # a CUDA-only option: no effect here
    for name in mods:
        assert off[name].A.device.type == "cpu"
        torch.testing.assert_close(off[name].A, base[name].A)
        torch.testing.assert_close(off[name].G, base[name].G)
        assert torch.equal(tf32[name].G, base[name].G)
    assert torch.get_float32_matmul_precision() == "highest"

    # Under bf16 autocast the products must still be fp32: compare with fp32 products of the very
    # inputs the layers saw (o_proj reads a bf16 activation under autocast).
    name = "model.layers.1.self_attn.o_proj"
    seen = []
    h = mods[name].register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    try:
        amp = estimate_kfac(model, mods, make_batches()[:1], autocast_dtype=torch.bfloat16)
    finally:
        h.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    assert x.dtype == torch.bfloat16
    assert amp[name].A.dtype == torch.float32 and amp[name].G.dtype == torch.float32
    torch.testing.assert_close(amp[name].A, x.float().T @ x.float() / x.shape[0], rtol=1e-6, atol=1e-8)
    fp32 = estimate_kfac(model, mods, make_batches()[:1])[name].G
    assert (amp[name].G - fp32).norm() < 0.05 * fp32.norm()


def test_mask_and_tqdm_like_progress(model):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    mods = linears(model)
    batches = make_batches()
    ids = batches[1]["input_ids"]
    full = estimate_kfac(model, mods, [ids[1:, :6]], progress=bar)
    padded = {"input_ids": ids[1:], "attention_mask": batches[1]["attention_mask"][1:]}
    masked = estimate_kfac(model, mods, [padded])
    assert bar.n == 1
    for name in mods:  # padding after the real tokens changes nothing
        assert masked[name].n_tokens == full[name].n_tokens == 6
        torch.testing.assert_close(masked[name].A, full[name].A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(masked[name].G, full[name].G, rtol=1e-5, atol=1e-6 * full[name].G.abs().max().item())


def test_equalize_norms_keeps_the_kronecker_product():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    f = KFactors(A=1e4 * X @ X.T, G=1e-6 * Y @ Y.T, n_tokens=7)
    dead = KFactors(A=torch.zeros(2, 2), G=torch.eye(3), n_tokens=7)
    A0, G0, dead_A = f.A, f.G, dead.A
    shared = KFactors(A=A0, G=torch.eye(5), n_tokens=7)  # another layer reading the same A
    out = equalize_norms({"a": f, "dead": dead, "shared": shared})
    e = out["a"]
    assert e is f  # updated in place, with new tensors
    torch.testing.assert_close(torch.linalg.matrix_norm(e.A), torch.linalg.matrix_norm(e.G))
    torch.testing.assert_close(torch.kron(e.G, e.A), torch.kron(G0, A0), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.kron(shared.G, shared.A), torch.kron(torch.eye(5), A0), rtol=1e-5, atol=0)
    assert out["dead"] is dead and dead.A is dead_A and e.n_tokens == 7
    assert f.to("cpu") is f and f.to(dtype=torch.float64).A.dtype == torch.float64


def test_collector_validates_usage(model):
    mods = linears(model)
    with pytest.raises(TypeError):
        KFACCollector({"norm": model.model.norm})
    with KFACCollector(mods) as col:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 64, (1, 4)), use_cache=False)
    with pytest.raises(RuntimeError, match="backward"):
        col.factors()


def test_opt_shares_qkv_and_gives_finite_factors(tiny_opt):
    mods = {n: m for n, m in tiny_opt.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    f = estimate_kfac(tiny_opt, mods, [ids])
    attn = "model.decoder.layers.0.self_attn"
    assert f[f"{attn}.q_proj"].A is f[f"{attn}.k_proj"].A is f[f"{attn}.v_proj"].A
    assert f["model.decoder.layers.0.fc1"].A is not f[f"{attn}.q_proj"].A
    assert all(bool(torch.isfinite(x.G).all()) and x.n_tokens == 32 for x in f.values())


def test_activations_only_needs_no_backward(tiny_llama):
    """gradients=False: the same A as a full pass, G = I, and no backward pass at all."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    modules = {"model.layers.0.mlp.down_proj": tiny_llama.model.layers[0].mlp.down_proj,
               "model.layers.1.self_attn.q_proj": tiny_llama.model.layers[1].self_attn.q_proj}
    full = estimate_kfac(tiny_llama, modules, [ids])
    calls = []
    handle = modules["model.layers.0.mlp.down_proj"].register_full_backward_hook(lambda *a: calls.append(1))
    try:
        fwd = estimate_kfac(tiny_llama, modules, [ids], gradients=False)
    finally:
        handle.remove()
    assert not calls
    for name, mod in modules.items():
        torch.testing.assert_close(fwd[name].A, full[name].A)
        assert torch.equal(fwd[name].G, torch.eye(mod.out_features))


def test_float64_sums_do_not_depend_on_the_order_of_batches():
    """fp32 sums of the same batches in another order round differently; float64 sums, cast back to
    fp32, are identical, which is what lets data-parallel ranks reproduce one process."""
    from conftest import make_llama

    model = make_llama(seed=3)
    linears = adapter_for(model).linears()
    batches = list(torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1)).split(1))
    fwd = estimate_kfac(model, linears, batches, dtype=torch.float64)
    rev = estimate_kfac(model, linears, batches[::-1], dtype=torch.float64)
    f32 = estimate_kfac(model, linears, batches)
    for name in linears:
        assert fwd[name].A.dtype == fwd[name].G.dtype == torch.float64
        assert torch.equal(fwd[name].A.float(), rev[name].A.float())
        assert torch.equal(fwd[name].G.float(), rev[name].G.float())
        torch.testing.assert_close(fwd[name].A.float(), f32[name].A, rtol=1e-5, atol=1e-6 * float(f32[name].A.abs().max()))
    cast = cast_factors(fwd, torch.float32)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert cast[q].A is cast[k].A and cast[q].A.dtype == torch.float32  # one input, one A, still shared
    with pytest.raises(ValueError, match="float32 or float64"):
        estimate_kfac(model, linears, batches, dtype=torch.float16)
