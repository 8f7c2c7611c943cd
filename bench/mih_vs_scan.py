"""Exact multi-index hashing (fasthash.MIHIndex) against the linear scan and FAISS MultiHash.

Codes shaped like learned hash codes: clustered (random centroids, each bit of a member flipped
with probability ``rate``), at several cluster counts and flip rates, and the demo's teacher
codes if a ``runs/**/*codes*.npy`` file exists. For every gallery (N codes, 64 or 128 bits) and
Q held-out queries of the same clusters, one run times, interleaved: our linear scan
(``hamming_topk`` / ``hamming_radius``), ``MIHIndex.search(method="mih")``, ``method="auto"``
and FAISS ``IndexBinaryMultiHash`` (same m and substring bits, ``nflip`` flips; approximate: its
recall is the fraction of the exact k distances it matches rank by rank), for k = 1, 10, 100,
1000 and one radius search. MIH and auto results are checked equal to the scan's. Build times
and bytes per code are recorded. ``--huge`` adds a memory-mapped 10^8 gallery (saved to
``--dir``, loaded with ``mmap=True``).

Usage::

    .venv/bin/python bench/mih_vs_scan.py --quick            # ~1 minute on a quiet machine
    .venv/bin/python bench/mih_vs_scan.py                    # 10^6 and 10^7, ~5 minutes
    .venv/bin/python bench/mih_vs_scan.py --huge --dir /tmp  # + memory-mapped 10^8 x 64 bits

Writes bench/results/mih_vs_scan.json (``--out``) and prints a table of speed-ups measured in
the same run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchenv import best_time  # noqa: E402

import fasthash  # noqa: E402
from fasthash.mih import MIHIndex  # noqa: E402


def clustered(rng, n, bits, clusters, rate, centroids=None, chunk=1 << 20):
    """[n, W] words: members of random centroids with each bit flipped with probability rate."""
    w = (bits + 63) // 64
    if centroids is None:
        centroids = rng.integers(0, 2**64, (clusters, w), dtype=np.uint64)
        if bits % 64:
            centroids[:, -1] &= np.uint64((1 << (bits % 64)) - 1)
    out = np.empty((n, w), np.uint64)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        x = centroids[rng.integers(0, centroids.shape[0], m)]
        flips = rng.binomial(bits, rate, m)
        rows = np.arange(m)
        for j in range(int(flips.max(initial=0))):
            sel = rows[flips > j]
            b = rng.integers(0, bits, sel.shape[0])
            x[sel, b // 64] ^= np.left_shift(np.uint64(1), (b % 64).astype(np.uint64))
        out[lo : lo + m] = x
    return out, centroids


def faiss_multihash(x, bits, m, nflip, threads):
    import faiss

    from fasthash.codes import to_faiss_bytes

    faiss.omp_set_num_threads(threads or os.cpu_count())
    b = bits // m
    t0 = time.perf_counter()
    idx = faiss.IndexBinaryMultiHash(8 * ((bits + 7) // 8), m, b)
    idx.nflip = nflip
    idx.add(to_faiss_bytes(x, bits))
    return idx, time.perf_counter() - t0


def run_topk(rec, args, index, q, x, fx, k):
    """One k: scan, mih, auto (and FAISS) interleaved; results checked equal."""
    ts, (rd, ri) = best_time(lambda: fasthash.hamming_topk(q, x, k, num_threads=args.threads),
                             args.repeat)
    tm, (md, mi) = best_time(lambda: index.search(q, k, method="mih", num_threads=args.threads),
                             args.repeat)
    ta, (ad, ai) = best_time(lambda: index.search(q, k, method="auto", num_threads=args.threads),
                             args.repeat)
    for d, i in ((md, mi), (ad, ai)):
        if not (np.array_equal(d, rd) and np.array_equal(i, ri)):
            raise SystemExit(f"MIH result differs from the scan at k={k}: {rec}")
    row = dict(rec, k=k, scan_s=ts, mih_s=tm, auto_s=ta, mih_speedup=ts / tm,
               auto_vs_scan=ta / ts)
    if fx is not None:
        from fasthash.codes import to_faiss_bytes

        tf, (fd, _) = best_time(lambda: fx.search(to_faiss_bytes(q, rec["bits"]), k), 1)
        row.update(faiss_s=tf, faiss_recall=float(np.mean(fd == rd)), faiss_vs_mih=tf / tm)
    return row


def run_radius(rec, args, index, q, x, fx, r):
    ts, want = best_time(lambda: fasthash.hamming_radius(q, x, r, num_threads=args.threads),
                         args.repeat)
    tm, got = best_time(lambda: index.range_search(q, r, method="mih", num_threads=args.threads),
                        args.repeat)
    ta, got_a = best_time(lambda: index.range_search(q, r, method="auto", num_threads=args.threads),
                          args.repeat)
    for g in (got, got_a):
        if not all(np.array_equal(a, b) for a, b in zip(g, want, strict=True)):
            raise SystemExit(f"MIH radius result differs from the scan at r={r}: {rec}")
    row = dict(rec, k=f"r={r}", results_per_query=float(want[0][-1] / q.shape[0]), scan_s=ts,
               mih_s=tm, auto_s=ta, mih_speedup=ts / tm, auto_vs_scan=ta / ts)
    if fx is not None:
        from fasthash.codes import to_faiss_bytes

        tf, (lims, _, _) = best_time(lambda: fx.range_search(to_faiss_bytes(q, rec["bits"]), r), 1)
        row.update(faiss_s=tf, faiss_recall=float(lims[-1] / max(1, want[0][-1])),
                   faiss_vs_mih=tf / tm)
    return row


def bench_gallery(args, name, x, q, bits, index=None):
    """Every k and the radius search on one gallery; returns the rows."""
    n = x.shape[0]
    if index is None:
        index = MIHIndex(bits)
        index.add(x)
    t0 = time.perf_counter()
    index.build(num_threads=args.threads)
    build_s = time.perf_counter() - t0
    m = index.num_tables
    rec = dict(gallery=name, n=n, bits=bits, queries=q.shape[0], num_tables=m, build_s=build_s,
               table_bytes_per_code=index.table_bytes() / n,
               bytes_per_code=index.table_bytes() / n + 8 * x.shape[1])
    fx = None
    if args.faiss and bits <= 128:
        try:
            fx, rec["faiss_build_s"] = faiss_multihash(x, bits, m, args.nflip, args.threads)
        except ImportError:
            pass
    rows = [run_topk(rec, args, index, q, x, fx, k) for k in args.ks if k <= n]
    rows.append(run_radius(rec, args, index, q, x, fx, max(1, bits // args.radius_div)))
    for row in rows:
        print_row(row)
    return rows


HEAD = (f"{'gallery':<24}{'N':>11}{'bits':>5}{'m':>3}{'build s':>8}{'B/code':>7}{'k':>7}"
        f"{'scan ms':>9}{'mih ms':>9}{'mih x':>7}{'auto/scan':>10}{'faiss ms':>10}{'recall':>7}")


def print_row(r):
    f = f"{r['faiss_s'] * 1e3:>10.1f}{r['faiss_recall']:>7.3f}" if "faiss_s" in r else ""
    print(f"{r['gallery']:<24}{r['n']:>11,}{r['bits']:>5}{r['num_tables']:>3}"
          f"{r['build_s']:>8.2f}{r['bytes_per_code']:>7.1f}{str(r['k']):>7}"
          f"{r['scan_s'] * 1e3:>9.1f}{r['mih_s'] * 1e3:>9.1f}{r['mih_speedup']:>7.1f}"
          f"{r['auto_vs_scan']:>10.2f}{f}", flush=True)


def teacher_codes():
    """Packed codes of the demo's teacher, if a codes file exists (else None)."""
    for path in sorted(glob.glob(str(ROOT / "runs" / "**" / "*codes*.npy"), recursive=True)):
        a = np.load(path)
        if a.ndim == 2 and a.shape[0] >= 2000:
            words = a if a.dtype == np.uint64 else fasthash.pack_codes(a.astype(np.float32))
            bits = a.shape[1] if a.dtype != np.uint64 else 64 * a.shape[1]
            return path, np.ascontiguousarray(words), bits
    return None


def huge(args, rows):
    """A memory-mapped gallery of args.huge_n 64-bit codes (written in chunks, loaded mmap)."""
    rng = np.random.default_rng(7)
    clusters, rate = args.settings[0]
    n = args.huge_n
    x, cent = clustered(rng, n, 64, clusters, rate)
    q, _ = clustered(rng, args.queries, 64, clusters, rate, centroids=cent)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "huge.fhidx")
        h = fasthash.HammingIndex(64)
        h.add(x)
        h.save(path)
        del h, x
        index = MIHIndex.load(path, mmap=True)
        words = index.words_array()
        saved = args.ks
        args.ks = [k for k in args.ks if k <= 100]
        rows += bench_gallery(args, f"mmap c={clusters} p={rate}", words, q, 64, index)
        args.ks = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e6,1e7", help="gallery sizes (comma separated; '' none)")
    p.add_argument("--bits", default="64,128")
    p.add_argument("--settings", default="10000:0.04,1000000:0.02",
                   help="clusters:flip-rate pairs (comma separated)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--ks", default="1,10,100,1000")
    p.add_argument("--radius-div", type=int, default=16, help="radius = bits // this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--nflip", type=int, default=1, help="FAISS MultiHash bits flipped per probe")
    p.add_argument("--no-faiss", dest="faiss", action="store_false")
    p.add_argument("--huge", action="store_true", help="add a memory-mapped --huge-n gallery")
    p.add_argument("--huge-n", type=float, default=1e8)
    p.add_argument("--dir", default=None, help="folder of the --huge index file")
    p.add_argument("--quick", action="store_true", help="10^6 x 64 bits, one setting")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mih_vs_scan.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.bits, args.settings = "1e6", "64", args.settings.split(",")[0]
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    args.ks = [int(k) for k in args.ks.split(",")]
    pairs = (s.split(":") for s in args.settings.split(","))
    args.settings = [(int(c), float(r)) for c, r in pairs]
    args.huge_n = int(args.huge_n)
    load0 = os.getloadavg()
    print(HEAD)
    rows = []
    for n in sizes:
        for bits in (int(b) for b in args.bits.split(",")):
            for clusters, rate in args.settings:
                rng = np.random.default_rng(n + bits + clusters)
                x, cent = clustered(rng, n, bits, clusters, rate)
                q, _ = clustered(rng, args.queries, bits, clusters, rate, centroids=cent)
                rows += bench_gallery(args, f"c={clusters} p={rate}", x, q, bits)
                del x
    found = teacher_codes()
    if found:
        path, words, bits = found
        rows += bench_gallery(args, f"teacher {Path(path).name}", words, words[:args.queries],
                              bits)
    else:
        print("teacher codes: no runs/**/*codes*.npy file, skipped")
    if args.huge:
        huge(args, rows)
    env = dict(python=platform.python_version(), machine=platform.machine(),
               cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
               simd=fasthash._C.simd_level(), load_avg_start=load0, load_avg_end=os.getloadavg(),
               argv=sys.argv[1:], teacher_codes=found[0] if found else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
