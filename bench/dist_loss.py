"""Cost of the fused BRCD loss over the global batch (``group=``) on CPU, gloo.

Run under torchrun (each rank gets ``--batch`` local rows; world size W):

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/dist_loss.py \
        [--batch 2048] [--bits 64] [--repeats 5] [--json bench/results/dist_loss.json]

Four configurations, interleaved round-robin (the machine drifts; ratios within a run count),
each one forward + backward of ``fasthash.brcd_contrastive_loss`` (masks, clusters, offset
positives, student gradient only):

* ``global``: every rank, its B local rows against the W*B global rows (``group=WORLD``);
* ``local``: every rank, the loss of its B local rows only (``group=None``, 1/W of the
  negatives): the ratio global / local is the price of the global negatives, W x the logits
  plus the collectives; divided by W it is the overhead per logit;
* ``comm``: the collectives of one ``global`` step alone (same shapes, no compute): their
  share of the ``global`` time is the gather overhead proper;
* ``single``: rank 0 alone (the others wait in a barrier) computes the global batch of W*B
  rows with ``--single-threads`` torch threads (default 1; W = the cores the W ranks use, but
  on a loaded 2-core VM two threads ran 2-4x slower than one): global / single is the
  wall-clock of the distributed loss against one process.

Each rank uses 1 torch thread for ``global`` and ``local``. Peak memory: the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each call) minus the resident set
just before the call, per rank, in a separate pass after the timings, with glibc's mmap
threshold fixed at 64 KiB (``mallopt``) so that freed tensors leave the resident set and each
call's peak is its own; it sees every allocation, torch's and gloo's included (tracemalloc
would not). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed as dist
from loss_cpu import _status_kib  # bench/ is sys.path[0] when run as a script

import fasthash


def _inputs(bsz: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(bsz, length, generator=g)
    t = torch.randn(bsz, length, generator=g).sign()
    t2 = torch.randn(bsz, length, generator=g).sign()
    table = (torch.rand(10, length, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    c = torch.randint(0, 10, (bsz,), generator=g)
    ca = torch.where(torch.rand(bsz, generator=g) < 0.1, (c + 1) % 10, c)
    return s, t, t2, dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca)


def _step(inputs, group) -> None:
    s, t, t2, kw = inputs
    s = s.detach().requires_grad_()
    fasthash.brcd_contrastive_loss(s, t, t2, **kw, group=group).backward()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_mib(fn) -> float:
    """Peak extra resident memory (MiB) of one call: VmHWM after minus VmRSS before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _fix_mmap_threshold() -> bool:
    """Make glibc serve >= 64 KiB blocks with mmap (returned to the OS on free), so the
    resident set follows live memory; False where that is not possible."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _configs(args, rank: int, world: int):
    local = _inputs(args.batch, args.bits, seed=1 + rank)
    glob = [_inputs(args.batch, args.bits, seed=1 + r) for r in range(world)]
    whole = tuple(torch.cat([g[i] for g in glob]) for i in range(3)) + (
        {"mask_table": glob[0][3]["mask_table"],
         **{k: torch.cat([g[3][k] for g in glob]) for k in ("cluster_ids", "aug_cluster_ids")}},)

    def single():  # rank 0 alone; the other ranks wait in the barrier below
        if rank == 0:
            torch.set_num_threads(args.single_threads)
            _step(whole, None)
            torch.set_num_threads(1)
        dist.barrier()

    def comm():  # the collectives of one global step alone, with the same shapes
        from fasthash import distributed as fd

        s, t, t2, kw = local
        sizes = [args.batch] * world
        fd._all_gather(torch.zeros(16, dtype=torch.float64), dist.group.WORLD)
        fd.gather_rows(torch.cat([s, t2]), sizes, dist.group.WORLD, blocks=2)
        fd.gather_rows(torch.stack([kw["cluster_ids"]] * 2, 1), sizes, dist.group.WORLD)
        fd.gather_rows(torch.zeros(4 * args.batch), sizes, dist.group.WORLD, blocks=4)
        fd._all_gather(torch.ones(1), dist.group.WORLD)

    return {"global": lambda: _step(local, dist.group.WORLD),
            "local": lambda: _step(local, None),
            "single": single,
            "comm": comm}


def _run(args) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    fixed = _fix_mmap_threshold()
    configs = _configs(args, rank, world)
    for fn in configs.values():  # warm-up: thread pools, custom-op dispatch
        fn()
    times = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            dist.barrier()
            times[name].append(_timed(fn))
    mem = {}
    for name, fn in configs.items():
        dist.barrier()
        mem[name] = _peak_mib(fn)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"times": times, "peak_mib": mem, "mmap_fixed": fixed})
    return {"per_rank": per_rank}


def _summary(args, per_rank: list[dict], world: int) -> dict:
    def med(name):  # the slowest rank decides the step time
        return max(statistics.median(r["times"][name]) for r in per_rank)

    def best(name):
        return max(min(r["times"][name]) for r in per_rank)

    t = {k: med(k) for k in ("global", "local", "single", "comm")}
    return {
        "what": "fasthash.brcd_contrastive_loss forward+backward, CPU, gloo",
        "command": f"python -m torch.distributed.run --standalone --nproc_per_node {world} "
                   f"bench/dist_loss.py --batch {args.batch} --bits {args.bits} "
                   f"--repeats {args.repeats} --single-threads {args.single_threads}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "torch": torch.__version__, "load_avg": os.getloadavg()},
        "world_size": world, "local_rows_per_half": args.batch, "bits": args.bits,
        "global_rows_per_half": world * args.batch,
        "median_s": t, "best_s": {k: best(k) for k in t},
        "ratios": {
            "global_over_local": t["global"] / t["local"],
            "global_over_local_per_logit": t["global"] / (world * t["local"]),
            "global_over_single_process": t["global"] / t["single"],
            "collectives_share_of_global": t["comm"] / t["global"],
        },
        "peak_extra_mib_per_rank": {k: [r["peak_mib"][k] for r in per_rank]
                                    for k in ("global", "local")},
        "peak_extra_mib_single_process": per_rank[0]["peak_mib"]["single"],
        "memory_method": "VmHWM reset via /proc/self/clear_refs, minus VmRSS before the call"
                         + (", glibc mmap threshold 64 KiB" if per_rank[0]["mmap_fixed"]
                            else " (mmap threshold not fixed: allocator reuse hides memory)"),
        "single_process_threads": args.single_threads,
        "per_rank_times_s": [r["times"] for r in per_rank],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="distributed fused-loss cost (run under torchrun)")
    p.add_argument("--batch", type=int, default=2048, help="local rows per half per rank")
    p.add_argument("--bits", type=int, default=64, help="code length L")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--single-threads", type=int, default=1,
                   help="torch threads of the single-process baseline")
    p.add_argument("--json", default="bench/results/dist_loss.json", help="'' to skip")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("run under torchrun: python -m torch.distributed.run --standalone "
                "--nproc_per_node 2 bench/dist_loss.py")
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    out = _run(args)
    if dist.get_rank() == 0:
        res = _summary(args, out["per_rank"], dist.get_world_size())
        r = res["ratios"]
        print(f"W={res['world_size']} B_local={args.batch} L={args.bits}: median s "
              + ", ".join(f"{k} {v:.4f}" for k, v in res["median_s"].items()))
        print(f"global/local {r['global_over_local']:.2f}x "
              f"(per logit {r['global_over_local_per_logit']:.2f}x), "
              f"global/single-process {r['global_over_single_process']:.2f}x, "
              f"collectives alone {100 * r['collectives_share_of_global']:.1f}% of global")
        print(f"peak extra MiB per rank: global {res['peak_extra_mib_per_rank']['global']}, "
              f"local {res['peak_extra_mib_per_rank']['local']}, "
              f"single process {res['peak_extra_mib_single_process']:.1f}")
        if args.json:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {args.json}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
