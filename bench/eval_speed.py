"""The demo's evaluation and inference speed-ups, each against its baseline in the same run.

1. **mAP@K from the exact top K** (``brcd.retrieval.map_at_k``, ``fasthash.hamming_topk``)
   against ``brcd.retrieval.evaluate(...).map_at_k`` (full ranking of every query, with and
   without mAP@all), on Q x N codes of L bits whose classes agree with the codes (a noisy
   class-prototype code per item, 10 classes), the demo's 1,000 x 14,000 x 32 by default. The
   values must be equal to the last bit; the script exits 1 otherwise.
2. **Backbone inference** (``brcd.stages.encode.encode_views``) of ``--images`` uint8 views
   through EfficientNet-Lite2 at 64 px (random weights: the cost is the same) on the process's
   torch threads: batches of 64 (``FEATURE_BATCH``) against 256, and ``map_batches`` (one Python
   thread per torch thread, one intra-op thread per batch) against one batch at a time on all
   threads. The features must be equal bit for bit between the two schedules.

Usage::

    .venv/bin/python bench/eval_speed.py            # ~1 minute on 2 cores
    .venv/bin/python bench/eval_speed.py --quick    # smoke run, a few seconds, no JSON

Writes bench/results/eval_speed.json (``--out``) and prints the ratios. Repetitions of the
compared sides are interleaved and the best of each is reported; only ratios from one run mean
anything (the machines change).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchenv import environment  # noqa: E402

from brcd.models import create_model  # noqa: E402
from brcd.retrieval import evaluate, map_at_k  # noqa: E402

RESULT = ROOT / "bench" / "results" / "eval_speed.json"
E = importlib.import_module("brcd.stages.encode")  # the module (brcd.stages.encode: a function)


def _best(fns: dict, reps: int) -> tuple[dict[str, float], dict]:
    """Best wall time of each of ``fns`` over ``reps`` interleaved rounds, and their results."""
    best = {k: float("inf") for k in fns}
    out = {}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


def _codes(n: int, bits: int, protos: torch.Tensor, flip: float, g: torch.Generator):
    labels = torch.randint(len(protos), (n,), generator=g)
    noise = torch.rand(n, bits, generator=g) < flip
    return torch.where(noise, -protos[labels], protos[labels]).numpy(), labels.numpy()


def bench_map(q: int, n: int, bits: int, topk: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 2, (10, bits), generator=g).float() * 2 - 1
    qc, ql = _codes(q, bits, protos, 0.3, g)
    dc, dl = _codes(n, bits, protos, 0.3, g)
    t, v = _best({
        "map_at_k": lambda: map_at_k(qc, dc, ql, dl, topk),
        "evaluate": lambda: evaluate(qc, dc, ql, dl, topk).map_at_k,
        "evaluate_no_map_all": lambda: evaluate(qc, dc, ql, dl, topk, map_all=False).map_at_k,
    }, reps)
    return {"shape": [q, n, bits], "topk": topk, "seconds": t, "values": v,
            "equal": len(set(v.values())) == 1,
            "speedup_vs_evaluate": t["evaluate"] / t["map_at_k"],
            "speedup_vs_evaluate_no_map_all": t["evaluate_no_map_all"] / t["map_at_k"]}


def bench_inference(images: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite2", 32, freeze_backbone=True, head="mlp").eval()
    model = model.to(memory_format=torch.channels_last)
    views = torch.randint(0, 256, (images, 3, 28, 28), dtype=torch.uint8)
    threads = torch.get_num_threads()
    real_map = E.map_batches

    def serial(fn, batches, device=None):  # the baseline: each batch on all intra-op threads
        with torch.inference_mode():
            return [fn(x) for x in batches]

    def run(batch: int, threaded: bool) -> torch.Tensor:
        E.map_batches = real_map if threaded else serial
        try:
            return E.encode_views(model, views, 64, batch=batch, features=True)
        finally:
            E.map_batches = real_map
    t, out = _best({"threaded_64": lambda: run(64, True), "serial_64": lambda: run(64, False),
                    "threaded_256": lambda: run(256, True),
                    "serial_256": lambda: run(256, False)}, reps)
    return {"images": images, "threads": threads, "seconds": t,
            "img_per_s": {k: images / s for k, s in t.items()},
            "equal_threaded_serial": bool(torch.equal(out["threaded_64"], out["serial_64"])),
            "speedup_threaded_vs_serial_64": t["serial_64"] / t["threaded_64"],
            "speedup_batch64_vs_256_threaded": t["threaded_256"] / t["threaded_64"],
            "speedup_demo_vs_before": t["serial_256"] / t["threaded_64"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run; writes no JSON")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--database", type=int, default=14000)
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--topk", type=int, default=1000)
    p.add_argument("--images", type=int, default=1024, help="views for the inference timing")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.queries, a.database, a.images, a.reps = 100, 2000, 128, 1
    res = {"env": environment(threads=torch.get_num_threads()),
           "map": bench_map(a.queries, a.database, a.bits, a.topk, a.reps),
           "inference": bench_inference(a.images, a.reps)}
    m, inf = res["map"], res["inference"]
    print(f"mAP@{a.topk} of {a.queries} x {a.database} x {a.bits}-bit codes: map_at_k "
          f"{m['seconds']['map_at_k']:.3f} s, evaluate {m['seconds']['evaluate']:.3f} s "
          f"({m['speedup_vs_evaluate']:.1f}x), evaluate(map_all=False) "
          f"{m['seconds']['evaluate_no_map_all']:.3f} s "
          f"({m['speedup_vs_evaluate_no_map_all']:.1f}x); equal: {m['equal']}")
    ips = inf["img_per_s"]
    print(f"Lite2 64 px, {a.images} views, {inf['threads']} threads, img/s: map_batches "
          f"batch 64 {ips['threaded_64']:.0f}, 256 {ips['threaded_256']:.0f}; one batch at a "
          f"time 64 {ips['serial_64']:.0f}, 256 {ips['serial_256']:.0f}. map_batches "
          f"{inf['speedup_threaded_vs_serial_64']:.2f}x at 64, batch 64 "
          f"{inf['speedup_batch64_vs_256_threaded']:.2f}x over 256, both "
          f"{inf['speedup_demo_vs_before']:.2f}x; equal: {inf['equal_threaded_serial']}")
    out = a.out or (None if a.quick else RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=float))
        print(f"wrote {out}")
    return 0 if m["equal"] and inf["equal_threaded_serial"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
