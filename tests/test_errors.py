"""Bad input is refused with a clear message before any weight is touched, and leaves no output behind."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import make_llama

import surgeon
from surgeon.cli import main
from surgeon.linalg import damped_inverse
from surgeon.methods import METHODS


@pytest.fixture
def calib4():
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))


def cfg(method="magnitude", **kw):
    return METHODS[method][0](**kw)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def untouched(model, before):
    state = model.state_dict()
    return state.keys() == before.keys() and all(
        state[k].shape == before[k].shape and bool(((state[k] == before[k]) | (state[k].isnan() & before[k].isnan())).all())
        for k in before)


def refused(model, config, calib, match, exc=ValueError):
    """``prune`` raises ``exc`` matching ``match`` and leaves every weight as it was."""
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        surgeon.prune(model, config, calib, device="cpu", progress=False)
    assert untouched(model, before)


@pytest.fixture
def tiny_folder(tmp_path):
    make_llama().save_pretrained(tmp_path / "tiny")
    torch.save(torch.randint(0, 96, (4, 16)), tmp_path / "ids.pt")
    return tmp_path


def cli(folder, out, *extra, model="tiny"):
    return main(["prune", "--model", str(folder / model), "--calibration", str(folder / "ids.pt"), "--nsamples", "4",
                 "--seqlen", "16", "--device", "cpu", "--quiet", "--output", str(out), *extra])


# -- configs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.1])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        cfg(sparsity=sparsity)


def test_cli_bad_option_value_writes_nothing(tiny_folder, capsys):
    out = tiny_folder / "out"
    assert cli(tiny_folder, out, "--method", "magnitude", "--sparsity", "1.5") == 2
    assert "sparsity must be in (0, 1)" in capsys.readouterr().err
    assert not out.exists()


def test_nm_that_does_not_divide_a_layer(calib4):
    model = make_llama(mlp=42)  # down_proj reads 42 inputs: not a multiple of 4
    refused(model, cfg(structure="2:4", sparsity=0.0), calib4,
            r"M=4 does not divide the 42 inputs of model\.layers\.0\.mlp\.down_proj")


# -- models ---------------------------------------------------------------------------------------------
def test_unsupported_architecture_names_supported_ones(calib4):
    gpt2 = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=96, bos_token_id=0, eos_token_id=0))
    refused(gpt2, cfg(), calib4, r"unsupported architecture 'gpt2'; supported: .*llama.*opt")


def test_model_without_prunable_layers(calib4):
    refused(make_llama(layers=0), cfg(), calib4, "no prunable linear layers")


def test_nan_parameter_is_named(calib4):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[3, 2] = float("nan")
    refused(model, cfg(), calib4, r"model\.layers\.1\.self_attn\.v_proj\.weight contains NaN or Inf")


def test_overflowing_activations_are_named_before_pruning(calib4):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(3e38)  # finite weights, infinite outputs
    refused(model, cfg("wanda" if "wanda" in METHODS else "magnitude"), calib4,
            r"NaN or Inf activations in the output of model\.layers\.1\.mlp\.up_proj")


def test_nonfinite_curvature_names_the_module_and_leaves_no_folder(tiny_folder, capsys):
    """Activations finite in the forward pass but whose second moments overflow: the K-FAC factor of the
    layer reading them is not finite, and the error names that layer; the output folder is not left."""
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1e30)
    model.save_pretrained(tiny_folder / "loud")
    out = tiny_folder / "out"
    rc = cli(tiny_folder, out, "--method", "llm-surgeon", "--shots", "2", "--correlation", "none", model="loud")
    assert rc == 1
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.down_proj" in err and "non-finite" in err
    assert not out.exists()


# -- calibration data -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("calib", "match", "exc"), [
    ([], "calibration data is empty", ValueError),
    (torch.zeros(4, 1, dtype=torch.long), "at least 2 are needed", ValueError),
    (torch.zeros(0, 16, dtype=torch.long), r"must be \[N, L\] token ids", ValueError),
    (torch.full((2, 8), 500), r"token ids must lie in \[0, 96\)", ValueError),
    (torch.rand(2, 8), "integer token ids", TypeError),
    ([[1, 2, 3], [1, 2]], "equal lengths", ValueError),
])
def test_bad_calibration(calib, match, exc):
    refused(make_llama(), cfg(), calib, match, exc)


def test_cli_calibration_text_shorter_than_a_window(tiny_folder, capsys):
    (tiny_folder / "short.txt").write_text("too short")
    out = tiny_folder / "out"
    char_vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(char_vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tiny_folder / "tiny")
    rc = main(["prune", "--model", str(tiny_folder / "tiny"), "--method", "magnitude", "--calibration",
               str(tiny_folder / "short.txt"), "--seqlen", "16", "--device", "cpu", "--quiet", "--output", str(out)])
    assert rc == 2
    assert "fewer than one window of 16" in capsys.readouterr().err
    assert not out.exists()


# -- structured targets ---------------------------------------------------------------------------------
def test_structured_target_beyond_reach(calib4):
    model = make_llama()
    adapter = surgeon.adapters.adapter_for(model)
    removable = sum((g.count - 1) * g.params_per_structure for g in adapter.structure_groups())
    most = removable / adapter.prunable_params()
    refused(model, cfg(structure="structured", sparsity=min(most + 0.01, 0.99)), calib4,
            rf"cannot be reached.*at most {most:.4f}")
    if "flap" in METHODS:
        refused(model, cfg("flap", structure="structured", sparsity=0.99), calib4, "cannot be reached")
    # just within reach: every group keeps exactly one structure
    report = surgeon.prune(model, cfg(structure="structured", sparsity=most - 1e-6), calib4, device="cpu",
                           progress=False)
    assert 0.5 * most < report.sparsity <= most


# -- output folders -------------------------------------------------------------------------------------
def test_output_folder_of_another_run_is_refused(tiny_folder, capsys):
    out = tiny_folder / "out"
    assert cli(tiny_folder, out, "--method", "magnitude", "--sparsity", "0.3") == 0
    capsys.readouterr()
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    assert cli(tiny_folder, out, "--method", "magnitude", "--sparsity", "0.4") == 2
    err = capsys.readouterr().err
    assert "different run" in err and "sparsity: 0.3 -> 0.4" in err and "--overwrite" in err
    assert cli(tiny_folder, out, "--method", "magnitude", "--sparsity", "0.4", "--resume") == 2
    assert "different run" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # untouched

    assert cli(tiny_folder, out, "--method", "magnitude", "--sparsity", "0.4", "--overwrite") == 0
    assert '"sparsity": 0.4' in (out / "surgeon_config.json").read_text()


def test_foreign_folder_is_never_overwritten(tiny_folder, capsys):
    out = tiny_folder / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli(tiny_folder, out, "--method", "magnitude", "--overwrite") == 2
    assert "holds no surgeon_config.json" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_needs_output(tiny_folder, capsys):
    assert main(["prune", "--model", str(tiny_folder / "tiny"), "--method", "magnitude", "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


# -- numerics -------------------------------------------------------------------------------------------
def test_indefinite_factor_escalates_damping_with_warning(caplog):
    M = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues -2 and 4: damping must exceed 2
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        inv = damped_inverse(M, 0.01, name="layers.0.mlp.up_proj A")
    assert any("layers.0.mlp.up_proj A" in r.getMessage() and "damping raised to 10" in r.getMessage()
               for r in caplog.records)
    torch.testing.assert_close(inv @ (M + 10 * torch.eye(2)), torch.eye(2), atol=1e-5, rtol=0)


def test_unusable_device_and_missing_report(tiny_folder, capsys):
    if not torch.cuda.is_available():
        assert cli(tiny_folder, tiny_folder / "out", "--method", "magnitude", "--device", "cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err
        assert not (tiny_folder / "out").exists()
    assert main(["prune", "--model", str(tiny_folder / "tiny"), "--method", "magnitude", "--device", "nonsense"]) == 2
    assert "--device nonsense" in capsys.readouterr().err
    assert main(["report", str(tiny_folder / "nowhere")]) == 2
    assert "no report.json" in capsys.readouterr().err
