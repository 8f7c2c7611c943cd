"""CPU memory and speed of the fused BRCD loss vs the naive torch reference.

* Memory: each implementation runs forward + backward once at N = 2B = 16384, L = 64 in a fresh
  subprocess; the peak extra memory is the peak resident set (VmHWM, reset through
  /proc/self/clear_refs after the inputs exist and a small warm-up ran) minus the resident set
  just before the call. This sees every allocation, torch's included (tracemalloc does not).
* Speed: forward + backward at N = 4096, L = 64, the two implementations interleaved, best and
  median of several repeats (the machine is shared: ratios within one run are what count).

Usage: ``python bench/loss_cpu.py [--json bench/results/kernels_cpu_loss.json] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(bsz: int, length: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(bsz, length, generator=g, requires_grad=True)
    t = torch.randn(bsz, length, generator=g).sign()
    t2 = torch.randn(bsz, length, generator=g).sign()
    table = (torch.rand(10, length, generator=g) > 0.3).float()
    c = torch.randint(0, 10, (bsz,), generator=g)
    ca = torch.where(torch.rand(bsz, generator=g) < 0.1, (c + 1) % 10, c)
    return s, t, t2, dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca)


def _impl(name: str):
    import fasthash
    from fasthash import reference

    return {"fused": fasthash.brcd_contrastive_loss, "naive": reference.brcd_loss_ref}[name]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(name: str, bsz: int, length: int) -> None:
    """Runs in a subprocess: prints JSON with the peak extra resident memory of one call."""
    import torch

    fn = _impl(name)
    small = _inputs(64, length, 1)
    fn(small[0], small[1], small[2], **small[3]).backward()  # warm-up: thread pools, kernels
    s, t, t2, kw = _inputs(bsz, length)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    loss = fn(s, t, t2, **kw)
    loss.backward()
    secs = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(json.dumps({"impl": name, "n_rows": 2 * bsz, "bits": length,
                      "peak_extra_mib": (peak - base) / 1024, "seconds": secs,
                      "loss": float(loss), "threads": torch.get_num_threads()}))


def memory(bsz: int, length: int) -> dict:
    out = {}
    for name in ("fused", "naive"):
        res = subprocess.run(
            [sys.executable, __file__, "--child", name, str(bsz), str(length)],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )
        if res.returncode != 0:
            out[name] = {"error": res.stderr[-2000:]}
        else:
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    if "peak_extra_mib" in out.get("fused", {}) and "peak_extra_mib" in out.get("naive", {}):
        out["fused_over_naive"] = out["fused"]["peak_extra_mib"] / out["naive"]["peak_extra_mib"]
    return out


def speed(bsz: int, length: int, repeats: int) -> dict:
    import torch

    s, t, t2, kw = _inputs(bsz, length)
    times = {"fused": [], "naive": []}
    for name in ("fused", "naive"):  # warm-up
        _impl(name)(s, t, t2, **kw).backward()
    for _ in range(repeats):
        for name in ("fused", "naive"):
            s.grad = None
            t0 = time.perf_counter()
            _impl(name)(s, t, t2, **kw).backward()
            times[name].append(time.perf_counter() - t0)
    res = {name: {"best_s": min(v), "median_s": statistics.median(v)} for name, v in times.items()}
    res["naive_over_fused_best"] = res["naive"]["best_s"] / res["fused"]["best_s"]
    res["naive_over_fused_median"] = res["naive"]["median_s"] / res["fused"]["median_s"]
    res["n_rows"], res["bits"], res["threads"] = 2 * bsz, length, torch.get_num_threads()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    p.add_argument("--child", nargs=3, metavar=("IMPL", "B", "L"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child_memory(a.child[0], int(a.child[1]), int(a.child[2]))
        return 0
    mem_b, speed_b, reps = (1024, 512, 2) if a.quick else (8192, 2048, 5)
    from fasthash import backend_info

    result = {"env": backend_info(), "memory": memory(mem_b, 64), "speed": speed(speed_b, 64, reps)}
    m, sp = result["memory"], result["speed"]
    for name in ("fused", "naive"):
        if "peak_extra_mib" in m[name]:
            print(f"memory N={2 * mem_b} L=64 {name:5s}: peak extra "
                  f"{m[name]['peak_extra_mib']:9.1f} MiB  ({m[name]['seconds']:.2f} s fwd+bwd)")
        else:
            print(f"memory {name}: FAILED\n{m[name]['error']}")
    if "fused_over_naive" in m:
        print(f"memory ratio fused/naive: {100 * m['fused_over_naive']:.2f} %  (target <= 1 %)")
    print(f"speed N={2 * speed_b} L=64 fwd+bwd: fused best {sp['fused']['best_s']:.3f} s "
          f"(median {sp['fused']['median_s']:.3f}), naive best {sp['naive']['best_s']:.3f} s "
          f"(median {sp['naive']['median_s']:.3f}); naive/fused {sp['naive_over_fused_best']:.2f}x"
          f" best, {sp['naive_over_fused_median']:.2f}x median  (target >= 1x)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = all("peak_extra_mib" in m[n] for n in ("fused", "naive"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
