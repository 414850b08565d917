"""Checkpoints of a running prune, and the output folder that a command-line run owns.

A long run (40 shots of LLM Surgeon on a 7B model, or a layer-sequential method over 80 layers) should
survive a lost machine. After each shot (or layer) a method calls ``ctx.checkpoint(kind, state)``; a
:class:`Checkpointer` passed as ``surgeon.prune(..., checkpoint=...)`` then writes

- the model as it stands, with :func:`surgeon.io.save_pruned` (so structured models keep their shapes),
- ``state.json``: the method's resume state, the config, the elapsed time,
- ``report.json``: the report so far (readable by ``surgeon report`` while the run goes on),
- ``rng.pt``: the torch random number generator states,
- ``tensors.pt``: tensors the method needs to continue (its state's ``_tensors``, e.g. the weights before
  pruning that a dense reference needs), written once and linked into later checkpoints,

into a hidden folder that then replaces the previous checkpoint by renaming, so a kill at any moment
leaves either the old checkpoint or the new one, never a mix. Resuming loads the model from the
checkpoint and passes :meth:`Checkpointer.load_state` as ``resume_state``: the method continues where it
stopped, and the result equals an uninterrupted run with the same seed (same device and settings).

:class:`RunFolder` decides what a command-line run may do with its ``--output`` folder: start, resume,
or refuse, by comparing the settings stored in ``surgeon_config.json`` with the new ones.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .io import load_pruned, save_pruned

__all__ = ["Checkpointer", "OutputFolderError", "RunFolder", "get_rng_state", "set_rng_state"]

logger = logging.getLogger("surgeon")

STATE_FILE = "state.json"
REPORT_FILE = "report.json"
RNG_FILE = "rng.pt"
TENSORS_FILE = "tensors.pt"
FORMAT = 1


def get_rng_state() -> dict[str, Any]:
    """The torch random number generator states (CPU, and every initialised CUDA device)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"resume state holds a {type(obj).__name__}, which cannot be written as JSON")


class Checkpointer:
    """The checkpoint callback: ``surgeon.prune(..., checkpoint=Checkpointer(path))``.

    ``path`` is the checkpoint folder (the command line uses ``OUTPUT/checkpoint``). ``min_interval_s``
    skips checkpoints written sooner than that after the previous one (useful with per-layer checkpoints
    of big models, where each save writes the whole model); the first one is always written.
    ``tokenizer`` is saved with the model so that a resumed run needs nothing else.

    Resuming from Python::

        ckpt = Checkpointer("run/checkpoint")
        state = ckpt.load_state()              # None: nothing to resume
        if state is not None:
            model = ckpt.load_model()
        report = surgeon.prune(model, config, calibration, checkpoint=ckpt, resume_state=state)
        ckpt.clear()
    """

    def __init__(self, path: str | os.PathLike, *, min_interval_s: float = 0.0, tokenizer: Any = None):
        self.path = Path(path)
        self.min_interval_s = float(min_interval_s)
        self.tokenizer = tokenizer
        self.saved = 0
        self._ctx: Any = None
        self._start = time.perf_counter()
        self._elapsed_before = 0.0
        self._last: float | None = None
        self._tensors_id: int | None = None  # the ``_tensors`` object the current checkpoint holds

    # -- writing ----------------------------------------------------------------------------------
    def bind(self, ctx: Any) -> None:
        """Called by :func:`surgeon.prune` with the run's context (model, config, report)."""
        self._ctx = ctx
        self._start = time.perf_counter()
        self._elapsed_before = float((ctx.resume_state or {}).get("_elapsed_s", 0.0))

    def __call__(self, kind: str, state: dict[str, Any]) -> None:
        if self._ctx is None:
            raise RuntimeError("a Checkpointer must be passed to surgeon.prune(checkpoint=...), which binds it to the run")
        now = time.perf_counter()
        if self._last is not None and now - self._last < self.min_interval_s:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # every rank holds the same model; rank 0 writes it
        self.save(kind, state)
        self._last = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        """Pruning time so far, including the time before a resume."""
        return self._elapsed_before + time.perf_counter() - self._start

    def save(self, kind: str, state: dict[str, Any]) -> None:
        """Write a checkpoint now (atomically: a hidden folder renamed over the previous checkpoint)."""
        from .api import finalize_report
        from .methods.base import host_peak_gb

        ctx = self._ctx
        t0 = time.perf_counter()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _no_transformers_bars():
            save_pruned(ctx.model, tmp, tokenizer=self.tokenizer)
        finalize_report(ctx.report, ctx.adapter, structured=ctx.config.structure_kind == "structured")
        ctx.report.wall_s = self.elapsed_s
        ctx.report.peak_host_gb = host_peak_gb()
        ctx.report.save(tmp / REPORT_FILE)
        torch.save(get_rng_state(), tmp / RNG_FILE)
        state = dict(state)
        tensors = state.pop("_tensors", None)
        if tensors is not None:
            self._write_tensors(tensors, tmp / TENSORS_FILE)
        _write_json(tmp / STATE_FILE, {
            "format": FORMAT, "kind": kind, "state": state, "config": ctx.config.to_dict(),
            "elapsed_s": self.elapsed_s, "saved_at": datetime.datetime.now().isoformat(timespec="seconds"),
        })
        old = self.path.with_name(f".{self.path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
        self.saved += 1
        logger.info("checkpoint after %s (%s) written to %s in %.1fs", kind, _describe(state), self.path,
                    time.perf_counter() - t0)

    def _write_tensors(self, tensors: dict[str, Any], dest: Path) -> None:
        """The same object as in the current checkpoint is linked (it does not change during a run:
        a copy of the weights before pruning is as large as the prunable weights), else written."""
        held = self.path / TENSORS_FILE
        if self._tensors_id == id(tensors) and held.is_file():
            try:
                os.link(held, dest)
                return
            except OSError:
                shutil.copyfile(held, dest)
                return
        torch.save(tensors, dest)
        self._tensors_id = id(tensors)

    # -- reading ----------------------------------------------------------------------------------
    def _folder(self) -> Path | None:
        """The checkpoint to read: the current one, or the previous one when a kill struck mid-swap."""
        for p in (self.path, self.path.with_name(f".{self.path.name}.old")):
            if (p / STATE_FILE).is_file():
                return p
        return None

    def exists(self) -> bool:
        return self._folder() is not None

    def load_state(self) -> dict[str, Any] | None:
        """The ``resume_state`` for :func:`surgeon.prune`, or None when there is no checkpoint.

        It holds the method's own state (e.g. ``next_shot``) plus ``_kind``, ``_config``, ``_elapsed_s``,
        ``_report`` (the report so far, as a dict) and ``_rng``, which ``prune`` uses to check the config
        and to continue the report, the clock and the random streams.
        """
        folder = self._folder()
        if folder is None:
            return None
        meta = json.loads((folder / STATE_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint at {folder} has format {meta.get('format')!r}, this version reads {FORMAT}")
        state = dict(meta["state"])
        state.update(_kind=meta["kind"], _config=meta["config"], _elapsed_s=meta.get("elapsed_s", 0.0))
        if (folder / REPORT_FILE).is_file():
            state["_report"] = json.loads((folder / REPORT_FILE).read_text())
        if (folder / RNG_FILE).is_file():
            state["_rng"] = torch.load(folder / RNG_FILE, weights_only=True)
        if (folder / TENSORS_FILE).is_file():
            state["_tensors"] = torch.load(folder / TENSORS_FILE, weights_only=True, map_location="cpu")
        return state

    def load_model(self, **kwargs: Any) -> torch.nn.Module:
        """The model as of the checkpoint (keyword arguments go to :func:`surgeon.io.load_pruned`)."""
        folder = self._folder()
        if folder is None:
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        return load_pruned(folder, **kwargs)

    def load_tokenizer(self) -> Any:
        import transformers

        folder = self._folder()
        if folder is None:
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        return transformers.AutoTokenizer.from_pretrained(folder)

    def describe(self) -> str:
        folder = self._folder()
        if folder is None:
            return "no checkpoint"
        meta = json.loads((folder / STATE_FILE).read_text())
        return f"checkpoint after {meta['kind']} ({_describe(meta['state'])}), saved {meta.get('saved_at', '?')}"

    def clear(self) -> None:
        """Remove the checkpoint (after the final model has been written)."""
        for p in (self.path, self.path.with_name(f".{self.path.name}.old"), self.path.with_name(f".{self.path.name}.tmp")):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _no_transformers_bars():
    """Checkpoints are background work: keep ``transformers``' save progress bars out of the run's own."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _describe(state: dict[str, Any]) -> str:
    keys = [k for k, v in state.items() if not k.startswith("_") and isinstance(v, (int, float, str))]
    return ", ".join(f"{k}={state[k]}" for k in keys) or "-"


# ---------------------------------------------------------------------------------------------------
class OutputFolderError(ValueError):
    """The output folder holds something this run must not overwrite or cannot continue."""


class RunFolder:
    """An output folder of ``surgeon prune``: ``surgeon_config.json`` identifies the run that owns it.

    The final model, tokenizer, ``report.json`` and ``sparsity.png`` are written only once pruning has
    finished (moved in from a staging folder); until then the folder holds the config and, after the
    first shot or layer, ``checkpoint/``.
    """

    CONFIG = "surgeon_config.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoint = Checkpointer(self.path / "checkpoint")

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    def stored(self) -> dict[str, Any] | None:
        return json.loads(self.config_file.read_text()) if self.config_file.is_file() else None

    def complete(self) -> bool:
        return (self.path / REPORT_FILE).is_file() and (self.path / "config.json").is_file() and not self.checkpoint.exists()

    def plan(self, run: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
        """What to do with the folder for a run with settings ``run``: ``"new"``, ``"resume"`` or ``"complete"``.

        Raises :class:`OutputFolderError` (before anything is written) when the folder holds another run,
        or this run without ``--resume`` / ``--overwrite``. Nothing is deleted here.
        """
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputFolderError(f"output {p} exists and is not a folder")
        if not p.exists() or not any(p.iterdir()):
            return "new"
        stored = self.stored()
        if stored is None:
            raise OutputFolderError(f"output folder {p} is not empty and holds no {self.CONFIG}; "
                                    "choose a new or empty folder")
        if overwrite:
            return "new"
        run = json.loads(json.dumps(run, default=str))
        diff = _diff(stored.get("run", {}), run)
        if diff:
            raise OutputFolderError(f"output folder {p} holds a different run (differs in {'; '.join(diff)}); "
                                    "pass --overwrite to replace it, or choose another folder")
        if resume:
            if self.checkpoint.exists():
                return "resume"
            return "complete" if self.complete() else "new"
        state = "a finished run" if self.complete() else f"an unfinished run ({self.checkpoint.describe()})"
        raise OutputFolderError(f"output folder {p} already holds {state} with these settings; "
                                "pass --resume to continue it, or --overwrite to start again")

    def clear(self) -> None:
        """Empty a folder that holds a surgeon run (for ``--overwrite``)."""
        if self.stored() is None:
            raise OutputFolderError(f"refusing to empty {self.path}: it holds no {self.CONFIG}")
        for child in self.path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def write_config(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.config_file, data)


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested settings dicts."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
