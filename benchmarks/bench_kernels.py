"""Benchmark of the native selection kernels against the torch twins and plain NumPy.

Two kernels, at total sizes from 1e6 up to ``--max-elements`` (default 1e9) split across
``--arrays`` (default 200) arrays of mixed sizes (like the linears of a transformer):

- ``global_threshold``: the cost of the k-th cheapest entry over all arrays (k = half the total) and
  the count per array. ``rust`` and ``torch`` are ``surgeon._backend`` with either implementation
  (arrays handed over without a copy); ``numpy`` concatenates and calls ``numpy.partition`` (the
  threshold only: a lower bound on what NumPy needs for the same answer).
- ``nm_mask``: the 2:4 keep-mask of every matrix (``rust``, ``torch``, and a vectorised NumPy stable
  argsort per group).

Each (kernel, implementation, size) runs in a fresh subprocess, so one method's memory peak does not
pollute another's: the subprocess makes the data, resets its RSS high-water mark, runs the method
``--reps`` times and reports the median wall time, the peak RSS (``peak_host_gb``) and the peak above
the RSS after making the data (``extra_host_gb``). Results of the implementations are cross-checked.

    python benchmarks/bench_kernels.py                  # 1e6 .. 1e9 elements
    python benchmarks/bench_kernels.py --quick --out /tmp/kernels_quick.json

Writes ``benchmarks/results/kernels.json`` (see DESIGN.md section 5) unless ``--out`` says otherwise.
Build the extension in release mode first (``maturin develop --release``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the source tree (editable install) when run as a script
KERNELS = ("global_threshold", "nm_mask")
IMPLS = ("rust", "torch", "numpy")
# Relative sizes of the seven linears of a Llama block (q, k, v, o, gate, up, down).
SHAPE_MIX = (1.0, 0.25, 0.25, 1.0, 2.7, 2.7, 2.7)
NM_COLS = 512


# --------------------------------------------------------------------------------------------------
# Worker (runs in a subprocess)


def _array_sizes(total: int, n_arrays: int, multiple: int) -> list[int]:
    """Sizes (multiples of ``multiple``) of ``n_arrays`` arrays adding up to about ``total``."""
    weights = np.array([SHAPE_MIX[i % len(SHAPE_MIX)] for i in range(n_arrays)])
    sizes = np.floor(weights / weights.sum() * total / multiple).astype(np.int64) * multiple
    sizes[-1] += (total - sizes.sum()) // multiple * multiple
    return [int(s) for s in sizes]


def _make_data(kernel: str, elements: int, n_arrays: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if kernel == "global_threshold":
        out = []
        for size in _array_sizes(elements, n_arrays, 1):
            a = rng.standard_normal(size, dtype=np.float32)
            np.abs(a, out=a)
            out.append(a)
        return out
    out = []
    for size in _array_sizes(elements, n_arrays, NM_COLS):
        a = rng.standard_normal(size, dtype=np.float32)
        out.append(a.reshape(-1, NM_COLS))
    return out


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Resets this process's RSS high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _numpy_nm(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows, cols)


def _method(kernel: str, impl: str, data: list[np.ndarray]):
    """A zero-argument callable running one method once, and a digest of its result."""
    if impl == "numpy":
        if kernel == "global_threshold":
            k = sum(a.size for a in data) // 2

            def run():
                if k == 0:
                    return float("-inf")
                flat = np.concatenate(data)
                return float(np.partition(flat, k - 1)[k - 1])

            return run, lambda out: {"threshold": out}

        def run():
            return [_numpy_nm(s, 2, 4) for s in data]

        return run, _mask_digest

    from surgeon import _backend

    backend = _backend.get_backend(impl)
    if impl == "torch":
        import torch

        data = [torch.from_numpy(a) for a in data]
    if kernel == "global_threshold":

        def run():
            return backend.global_threshold(data, fraction=0.5)

        return run, lambda out: {"threshold": out[0], "selected": sum(out[1])}

    def run():
        return [backend.nm_mask(s, 2, 4) for s in data]

    return run, _mask_digest


def _mask_digest(masks: list[np.ndarray]) -> dict:
    h = hashlib.sha1()
    for m in masks:
        h.update(np.packbits(m).tobytes())
    return {"kept": int(sum(int(m.sum()) for m in masks)), "sha1": h.hexdigest()}


def worker(spec: dict) -> dict:
    data = _make_data(spec["kernel"], spec["elements"], spec["arrays"], spec["seed"])
    run, digest = _method(spec["kernel"], spec["impl"], data)
    run()  # warm-up (thread pools, lazy imports); not timed
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS") or 0
    times = []
    out = None
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        out_digest = digest(out)
        del out
    peak_kb = _peak_kb()
    threads = None
    if spec["impl"] == "torch":
        import torch

        threads = torch.get_num_threads()
    elif spec["impl"] == "rust":
        threads = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)
    else:
        threads = 1
    return {
        "wall_s": statistics.median(times),
        "times_s": times,
        "peak_host_gb": peak_kb / 2**20,
        "extra_host_gb": (peak_kb - base_kb) / 2**20 if reset else None,
        "elements": int(sum(a.size for a in data)),
        "threads": threads,
        "digest": out_digest,
    }


# --------------------------------------------------------------------------------------------------
# Driver


def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _sizes(min_elements: int, max_elements: int) -> list[int]:
    sizes, s = [], min_elements
    while s < max_elements:
        sizes.append(s)
        s *= 10
    sizes.append(max_elements)
    return sizes


def _run_worker(spec: dict, timeout: float) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"  {spec['kernel']}/{spec['impl']}/{spec['elements']:.0e}: timed out after {timeout:.0f} s", flush=True)
        return None
    if proc.returncode != 0:
        print(f"  {spec['kernel']}/{spec['impl']}/{spec['elements']:.0e} failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-elements", type=float, default=1e9, help="largest total size (default 1e9)")
    parser.add_argument("--min-elements", type=float, default=1e6, help="smallest total size (default 1e6)")
    parser.add_argument("--arrays", type=int, default=200, help="arrays (matrices) the total is split into")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per method (median reported)")
    parser.add_argument("--big-reps", type=int, default=1, help="repetitions at sizes of 1e9 and above")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a laptop (1e6 and 4e6, 2 reps)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    if args.quick:
        sizes, reps = [1_000_000, 4_000_000], 2
    else:
        sizes, reps = _sizes(int(args.min_elements), int(args.max_elements)), args.reps

    import torch

    from surgeon import _backend

    impls = [i for i in args.impls if i != "rust" or _backend.native_available()]
    if len(impls) < len(args.impls):
        print("surgeon._native is not built: skipping rust (run `maturin develop --release`)")
    print(f"device: {_cpu_model()}; torch threads {torch.get_num_threads()}", flush=True)

    rows = []
    for kernel in args.kernels:
        for elements in sizes:
            found = {}
            for impl in impls:
                spec = {
                    "kernel": kernel,
                    "impl": impl,
                    "elements": elements,
                    "arrays": args.arrays,
                    "reps": args.big_reps if elements >= 10**9 else reps,
                    "seed": args.seed,
                }
                res = _run_worker(spec, args.timeout)
                if res is None:
                    continue
                found[impl] = res
                print(f"  {kernel:16s} {impl:6s} {res['elements']:>13,d}  {res['wall_s']:9.4f} s  "
                      f"peak {res['peak_host_gb']:6.2f} GB", flush=True)
            digests = {i: r["digest"] for i, r in found.items()}
            ref = digests.get("rust") or digests.get("torch")
            for impl, d in digests.items():
                common = {key: d[key] for key in d if ref and key in ref}
                if ref and any(common[key] != ref[key] for key in common):
                    print(f"  WARNING: {kernel} {impl} disagrees with the others at {elements:.0e}: {d} vs {ref}")
            for impl, res in found.items():
                row = {
                    "method": kernel,
                    "impl": impl,
                    "elements": res["elements"],
                    "arrays": args.arrays,
                    "wall_s": round(res["wall_s"], 6),
                    "reps": len(res["times_s"]),
                    "threads": res["threads"],
                    "peak_host_gb": round(res["peak_host_gb"], 4),
                    "extra_host_gb": None if res["extra_host_gb"] is None else round(res["extra_host_gb"], 4),
                }
                for base in ("numpy", "torch"):
                    if base in found:
                        row[f"speedup_vs_{base}"] = round(found[base]["wall_s"] / res["wall_s"], 3)
                rows.append(row)

    header = f"{'method':16s} {'impl':6s} {'elements':>14s} {'wall_s':>10s} {'vs numpy':>9s} {'vs torch':>9s} " \
             f"{'peak GB':>8s} {'extra GB':>8s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"

        print(f"{r['method']:16s} {r['impl']:6s} {r['elements']:>14,d} {r['wall_s']:>10.4f} "
              f"{fmt(r.get('speedup_vs_numpy'), '>9.2f')} {fmt(r.get('speedup_vs_torch'), '>9.2f')} "
              f"{r['peak_host_gb']:>8.2f} {fmt(r['extra_host_gb'], '>8.2f')}")

    from surgeon.report import core_digest, git_commit  # here: the workers must not import torch

    result = {
        "benchmark": "kernels",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "device": _cpu_model(),
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "surgeon_git": git_commit(ROOT),
            "surgeon_core": core_digest(ROOT),
        },
        "protocol": {
            "data": f"|N(0,1)| float32 costs (global_threshold) and N(0,1) scores in {NM_COLS}-column matrices "
            f"(nm_mask), split over {args.arrays} arrays with Llama-block proportions, seed {args.seed}",
            "global_threshold": "k = floor(0.5 * total), unit weights; numpy = concatenate + partition",
            "nm_mask": "2:4; numpy = stable argsort per group",
            "memory": "peak_host_gb = RSS high-water of the method's own subprocess (interpreter, imports "
            "and data included); extra_host_gb = that peak minus the RSS once the data exists and the "
            "method ran once",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
