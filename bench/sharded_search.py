"""Sharded exact search on Ray (fasthash.sharded.ShardedHammingIndex) vs local hamming_topk.

Builds a random gallery (10M x 64 bits by default), searches Q = 10k queries with k = 10 and
k = 1000 by local ``fasthash.hamming_topk`` over the whole gallery (every core) and by a
``ShardedHammingIndex`` of 1 and 2 shard actors (each actor gets ``CPUs / shards`` of the
cluster), checks that every sharded answer equals the local one, and reports throughput, the
overhead ratio against the local search and the driver's merge time. A latency mode repeats
small batches (Q = 1 and Q = 100) and reports p50 / p99. Local and sharded runs alternate in
one process, so the ratios are measured under the same conditions. The JSON record (with the
environment) goes to ``bench/results/sharded_search.json`` (``sharded_search_quick.json`` with
``--quick``).

Usage::

    .venv/bin/python bench/sharded_search.py            # 10M x 64, local 2-CPU Ray cluster
    .venv/bin/python bench/sharded_search.py --quick    # 1M codes, Q = 1000: about a minute
    # on a real cluster (the fasthash venv on every node, --dir on a shared file system):
    #   head:    ray start --head --port=6379
    #   workers: ray start --address=<head-ip>:6379
    .venv/bin/python bench/sharded_search.py --address auto --shards 4 8 --dir /shared/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchenv import best_time, environment  # noqa: E402


def _env(ray) -> dict:
    return environment(ray=ray.__version__, cluster_resources=ray.cluster_resources(),
                       nodes=len(ray.nodes()))


def _gallery(n: int, bits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random packed codes, and queries = gallery rows with a few bits flipped."""
    from fasthash.codes import num_words

    rng = np.random.default_rng(seed)
    w = num_words(bits)
    x = rng.integers(0, 2**64, size=(n, w), dtype=np.uint64, endpoint=False)
    if bits % 64:
        x[:, -1] &= np.uint64((1 << (bits % 64)) - 1)
    return x, rng


def _queries(x: np.ndarray, bits: int, q: int, rng) -> np.ndarray:
    out = x[rng.integers(0, x.shape[0], q)].copy()
    for _ in range(4):
        bit = rng.integers(0, bits, q)
        out[np.arange(q), bit // 64] ^= np.uint64(1) << (bit % 64).astype(np.uint64)
    return out


def _latency(fn, q: np.ndarray, size: int, reps: int) -> dict:
    lat = []
    for r in range(reps):
        lo = (r * size) % max(1, q.shape[0] - size)
        t = time.perf_counter()
        fn(q[lo : lo + size])
        lat.append(time.perf_counter() - t)
    ms = np.array(lat) * 1e3
    return {"reps": reps, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def run(args, ray) -> dict:
    from fasthash import HammingIndex, hamming_topk
    from fasthash.sharded import ShardedHammingIndex

    t0 = time.perf_counter()
    x, rng = _gallery(args.n, args.bits, args.seed)
    q = _queries(x, args.bits, args.queries, rng)
    source = HammingIndex(args.bits)
    source.add(x)
    print(f"gallery {args.n:,} x {args.bits} bits, Q = {args.queries:,} "
          f"({time.perf_counter() - t0:.1f} s to generate)")
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count()))
    out: dict = {"args": vars(args), "local": {}, "sharded": {}}
    local_fn = {k: (lambda k=k: hamming_topk(q, x, k)) for k in args.k}
    for k in args.k:  # warm-up: pages the gallery in
        hamming_topk(q[:64], x, k)
    for s in args.shards:
        t = time.perf_counter()
        index = ShardedHammingIndex.build(source, s, Path(args.dir) / f"s{s}", num_cpus=cpus / s,
                                          batch_size=args.batch_size, window=args.window)
        rec = {"open_s": time.perf_counter() - t, "num_cpus_per_shard": cpus / s,
               "threads_per_shard": [sh["threads"] for sh in index.shards],
               "nodes": len({sh["node"] for sh in index.shards}), "k": {}}
        print(f"\n{s} shard(s), {cpus / s:g} CPU each: built and opened in {rec['open_s']:.1f} s")
        index.search(q[:64], max(args.k))  # warm-up
        for k in args.k:
            # local and sharded alternate rep by rep, so both see the same machine load
            loc_times, shard_times = [], []
            for _ in range(args.reps):
                t, (d0, i0) = best_time(local_fn[k], 1)
                loc_times.append(t)
                t, (d1, i1) = best_time(lambda k=k, ix=index: ix.search(q, k), 1)
                shard_times.append(t)
            t_local, t_shard = min(loc_times), min(shard_times)
            exact = bool(np.array_equal(d0, d1) and np.array_equal(i0, i1))
            st = index.last_stats
            out["local"].setdefault(str(k), []).append(t_local)
            rec["k"][str(k)] = {
                "local_s": t_local, "sharded_s": t_shard, "ratio": t_shard / t_local,
                "local_qps": args.queries / t_local, "sharded_qps": args.queries / t_shard,
                "merge_s": st["merge_s"], "wait_s": st["wait_s"], "batches": st["batches"],
                "batch_size": st["batch_size"], "exact": exact,
                "local_reps_s": loc_times, "sharded_reps_s": shard_times}
            print(f"  k={k:<5} local {t_local:7.3f} s ({args.queries / t_local:9,.0f} q/s)  "
                  f"sharded {t_shard:7.3f} s ({args.queries / t_shard:9,.0f} q/s)  "
                  f"ratio {t_shard / t_local:5.2f}x  merge {st['merge_s']:.3f} s  "
                  f"{'exact' if exact else 'MISMATCH'}")
            if not exact:
                raise SystemExit("sharded result differs from hamming_topk")
        rec["latency"] = {}
        for size in args.latency_sizes:
            reps = args.latency_reps if size == 1 else max(5, args.latency_reps // 4)
            k = min(args.k)
            loc = _latency(lambda b, k=k: hamming_topk(b, x, k), q, size, reps)
            sh = _latency(lambda b, k=k, ix=index: ix.search(b, k), q, size, reps)
            rec["latency"][str(size)] = {"local": loc, "sharded": sh, "k": k}
            print(f"  latency Q={size:<4} k={k}: local p50 {loc['p50_ms']:.2f} ms "
                  f"p99 {loc['p99_ms']:.2f} ms | sharded p50 {sh['p50_ms']:.2f} ms "
                  f"p99 {sh['p99_ms']:.2f} ms")
        index.close()
        out["sharded"][str(s)] = rec
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=lambda s: int(float(s.replace("_", ""))), default=10_000_000)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (best is kept)")
    p.add_argument("--latency-sizes", type=int, nargs="+", default=[1, 100])
    p.add_argument("--latency-reps", type=int, default=200, help="repetitions for Q = 1")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--address", default=None,
                   help="join this cluster (e.g. 'auto' after 'ray start'); default: a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster")
    p.add_argument("--quick", action="store_true", help="1M codes, Q = 1000 (under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where shard files go (default: a temp dir)")
    p.add_argument("--json", default=None, help="default: bench/results/sharded_search.json "
                   "(sharded_search_quick.json with --quick)")
    args = p.parse_args(argv)
    if args.json is None:
        name = "sharded_search_quick.json" if args.quick else "sharded_search.json"
        args.json = str(ROOT / "bench/results" / name)
    if args.quick:
        args.n, args.queries = min(args.n, 1_000_000), min(args.queries, 1000)
        args.latency_reps, args.reps = min(args.latency_reps, 40), 1
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    if args.address:
        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    print(f"ray {ray.__version__}: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{len(ray.nodes())} node(s), joined in {time.perf_counter() - t:.1f} s")
    tmp = None
    if args.dir is None:
        tmp = args.dir = tempfile.mkdtemp(prefix="sharded_bench_")
    try:
        env = _env(ray)
        result = run(args, ray)
        result["env"] = env
        result["env"]["loadavg_at_end"] = os.getloadavg()
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
