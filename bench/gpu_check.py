"""One-shot GPU check of the fasthash kernels (≤ ~5 minutes on an H100), JSON out.

Sections (each guarded: an error is recorded in the JSON and the script goes on):

1. ``tests``: pytest on tests/test_kernels.py with the kernels compiled for the GPU.
2. ``precision``: fused BRCD loss with fp32 (TF32 dots) and bf16 codes vs the float64 reference
   (KERNELS.md tolerances: loss rtol 1e-3; gradients 5e-3 / 1e-2 of max|g|).
3. ``loss``: fused loss forward + backward vs naive torch eager (fasthash.reference) and
   torch.compile of it, 2B in {4k, 16k, 32k}, L in {64, 256}: triton.testing.do_bench median,
   peak extra memory. Targets at 2B = 32k, L = 64: >= 3x eager, >= 1.5x torch.compile.
4. ``lse_tiles``: a small sweep of the fused kernels' tile sizes at 2B = 32k, L = 64.
5. ``similarity``: masked similarity throughput vs the memory roofline (bytes moved / time,
   against a measured device-to-device copy and the nominal peak). Target >= 70 %.
6. ``topk``: packed top-k (Triton) vs a torch baseline (±1 fp16 matmul + torch.topk), with an
   exactness check against fasthash.reference.topk_ref on a subset.

Usage: ``python bench/gpu_check.py --out DIR`` (writes DIR/kernels_gpu.json, exit code 0 only if
every section ran and every correctness check passed). ``--cpu-smoke`` runs tiny sizes on the
CPU (Triton interpreter) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULT: dict = {"sections": {}, "ok": True}
OUT_PATH = ""
T0 = time.time()
BUDGET_S = 290.0


def _save() -> None:
    RESULT["elapsed_s"] = round(time.time() - T0, 1)
    with open(OUT_PATH, "w") as f:
        json.dump(RESULT, f, indent=2, default=str)


def _left() -> float:
    return BUDGET_S - (time.time() - T0)


def section(name: str):
    """Decorator: run a section, record its result or its error, save the JSON after it."""

    def wrap(fn):
        def run(*a, **kw):
            t = time.time()
            print(f"== {name} ({_left():.0f} s of budget left)", flush=True)
            try:
                res = fn(*a, **kw)
                RESULT["sections"][name] = {"ok": True, **(res or {})}
                if res and res.get("failed"):
                    RESULT["sections"][name]["ok"] = False
                    RESULT["ok"] = False
            except Exception as e:  # noqa: BLE001 - record and continue
                RESULT["sections"][name] = {"ok": False, "error": repr(e),
                                            "traceback": traceback.format_exc()[-4000:]}
                RESULT["ok"] = False
                print(f"   ERROR in {name}: {e!r}", flush=True)
            RESULT["sections"][name]["seconds"] = round(time.time() - t, 1)
            _save()

        return run

    return wrap


# --------------------------------------------------------------------------- helpers


def _timer(smoke: bool):
    """Median milliseconds of fn(): triton.testing.do_bench on the GPU, perf_counter on CPU."""
    if smoke:
        def bench(fn, rep=3):
            fn()
            ts = []
            for _ in range(rep):
                t = time.perf_counter()
                fn()
                ts.append(1e3 * (time.perf_counter() - t))
            return sorted(ts)[len(ts) // 2]
        return bench
    import triton.testing

    def bench(fn, rep=None):
        return triton.testing.do_bench(fn, warmup=10, rep=rep or 60, return_mode="median")

    return bench


def _peak_mib(fn, dev) -> float | None:
    import torch

    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _loss_inputs(bsz, length, dev, dtype=None, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    s = torch.randn(bsz, length, generator=g).to(dev, dtype).requires_grad_()
    t = torch.randn(bsz, length, generator=g).sign().to(dev, dtype)
    t2 = torch.randn(bsz, length, generator=g).sign().to(dev, dtype)
    table = (torch.rand(10, length, generator=g) > 0.3).float().to(dev)
    c = torch.randint(0, 10, (bsz,), generator=g).to(dev)
    ca = torch.where(torch.rand(bsz, generator=g).to(dev) < 0.1, (c + 1) % 10, c)
    return s, t, t2, dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca)


# --------------------------------------------------------------------------- sections


@section("env")
def env_section(dev):
    import torch

    import fasthash

    info = fasthash.backend_info()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = None
    res = {"backend_info": info, "commit": commit, "python": platform.python_version(),
           "device": dev}
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        res.update(gpu=p.name, sms=p.multi_processor_count, mem_gib=p.total_memory / 2**30,
                   capability=f"{p.major}.{p.minor}")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.max.sm,clocks.max.mem,"
                              "power.limit,driver_version", "--format=csv"],
                             capture_output=True, text=True, check=False)
        res["nvidia_smi"] = smi.stdout.strip()
    return res


@section("tests")
def tests_section(smoke):
    timeout = max(30, min(110, _left() - 170))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/test_kernels.py"]
    if smoke:
        cmd += ["-k", "B7 or Q7"]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             check=False)
        tail, rc = (res.stdout + res.stderr)[-3000:], res.returncode
    except subprocess.TimeoutExpired as e:
        tail, rc = f"timeout after {timeout} s: {str(e.stdout)[-2000:]}", -1
    print("   " + tail.strip().splitlines()[-1] if tail.strip() else "   (no output)")
    return {"returncode": rc, "output_tail": tail, "failed": rc != 0}


@section("precision")
def precision_section(dev, smoke):
    import torch

    import fasthash
    from fasthash import reference as ref

    bsz = 64 if smoke else 2048
    out, failed = {}, False
    for name, dtype, grad_tol in (("fp32-tf32", torch.float32, 5e-3),
                                  ("bf16", torch.bfloat16, 1e-2)):
        s, t, t2, kw = _loss_inputs(bsz, 64, dev, dtype, seed=3)
        loss = fasthash.brcd_contrastive_loss(s, t, t2, **kw)
        loss.backward()
        s64 = s.detach().double().cpu().requires_grad_()
        kw64 = {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in kw.items()}
        want = ref.brcd_loss_ref(s64, t.double().cpu(), t2.double().cpu(), **kw64)
        want.backward()
        lerr = abs(loss.item() - want.item()) / abs(want.item())
        gerr = ((s.grad.double().cpu() - s64.grad).abs().max() / s64.grad.abs().max()).item()
        x = torch.randn(bsz, 64, device=dev).to(dtype)
        mk = (kw["mask_table"], kw["cluster_ids"])
        sim = fasthash.masked_hamming_similarity(x, x, mk, mk)
        m64 = kw["mask_table"].double().cpu()[kw["cluster_ids"].cpu()]
        sim_want = ref.masked_similarity_ref(x.double().cpu(), x.double().cpu(), m64, m64)
        serr = (sim.double().cpu() - sim_want).abs().max().item()
        ok = lerr <= 1e-3 and gerr <= grad_tol and serr <= 5e-3
        failed |= not ok
        out[name] = {"loss_rel_err": lerr, "grad_err_over_max": gerr,
                     "similarity_max_abs_err": serr, "ok": ok}
    return {"checks": out, "failed": failed}


def _naive(s, t, t2, kw):
    from fasthash import reference as ref

    return ref.brcd_loss_ref(s, t, t2, **kw)


def _fused(s, t, t2, kw):
    import fasthash

    return fasthash.brcd_contrastive_loss(s, t, t2, **kw)


def _loss_row(n_rows, length, impls, dev, bench) -> dict:
    import torch

    s, t, t2, kw = _loss_inputs(n_rows // 2, length, dev)
    row = {"n_rows": n_rows, "bits": length}
    for name, fn in impls.items():

        def go(fn=fn):
            s.grad = None
            fn(s, t, t2, kw).backward()

        try:
            go()  # warm-up / compile
            row[f"{name}_ms"] = bench(go)
            row[f"{name}_peak_mib"] = _peak_mib(go, dev)
        except Exception as e:  # noqa: BLE001 - e.g. OOM of the naive version
            row[f"{name}_error"] = repr(e)[:500]
            if dev == "cuda":
                torch.cuda.empty_cache()
    for name in ("eager", "compile"):
        if f"{name}_ms" in row and "fused_ms" in row:
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / row["fused_ms"]
        if row.get(f"{name}_peak_mib") and row.get("fused_peak_mib") is not None:
            row[f"memory_fraction_vs_{name}"] = row["fused_peak_mib"] / row[f"{name}_peak_mib"]
    return row


@section("loss")
def loss_section(dev, smoke):
    import torch

    bench = _timer(smoke)
    # the target shape first, so a tight budget still measures it
    shapes = [(256, 64)] if smoke else [(32768, 64), (4096, 64), (16384, 64), (4096, 256),
                                        (16384, 256), (32768, 256)]
    compiled_for = {(256, 64)} if smoke else {(32768, 64)}
    naive_compiled = torch.compile(_naive)
    rows = []
    for n_rows, length in shapes:
        if _left() < 60:
            rows.append({"n_rows": n_rows, "bits": length, "skipped": "time budget"})
            continue
        impls = {"fused": _fused, "eager": _naive}
        if (n_rows, length) in compiled_for:
            impls["compile"] = naive_compiled
        row = _loss_row(n_rows, length, impls, dev, bench)
        print("   " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                  for k, v in row.items() if "error" not in k}), flush=True)
        rows.append(row)
    target = next((r for r in rows if r["n_rows"] == (256 if smoke else 32768)
                   and r["bits"] == 64), {})
    return {"rows": rows, "target_32k_64": {
        "speedup_vs_eager": target.get("speedup_vs_eager"), "goal_eager": 3.0,
        "speedup_vs_compile": target.get("speedup_vs_compile"), "goal_compile": 1.5}}


@section("lse_tiles")
def tiles_section(dev, smoke):
    import torch

    from fasthash.ops import blocked
    from fasthash.ops import contrastive_triton as ct

    if _left() < 45:
        return {"skipped": "time budget"}
    bench = _timer(smoke)
    bsz = 128 if smoke else 16384
    g = torch.Generator().manual_seed(4)
    za = blocked.normalize_rows(torch.randn(bsz, 64, generator=g)).to(dev)
    zb = blocked.normalize_rows(torch.randn(bsz, 64, generator=g)).to(dev)
    pos = (za * zb).sum(1) / 0.3
    c = torch.randint(0, 10, (bsz,), generator=g).to(dev)
    rc = cc = torch.cat([c, c])
    gl = torch.ones(2 * bsz, device=dev)
    configs = [(64, 64), (128, 64), (128, 128), (64, 128)] if not smoke else [(16, 16), (32, 32)]
    rows = []
    for br, bc in configs:
        row = {"block_r": br, "block_c": bc}
        try:
            lse = ct.contrastive_lse_forward(za, zb, pos, rc, cc, 1 / 0.3, block_r=br, block_c=bc)
            row["fwd_ms"] = bench(lambda br=br, bc=bc: ct.contrastive_lse_forward(
                za, zb, pos, rc, cc, 1 / 0.3, block_r=br, block_c=bc))
            row["fwd_online_max_ms"] = bench(lambda br=br, bc=bc: ct.contrastive_lse_forward(
                za, zb, pos, rc, cc, 1 / 0.3, block_r=br, block_c=bc, fixed_shift=False))
            row["bwd_ms"] = bench(lambda br=br, bc=bc, lse=lse: ct.contrastive_lse_backward(
                gl, za, zb, lse, rc, cc, 1 / 0.3, bsz, block_r=br, block_c=bc))
        except Exception as e:  # noqa: BLE001 - a config may not compile (registers)
            row["error"] = repr(e)[:300]
        rows.append(row)
        print("   " + json.dumps(row), flush=True)
    return {"n_rows": 2 * bsz, "bits": 64, "rows": rows}


@section("similarity")
def similarity_section(dev, smoke):
    import torch

    import fasthash

    bench = _timer(smoke)
    n = 256 if smoke else 16384
    rows = []
    copy_gbs = None
    if dev == "cuda":
        buf = torch.empty(n * n, dtype=torch.float32, device=dev)
        dst = torch.empty_like(buf)
        ms = bench(lambda: dst.copy_(buf))
        copy_gbs = 2 * buf.numel() * 4 / ms / 1e6
        del buf, dst
    nominal = {"H100": 3350.0, "H200": 4800.0}
    name = torch.cuda.get_device_name(0) if dev == "cuda" else ""
    peak_gbs = next((v for k, v in nominal.items() if k in name), None)
    if peak_gbs and "PCIe" in name:
        peak_gbs = 2000.0
    for length in (64, 256):
        for dtype in (torch.float32, torch.bfloat16):
            for masked in (False, True):
                g = torch.Generator().manual_seed(length)
                x = torch.randn(n, length, generator=g).to(dev, dtype)
                y = torch.randn(n, length, generator=g).to(dev, dtype)
                table = (torch.rand(8, length, generator=g) > 0.3).float().to(dev)
                ids = torch.randint(0, 8, (n,), generator=g).to(dev)
                mk = (table, ids) if masked else None
                ms = bench(lambda x=x, y=y, mk=mk: fasthash.masked_hamming_similarity(x, y, mk, mk))
                moved = n * n * 4 + 2 * n * length * x.element_size()
                gbs = moved / ms / 1e6
                row = {"n": n, "bits": length, "dtype": str(dtype).split(".")[-1],
                       "masked": masked, "ms": ms, "gb_per_s": gbs,
                       "fraction_of_copy_bw": gbs / copy_gbs if copy_gbs else None,
                       "fraction_of_nominal_bw": gbs / peak_gbs if peak_gbs else None}
                rows.append(row)
                print("   " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in row.items()}), flush=True)
    return {"copy_gb_per_s": copy_gbs, "nominal_gb_per_s": peak_gbs, "rows": rows, "goal": 0.7}


def _topk_rows(words, nx, nq, dev, bench, topk_fn, topk_ref):
    import torch

    g = torch.Generator().manual_seed(words)
    x = torch.randint(-(2**62), 2**62, (nx, words), generator=g).to(dev)
    q = torch.randint(-(2**62), 2**62, (nq, words), generator=g).to(dev)
    bits = 64 * words
    shifts = torch.arange(64, device=dev)

    def unpack(w):  # ±1 fp16 codes: distance = (L - <a, b>) / 2, exact in fp32 accumulation
        return ((w[:, :, None] >> shifts) & 1).reshape(w.shape[0], bits).half() * 2 - 1

    xf, qf = unpack(x), unpack(q)
    sub_q, sub_x = q[:8].cpu(), x[:20000].cpu()  # the reference is O(Q N W) memory
    for k in (10, 100):
        d, i = topk_fn(sub_q.to(dev), sub_x.to(dev), k)
        dw, iw = topk_ref(sub_q, sub_x, k)
        exact = torch.equal(d.cpu(), dw) and torch.equal(i.cpu(), iw)
        row = {"bits": bits, "k": k, "n": nx, "q": nq, "exact_on_subset": exact}
        row["triton_ms"] = bench(lambda k=k: topk_fn(q, x, k))

        def torch_topk(k=k):
            return [torch.topk((bits - qf[c0:c0 + 1024] @ xf.T) * 0.5, k, dim=1, largest=False)
                    for c0 in range(0, qf.shape[0], 1024)]

        row["torch_ms"] = bench(torch_topk)
        row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
        yield row


@section("topk")
def topk_section(dev, smoke):

    from fasthash import reference as ref
    from fasthash.ops.hamming_topk_triton import hamming_topk_cuda

    if _left() < 20:
        return {"skipped": "time budget"}
    bench = _timer(smoke)
    nx, nq = (3000, 16) if smoke else (1_000_000, 4096)
    rows, failed = [], False
    for words in (1, 4):
        for row in _topk_rows(words, nx, nq, dev, bench, hamming_topk_cuda, ref.topk_ref):
            failed |= not row["exact_on_subset"]
            rows.append(row)
            print("   " + json.dumps(row), flush=True)
    return {"rows": rows, "failed": failed}


def main(argv=None) -> int:
    global OUT_PATH
    p = argparse.ArgumentParser(description="fasthash GPU kernel check (JSON out)")
    p.add_argument("--out", required=True, help="folder for kernels_gpu.json")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU through the Triton interpreter (script check)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    OUT_PATH = os.path.join(a.out, "kernels_gpu.json" if not a.cpu_smoke else
                            "kernels_gpu_smoke.json")
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    RESULT["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if dev != "cuda" and not a.cpu_smoke:
        RESULT["ok"] = False
        RESULT["error"] = "no CUDA device (use --cpu-smoke to check the script on a CPU)"
        _save()
        print(RESULT["error"], file=sys.stderr)
        return 2
    skip = set(filter(None, a.skip.split(",")))
    env_section(dev)
    steps = [("tests", lambda: tests_section(a.cpu_smoke)),
             ("precision", lambda: precision_section(dev, a.cpu_smoke)),
             ("loss", lambda: loss_section(dev, a.cpu_smoke)),
             ("similarity", lambda: similarity_section(dev, a.cpu_smoke)),
             ("topk", lambda: topk_section(dev, a.cpu_smoke)),
             ("lse_tiles", lambda: tiles_section(dev, a.cpu_smoke))]
    for name, run in steps:
        if name not in skip:
            run()
    _save()
    print(f"wrote {OUT_PATH}; ok = {RESULT['ok']}; {time.time() - T0:.0f} s", flush=True)
    return 0 if RESULT["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
