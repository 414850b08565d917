"""Helpers of .ci/run for the checks a newcomer's machine would make.

    python .ci/newcomer.py main-job README.md         # the README's main command line, as written
    python .ci/newcomer.py output README.md           # the folder that command writes (its --output)
    python .ci/newcomer.py check-wheel WHEEL          # the wheel holds every shipped text, unchanged
    python .ci/newcomer.py check-output DIR           # model, report.json, sparsity.png; reloads; finite ppl

``main-job`` and ``output`` need only the standard library; the checks import surgeon (the one the
running interpreter has: the newcomer's fresh venv for ``check-output``).
"""

from __future__ import annotations

import hashlib
import math
import re
import shlex
import sys
import zipfile
from pathlib import Path

SECTION = "## Two commands"


def main_job(readme: Path) -> str:
    """The first ``bash`` block of the README's "Two commands" section: setting up and the main job."""
    text = readme.read_text(encoding="utf-8")
    if SECTION not in text:
        raise SystemExit(f"{readme}: no {SECTION!r} section")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    if not blocks or "surgeon prune" not in blocks[0]:
        raise SystemExit(f"{readme}: the first bash block of {SECTION!r} does not run `surgeon prune`")
    return blocks[0].strip()


def output_of(command: str) -> str:
    """The ``--output`` folder of the ``surgeon prune`` in ``command``."""
    words = shlex.split(command)
    for i, w in enumerate(words):
        if w == "--output" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--output="):
            return w.split("=", 1)[1]
    raise SystemExit("the main job names no --output folder")


def check_wheel(wheel: Path) -> None:
    from surgeon import corpora

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for c in corpora.CORPORA.values():
            member = f"surgeon/corpora/{c.file}"
            if member not in names:
                raise SystemExit(f"{wheel.name} lacks {member}")
            digest = hashlib.sha256(z.read(member)).hexdigest()
            if digest != c.sha256:
                raise SystemExit(f"{wheel.name}: {member} has sha256 {digest}, expected {c.sha256}")
        for member in ("surgeon/corpora/README.md", "surgeon/corpora/pydoc/LICENSE-PSF.txt",
                       "surgeon/corpora/__init__.py"):
            if member not in names:
                raise SystemExit(f"{wheel.name} lacks {member}")
        if not any(re.fullmatch(r"surgeon/_native\..*(so|pyd)", n) for n in names):
            raise SystemExit(f"{wheel.name} holds no native extension")
    print(f"{wheel.name}: {len(corpora.CORPORA)} shipped texts present and unchanged")


def check_output(out: Path) -> None:
    import surgeon
    import transformers

    from surgeon.data import EVAL_TEXTS, eval_ids
    from surgeon.evaluate import perplexity
    from surgeon.io import load_pruned
    from surgeon.report import Report

    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "surgeon_config.json",
                           "report.json", "sparsity.png") if not (out / f).is_file()]
    if missing:
        raise SystemExit(f"{out} lacks {', '.join(missing)}")
    report = Report.load(out / "report.json")
    target = 1 - report.config["sparsity"]
    if abs(report.size - target) > 0.01:
        raise SystemExit(f"the pruned model keeps {report.size:.4f} of its weights, not {target:.4f}")
    model = load_pruned(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    seqlen, windows = 256, 4
    ppl = {name: perplexity(model, eval_ids(tok, name)[: windows * seqlen], seqlen=seqlen) for name in EVAL_TEXTS}
    if not all(math.isfinite(p) and p > 1 for p in ppl.values()):
        raise SystemExit(f"perplexity of the reloaded model is not finite: {ppl}")
    print(f"{out}: {report.method} {report.config['structure']}, size {report.size:.4f}, batch size "
          f"{report.extra['batch_size']['value']} ({'auto' if report.extra['batch_size']['auto'] else 'given'}), "
          f"wall {report.wall_s:.1f} s; reloaded from {Path(surgeon.__file__).parent}; perplexity on {windows} windows "
          f"of {seqlen}: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    what, arg = argv
    if what == "main-job":
        print(main_job(Path(arg)))
    elif what == "output":
        print(output_of(main_job(Path(arg))))
    elif what == "check-wheel":
        check_wheel(Path(arg))
    elif what == "check-output":
        check_output(Path(arg))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
