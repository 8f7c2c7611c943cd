"""The distributed-loss cases, run by ``tests/test_distributed_loss.py`` under
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_loss_worker.py
--out DIR`` (gloo on CPU). Each rank runs every case and writes ``DIR/rank<r>.json``:
``{case: {"ok": bool, "detail": str, "skipped": str | None}}``; the pytest side asserts per case.

The oracle is the single-process fused loss (``group=None``, float64, itself tested against
:mod:`fasthash.reference`) on the rank-major concatenation of every rank's rows, which every
rank builds from the same seed. Gradient convention under test (fasthash.distributed): for
"mean" / "sum" rank r's inputs receive ``(sum_q grad_output_q) * dL/d(rank r's rows)``; for
"none" the gradient of ``sum_q <w_q, rows_q>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # read when the kernel modules are imported (KERNELS.md): set before any fasthash import
    os.environ["TRITON_INTERPRET"] = "1"

import torch.distributed as dist  # noqa: E402

import fasthash  # noqa: E402
from fasthash.ops import blocked  # noqa: E402

CASES: dict[str, object] = {}
F64_TOL = 1e-9  # float64: the fused path agrees with float64 math to ~1e-12
F32_TOL = 1e-5  # KERNELS.md, CPU / interpreter fp32: loss rtol = atol, grads * max|g|


class Skip(Exception):
    """A case that cannot run here (the reason is reported)."""


def case(name):
    return lambda fn: CASES.setdefault(name, fn)


def _rank():
    return dist.get_rank(), dist.get_world_size()


def _span(sizes):
    r, _ = _rank()
    return sum(sizes[:r]), sizes[r]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_close(errs, name, got, want, tol, scale=None):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        errs.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    s = want.abs().max().item() if scale is None else scale
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if not err <= tol * max(s, 1.0 if scale is None else 1e-300):
        errs.append(f"{name}: max err {err:.3g} > {tol:g} x {s:.3g}")


def _same_on_every_rank(errs, value):
    vals = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(vals, value.detach().double().reshape(1))
    if any(v.item() != vals[0].item() for v in vals):
        errs.append(f"loss differs between ranks: {[v.item() for v in vals]}")


def _finish(errs, info=""):
    if errs:
        raise AssertionError("; ".join(errs))
    return info


# --------------------------------------------------------------------------- value + gradients


def _run(fn, glob, grad_keys, sizes, reduction, dtype, tol, go, seed):
    """Compare ``fn(**local rows, group=WORLD)`` with ``fn(**global rows, group=None)``.

    ``glob``: name -> global tensor (row tensors have sum(sizes) rows; ``mask_table`` is
    replicated). ``go``: every rank's grad_output for "mean" / "sum" (weights for "none").
    """
    rank, world = _rank()
    off, n = _span(sizes)
    total = sum(sizes)
    rowwise = {k for k, v in glob.items() if k != "mask_table" and v.shape[0] == total}
    # oracle: one process, float64, the global batch
    wg = {k: (v.clone().requires_grad_(k in grad_keys) if k in rowwise else v)
          for k, v in glob.items()}
    want = fn(**wg, reduction=reduction, group=None)
    idx = torch.cat([torch.arange(off, off + n), total + torch.arange(off, off + n)])
    if reduction == "none":
        w = torch.rand(2 * total, generator=_gen(seed), dtype=torch.float64)
        obj_want, w_loc = (want * w).sum(), w[idx]
    else:
        obj_want = want * sum(go)
    keys = sorted(grad_keys)
    gw = torch.autograd.grad(obj_want, [wg[k] for k in keys])
    # the distributed call: local rows only
    lc = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in glob.items()}
    lc = {k: (v[off:off + n].clone().requires_grad_(k in grad_keys) if k in rowwise else v)
          for k, v in lc.items()}
    got = fn(**lc, reduction=reduction, group=dist.group.WORLD)
    errs = []
    if reduction == "none":
        _check_close(errs, "per-row losses", got, want[idx], tol)
        obj = (got * w_loc.to(got.dtype)).sum()
    else:
        _check_close(errs, "loss", got, want, tol)
        _same_on_every_rank(errs, got)
        obj = got * go[rank]
    gg = torch.autograd.grad(obj, [lc[k] for k in keys])
    for k, a, b in zip(keys, gg, gw, strict=True):
        if a.dtype != lc[k].dtype:
            errs.append(f"d {k}: dtype {a.dtype} != {lc[k].dtype}")
        _check_close(errs, f"d {k}", a, b[off:off + n], tol, scale=b.abs().max().item())
    return _finish(errs, f"rank {rank}: {n} of {total} rows, loss {float(got.detach().sum()):.6g}")


def _ntxent_inputs(sizes, length, seed):
    g = _gen(seed)
    total = sum(sizes)
    return {"z1": torch.randn(total, length, generator=g, dtype=torch.float64),
            "z2": torch.randn(total, length, generator=g, dtype=torch.float64)}


def _brcd_inputs(sizes, length, seed, n_table=4, masks="table", clusters="offset"):
    g = _gen(seed)
    total = sum(sizes)
    out = {"student": torch.randn(total, length, generator=g, dtype=torch.float64),
           "teacher_same": torch.randn(total, length, generator=g, dtype=torch.float64).sign(),
           "teacher_other": torch.randn(total, length, generator=g, dtype=torch.float64).sign()}
    if masks == "table":
        table = (torch.rand(n_table, length, generator=g) > 0.4).double()
        table[0] = 0  # an empty mask row
        out["mask_table"] = table
    elif masks == "one-row":
        out["mask_table"] = (torch.rand(1, length, generator=g) > 0.3).double()
    if clusters is not None:
        c = torch.randint(0, n_table, (total,), generator=g)
        out["cluster_ids"] = c
        if clusters == "offset":
            out["aug_cluster_ids"] = torch.where(
                torch.rand(total, generator=g) < 0.3,
                torch.randint(0, n_table, (total,), generator=g), c)
    return out


# the losses under test (a fixed temperature / hyper-parameters) and their inputs(sizes)
_nt = lambda tau: lambda z1, z2, **kw: fasthash.nt_xent_loss(z1, z2, tau, **kw)
_brcd = lambda **hyper: lambda **kw: fasthash.brcd_contrastive_loss(**kw, **hyper)
_nti = lambda length, seed: lambda sizes: _ntxent_inputs(sizes, length, seed)
_bri = lambda length, seed, **kw: lambda sizes: _brcd_inputs(sizes, length, seed, **kw)


F64, F32 = torch.float64, torch.float32
NT, ST = {"z1", "z2"}, {"student"}
# name: (loss, inputs(sizes), grad keys, sizes, reduction, dtype, every rank's grad_output)
VALUE_CASES = {
    "ntxent-f64-mean-equal-go": (_nt(0.3), _nti(16, 1), NT, [4, 4], "mean", F64, [1.7, 0.6]),
    "ntxent-f64-sum-unequal-3-5": (_nt(0.5), _nti(13, 2), NT, [3, 5], "sum", F64, [1.0, 2.0]),
    "ntxent-f64-none-unequal-5-2": (_nt(0.3), _nti(24, 3), NT, [5, 2], "none", F64, None),
    "ntxent-f32-tau.05-unequal-5-3": (_nt(0.05), _nti(64, 4), NT, [5, 3], "mean", F32,
                                      [1.0, 1.0]),
    "brcd-f64-mean-masks-offset-3-5": (_brcd(alpha=0.8, temperature=0.3), _bri(20, 5), ST,
                                       [3, 5], "mean", F64, [1.7, 1.7]),
    "brcd-f64-sum-onerow-alpha0": (_brcd(alpha=0.0, temperature=1.0),
                                   _bri(16, 6, masks="one-row", clusters=None), ST, [4, 4],
                                   "sum", F64, [0.5, 3.0]),
    "brcd-f64-none-fn-alpha1-5-3": (_brcd(alpha=1.0, temperature=0.3),
                                    _bri(40, 7, clusters="fn"), ST, [5, 3], "none", F64, None),
    "brcd-f64-teacher-grads-2-6": (_brcd(alpha=0.5, temperature=0.2, detach_teacher=False),
                                   _bri(12, 9), ST | {"teacher_same", "teacher_other"}, [2, 6],
                                   "mean", F64, [1.0, -0.5]),
    # 2 / tau = 100 > 80: the fp32 online-max path
    "brcd-f32-online-max-tau.02-6-2": (_brcd(alpha=0.8, temperature=0.02), _bri(32, 10), ST,
                                       [6, 2], "mean", F32, [1.0, 1.0]),
}


def _value_case(fn, inputs, keys, sizes, reduction, dtype, go):
    tol = F64_TOL if dtype == F64 else F32_TOL
    return lambda: _run(fn, inputs(sizes), keys, sizes, reduction, dtype, tol, go, seed=8)


for _name, _spec in VALUE_CASES.items():
    CASES[_name] = _value_case(*_spec)


@case("brcd-f32-triton-interpreter-4-5")
def _():
    """The Triton launchers (with a row offset) behind the distributed path, interpreted."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("needs the Triton interpreter (no CUDA device)")
    try:
        from fasthash.ops import contrastive_triton as ct
    except ImportError as e:
        raise Skip(f"triton not importable: {e}") from e
    saved = blocked.contrastive_lse_cpu, blocked.contrastive_lse_backward_cpu
    blocked.contrastive_lse_cpu = ct.contrastive_lse_forward
    blocked.contrastive_lse_backward_cpu = ct.contrastive_lse_backward
    try:
        sizes = [4, 5]
        return _run(_brcd(alpha=0.8, temperature=0.3), _brcd_inputs(sizes, 24, 11),
                    {"student"}, sizes, "mean", torch.float32, F32_TOL, go=[1.0, 1.0], seed=0)
    finally:
        blocked.contrastive_lse_cpu, blocked.contrastive_lse_backward_cpu = saved


@case("no-grad-forward-only")
def _():
    sizes = [3, 4]
    glob = _ntxent_inputs(sizes, 8, 12)
    off, n = _span(sizes)
    want = fasthash.nt_xent_loss(glob["z1"], glob["z2"])
    with torch.no_grad():
        got = fasthash.nt_xent_loss(glob["z1"][off:off + n], glob["z2"][off:off + n],
                                    group=dist.group.WORLD)
    errs = []
    _check_close(errs, "loss", got, want, F64_TOL)
    return _finish(errs)


@case("world-size-1-subgroups")
def _():
    """Each rank alone in a group: the loss is its own single-process loss."""
    rank, world = _rank()
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    glob = _brcd_inputs([5], 12, 13)
    kw = {k: v for k, v in glob.items()}
    want = fasthash.brcd_contrastive_loss(**kw)
    got = fasthash.brcd_contrastive_loss(**kw, group=groups[rank])
    errs = []
    _check_close(errs, "loss", got, want, F64_TOL)
    other = groups[(rank + 1) % world]
    try:
        fasthash.brcd_contrastive_loss(**kw, group=other)
        errs.append("a group without this rank was accepted")
    except ValueError as e:
        if "contain this rank" not in str(e):
            errs.append(f"unclear error for a foreign group: {e}")
    return _finish(errs)


@case("nn-module-faces")
def _():
    """fasthash.nn losses built with group= give the functional results."""
    from fasthash import nn as fnn

    sizes = [3, 4]
    off, n = _span(sizes)
    glob = _brcd_inputs(sizes, 16, 14)
    loc = {k: (v if k == "mask_table" else v[off:off + n]) for k, v in glob.items()}
    kw = dict(alpha=0.6, temperature=0.4)
    errs = []
    mod = fnn.BRCDContrastiveLoss(**kw, group=dist.group.WORLD)
    got = mod(loc["student"], loc["teacher_same"], loc["teacher_other"], loc["mask_table"],
              loc["cluster_ids"], loc["aug_cluster_ids"])
    _check_close(errs, "BRCDContrastiveLoss", got, fasthash.brcd_contrastive_loss(**glob, **kw),
                 F64_TOL)
    nt = fnn.NTXentLoss(0.4, group=dist.group.WORLD)
    want = fasthash.nt_xent_loss(glob["student"], glob["teacher_same"], 0.4)
    _check_close(errs, "NTXentLoss", nt(loc["student"], loc["teacher_same"]), want, F64_TOL)
    if "group=<2 ranks>" not in repr(nt):
        errs.append(f"repr lacks the group: {nt!r}")
    return _finish(errs)


# --------------------------------------------------------------------------- DDP


def _ddp_grads(kind, sizes, seed):
    """Parameter grads of a DDP-wrapped tiny linear hash head on the local rows vs one process
    on the global batch (float64); DDP averages the ranks' gradients, whatever their sizes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    off, n = _span(sizes)
    total = sum(sizes)
    g = _gen(seed)
    x1 = torch.randn(total, 10, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(total, 10, generator=g, dtype=torch.float64)
    rest = {k: v for k, v in _brcd_inputs(sizes, 16, seed + 1).items() if k != "student"}
    torch.manual_seed(seed)
    single = torch.nn.Linear(10, 16).double()
    model = DDP(torch.nn.Linear(10, 16).double())
    model.module.load_state_dict(single.state_dict())

    def loss(m, sl, group):
        if kind == "ntxent":
            return fasthash.nt_xent_loss(m(x1[sl]), m(x2[sl]), 0.3, group=group)
        kw = {k: (v if k == "mask_table" else v[sl]) for k, v in rest.items()}
        return fasthash.brcd_contrastive_loss(m(x1[sl]), **kw, group=group)

    loss(single, slice(None), None).backward()
    (loss(model, slice(off, off + n), dist.group.WORLD) * 1.0).backward()
    errs = []
    for (name, p), q in zip(model.module.named_parameters(), single.parameters(), strict=True):
        _check_close(errs, f"DDP d {name}", p.grad, q.grad, F64_TOL)
    return _finish(errs, f"rank {dist.get_rank()}: {n} of {total} rows")


@case("ddp-ntxent-linear-4-4")
def _():
    return _ddp_grads("ntxent", [4, 4], 20)


@case("ddp-brcd-linear-unequal-3-5")
def _():
    return _ddp_grads("brcd", [3, 5], 21)


# --------------------------------------------------------------------------- bad input


def _expect_error(call, cls, *needles):
    """``call()`` must raise ``cls`` whose message holds every needle (on this rank)."""
    try:
        call()
    except cls as e:
        missing = [w for w in needles if w not in str(e)]
        if missing:
            raise AssertionError(f"message lacks {missing}: {e}") from e
        return f"{type(e).__name__}: {e}"[:300]
    raise AssertionError(f"no {cls.__name__} raised")


def _local_codes(length, rows=3, dtype=torch.float64, seed=30):
    g = _gen(seed + dist.get_rank())
    return (torch.randn(rows, length, generator=g, dtype=dtype),
            torch.randn(rows, length, generator=g, dtype=dtype))


def _nt_error(a, b, cls, *needles, tau=0.3):
    """``nt_xent_loss(a, b, tau)`` over the world group must raise ``cls`` with ``needles``."""
    return _expect_error(lambda: fasthash.nt_xent_loss(a, b, tau, group=dist.group.WORLD),
                         cls, *needles)


@case("err-code-length-differs")
def _():
    a, b = _local_codes(16 if dist.get_rank() == 0 else 8)
    return _nt_error(a, b, ValueError, "code length L", "rank 0 has 16", "rank 1 has 8")


@case("err-dtype-differs")
def _():
    a, b = _local_codes(8, dtype=torch.float64 if dist.get_rank() == 0 else torch.float32)
    return _nt_error(a, b, ValueError, "compute dtype")


@case("err-temperature-differs")
def _():
    a, b = _local_codes(8)
    return _nt_error(a, b, ValueError, "temperature", tau=0.3 if dist.get_rank() == 0 else 0.5)


@case("err-nan-on-rank-1-only")
def _():
    a, b = _local_codes(8)
    if dist.get_rank() == 1:
        a[0, 0] = float("nan")
    need = ("z1 contains NaN",) if dist.get_rank() == 1 else ("rank 1", "z1 contains NaN")
    return _nt_error(a, b, ValueError, *need)


@case("err-other-exception-on-rank-1-only")
def _():
    """Not a TypeError / ValueError (e.g. an op a tensor type lacks): still on every rank."""
    def fail(*a, **k):
        raise NotImplementedError("simulated failure in the checks")

    a, b = _local_codes(8)
    rank, saved = dist.get_rank(), fasthash.functional._common_fields
    fasthash.functional._common_fields = fail if rank == 1 else saved
    try:
        if rank == 1:
            return _nt_error(a, b, NotImplementedError, "simulated failure")
        return _nt_error(a, b, ValueError, "rank 1", "NotImplementedError", "simulated failure")
    finally:
        fasthash.functional._common_fields = saved


@case("err-bad-ids-on-rank-0-only")
def _():
    glob = _brcd_inputs([3], 8, 31)
    if dist.get_rank() == 0:
        glob["cluster_ids"] = glob["cluster_ids"].float()  # a TypeError on rank 0 alone
    need = ("cluster_ids",) if dist.get_rank() == 0 else ("rank 0", "cluster_ids")
    return _expect_error(lambda: fasthash.brcd_contrastive_loss(**glob, group=dist.group.WORLD),
                         TypeError, *need)


@case("err-mask-table-differs")
def _():
    glob = _brcd_inputs([3], 8, 32)
    glob["mask_table"] = glob["mask_table"].clone()
    # equal position-weighted sums (9 + 12 == 10 + 11): a checksum must tell them apart
    row = [1, 0, 0, 1] if dist.get_rank() == 0 else [0, 1, 1, 0]
    glob["mask_table"][1] = torch.tensor(row + [1, 1, 1, 1], dtype=torch.float64)
    return _expect_error(lambda: fasthash.brcd_contrastive_loss(**glob, group=dist.group.WORLD),
                         ValueError, "mask_table contents")


@case("err-detach-teacher-differs")
def _():
    glob = _brcd_inputs([3], 8, 34)
    kw = dict(detach_teacher=dist.get_rank() == 0, group=dist.group.WORLD)
    return _expect_error(lambda: fasthash.brcd_contrastive_loss(**glob, **kw), ValueError,
                         "disagree on detach_teacher")


@case("err-different-losses")
def _():
    a, b = _local_codes(8)
    if dist.get_rank() == 0:
        return _nt_error(a, b, ValueError, "loss called")
    return _expect_error(lambda: fasthash.brcd_contrastive_loss(a, b, b, group=dist.group.WORLD),
                         ValueError, "loss called")


@case("err-grad-mode-differs")
def _():
    a, b = _local_codes(8)
    a.requires_grad_()
    with torch.set_grad_enabled(dist.get_rank() == 0):
        return _nt_error(a, b, ValueError, "backward will run")


@case("err-not-a-group")
def _():
    a, b = _local_codes(8)
    return _expect_error(lambda: fasthash.nt_xent_loss(a, b, group="world"), TypeError,
                         "group must be a torch.distributed.ProcessGroup")


@case("err-device-not-of-the-backend")
def _():
    """Rank 1's codes on a device gloo cannot send: CUDA where there is one, else meta (the
    same backend / device check, so it runs without a GPU too)."""
    dev = "cuda" if torch.cuda.is_available() else "meta"
    a, b = _local_codes(8)
    if dist.get_rank() == 1:
        a, b = a.to(dev), b.to(dev)
    need = ("gloo", f"on {dev}") if dist.get_rank() == 1 else ("rank 1", "gloo")
    return _nt_error(a, b, ValueError, *need)


@case("still-in-step-after-errors")
def _():
    sizes = [2, 3]
    return _run(_nt(0.3), _ntxent_inputs(sizes, 8, 33), {"z1"}, sizes, "mean", torch.float64,
                F64_TOL, go=[1.0, 1.0], seed=0)


# --------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for rank<r>.json")
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    # tiles much smaller than the batches: row spans cross tile and band boundaries
    blocked.BLOCK_ROWS, blocked.BLOCK_COLS = 4, 6
    only = [c for c in args.only.split(",") if c]
    results = {}
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, "detail": fn() or "", "skipped": None}
        except Skip as e:
            results[name] = {"ok": True, "detail": "", "skipped": str(e)}
        except Exception:  # noqa: BLE001 - reported per case to the pytest side
            results[name] = {"ok": False, "detail": traceback.format_exc()[-3000:],
                             "skipped": None}
        dist.barrier()
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
