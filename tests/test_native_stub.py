"""The hand-written ``surgeon/_native.pyi`` must describe the compiled module exactly (names, parameters,
defaults), so type checkers and readers see the real native surface."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest

import surgeon

STUB = Path(surgeon.__file__).with_name("_native.pyi")


def _native():
    try:
        import surgeon._native as native
    except ImportError:
        if os.environ.get("SURGEON_REQUIRE_NATIVE") == "1":
            raise
        pytest.skip("surgeon._native is not built")
    return native


def _stub_signatures() -> dict[str, list[tuple[str, bool]]]:
    """Function name -> [(parameter, has default)] as the stub declares them."""
    out = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args
            defaults = [False] * (len(args) - len(node.args.defaults)) + [True] * len(node.args.defaults)
            out[node.name] = [(a.arg, d) for a, d in zip(args, defaults)]
    return out


def test_stub_matches_compiled_module():
    native = _native()
    compiled = {}
    for name, obj in vars(native).items():
        if callable(obj) and not name.startswith("_"):
            sig = inspect.signature(obj)
            compiled[name] = [(p.name, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]
    assert compiled == _stub_signatures()
    assert isinstance(native.__version__, str)
