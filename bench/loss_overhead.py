"""Per-call cost of the fused contrastive losses on the CPU at small and medium batch sizes.

At the demo's batch sizes (B = 64 rows per view, L = 32 bits) the whole 2B x 2B problem fits in
one tile, so what a call costs is mostly per-op bookkeeping, not the logits matmul. This times
forward + backward of

* ``fasthash.nt_xent_loss(z1, z2, 0.3)`` against ``fasthash.reference.nt_xent_ref``, and
* ``fasthash.brcd_contrastive_loss(s, t, t2, mask_table=[10, L], cluster_ids,
  aug_cluster_ids, alpha=0.8, temperature=0.3)`` against ``fasthash.reference.brcd_loss_ref``

(the reference is the same-run baseline; it builds the dense 2B x 2B logits) at B in (16, 64,
256, 1024), L in (32, 64), single-threaded by default (``--threads``), the fused op and its
reference interleaved within every round, medians and minima reported.

Usage::

    .venv/bin/python bench/loss_overhead.py            # ~1 minute
    .venv/bin/python bench/loss_overhead.py --quick    # smoke run, a few seconds, no JSON

Writes bench/results/loss_overhead.json (``--out``) and prints a table; the JSON records the
environment and the load average before and after (a loaded machine slows both sides alike,
so the ratios are what to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchenv import environment  # noqa: E402

import fasthash  # noqa: E402
from fasthash import reference  # noqa: E402

RESULT = ROOT / "bench" / "results" / "loss_overhead.json"
BATCHES = (16, 64, 256, 1024)
LENGTHS = (32, 64)
CLUSTERS = 10


def _env() -> dict:
    """Where the numbers come from: backend, CPU, commit, versions, load."""
    return environment(threads=torch.get_num_threads())


def _inputs(bsz: int, length: int, seed: int = 0) -> dict:
    """Relaxed student codes (leaves), ±1 teacher codes, a {0,1} mask table, cluster ids with
    about 10% offset views (aug id != id), as a BRCD step sees them."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(bsz, length, generator=g).tanh().requires_grad_()
    z2 = torch.randn(bsz, length, generator=g).tanh().requires_grad_()
    s = torch.randn(bsz, length, generator=g).tanh().requires_grad_()
    t = torch.randn(bsz, length, generator=g).sign()
    t2 = torch.where(torch.rand(bsz, length, generator=g) < 0.1, -t, t)
    table = (torch.rand(CLUSTERS, length, generator=g) < 0.7).float()
    c = torch.randint(0, CLUSTERS, (bsz,), generator=g)
    ca = torch.where(torch.rand(bsz, generator=g) < 0.1, (c + 1) % CLUSTERS, c)
    return {"z1": z1, "z2": z2, "s": s, "t": t, "t2": t2,
            "kw": dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca, alpha=0.8,
                       temperature=0.3)}


def _calls(x: dict) -> dict[str, dict[str, Callable[[], None]]]:
    """``{loss: {provider: forward + backward}}``."""

    def step(fn):
        def run():
            for leaf in (x["z1"], x["z2"], x["s"]):
                leaf.grad = None
            fn().backward()
        return run

    return {
        "nt_xent_loss": {
            "fused": step(lambda: fasthash.nt_xent_loss(x["z1"], x["z2"], 0.3)),
            "reference": step(lambda: reference.nt_xent_ref(x["z1"], x["z2"], 0.3)),
        },
        "brcd_contrastive_loss": {
            "fused": step(lambda: fasthash.brcd_contrastive_loss(x["s"], x["t"], x["t2"],
                                                                 **x["kw"])),
            "reference": step(lambda: reference.brcd_loss_ref(x["s"], x["t"], x["t2"],
                                                              **x["kw"])),
        },
    }


def _interleaved(fns: dict[str, Callable[[], None]], budget_s: float, warmup: int
                 ) -> dict[str, dict[str, float]]:
    """Median and min ms of each ``fn``, run in turn within every round (a change of the load
    hits every provider alike) for about ``budget_s`` seconds, at least 5 rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    while len(next(iter(times.values()))) < 5 or time.perf_counter() < t_end:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
                "reps": len(v)} for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B in (16, 64), short budget, no JSON")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per (loss, B, L) cell (default 1.5, --quick 0.2)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULT})")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = BATCHES[:2] if args.quick else BATCHES
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 1.5)
    env = _env()
    rows = []
    print(f"{'loss':<22} {'B':>5} {'L':>3} {'fused ms':>9} {'ref ms':>9} {'ref/fused':>9}")
    for length in LENGTHS:
        for bsz in batches:
            for loss, fns in _calls(_inputs(bsz, length)).items():
                r = _interleaved(fns, budget, warmup=3)
                f, b = r["fused"]["median_ms"], r["reference"]["median_ms"]
                rows.append({"loss": loss, "B": bsz, "L": length, **{
                    f"{p}_{k}": v for p, d in r.items() for k, v in d.items()},
                    "reference_over_fused": b / f})
                print(f"{loss:<22} {bsz:>5} {length:>3} {f:>9.3f} {b:>9.3f} {b / f:>9.2f}")
    env["loadavg_at_end"] = os.getloadavg()
    out = args.out if args.out is not None else (None if args.quick else RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"env": env, "budget_s": budget, "rows": rows}, indent=1))
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
