"""Two builds of ``fasthash._C`` against each other, interleaved in one process (same data,
same threads), after checking that their results are identical: the check that a refactor of
the engine changed no answer and no speed.

Usage: ``python bench/compare_builds.py OLD_C.so NEW_C.so`` (build the old one from a worktree
of the old commit with ``python setup.py build_ext --inplace``). Prints old / new milliseconds
(median of interleaved repeats) and the ratio new / old per case.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import numpy as np


def _load(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases(rng: np.random.Generator) -> dict:
    g64 = rng.integers(0, 2**63, (1_000_000, 1), dtype=np.uint64)
    g256 = rng.integers(0, 2**63, (1_000_000, 4), dtype=np.uint64)
    q64, q256 = g64[:2000].copy(), g256[:500].copy()
    mask = rng.integers(0, 2**63, (2000, 1), dtype=np.uint64)
    return {
        "64b Q=2000 k=10": lambda C: C.topk(q64, g64, 10),
        "64b Q=2000 k=100": lambda C: C.topk(q64, g64, 100),
        "64b Q=2000 k=1000": lambda C: C.topk(q64, g64, 1000),
        "64b Q=2000 k=10 per-query mask": lambda C: C.topk(q64, g64, 10, mask),
        "64b Q=1 k=10": lambda C: C.topk(q64[:1], g64, 10),
        "64b Q=10 k=1000": lambda C: C.topk(q64[:10], g64, 1000),
        "256b Q=500 k=10": lambda C: C.topk(q256, g256, 10),
        "64b radius r=20 Q=200": lambda C: C.radius(q64[:200], g64, 20),
        "distances 2000 x 100k 64b": lambda C: C.hamming_distances(q64, g64[:100_000]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="path of the old build's _C*.so")
    ap.add_argument("new", help="path of the new build's _C*.so")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats per case")
    args = ap.parse_args()
    old, new = _load(args.old), _load(args.new)
    for name, fn in _cases(np.random.default_rng(0)).items():
        for a, b in zip(fn(old), fn(new), strict=True):
            if not np.array_equal(a, b):
                raise SystemExit(f"{name}: the builds disagree")
        t_old, t_new = [], []
        for _ in range(args.reps * (3 if "Q=1 " in name or "Q=10 " in name else 1)):
            for build, out in ((old, t_old), (new, t_new)):
                t = time.perf_counter()
                fn(build)
                out.append(time.perf_counter() - t)
        mo, mn = statistics.median(t_old), statistics.median(t_new)
        print(f"{name:32s} old {mo * 1e3:9.2f} ms  new {mn * 1e3:9.2f} ms  new/old {mn / mo:5.2f}")


if __name__ == "__main__":
    main()
