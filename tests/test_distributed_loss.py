"""The fused losses with ``group=`` over torch.distributed equal the single-process loss on the
global batch, in value and gradients (DDP included), and refuse bad input on every rank.

The multi-process cases run in ONE ``torchrun --nproc_per_node 2`` launch (gloo on CPU) of
``tests/dist_loss_worker.py``, which writes one JSON report per rank; each case is asserted
here from both reports. The in-process tests cover ``group=None`` and the errors that need no
second process, and the row-subset kernels behind the distributed path (blocked torch and the
Triton launchers under the interpreter).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fasthash
from fasthash import nn as fnn
from fasthash import reference as ref
from fasthash.ops import blocked, registry

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2


def _case_names():
    sys.path.insert(0, HERE)
    try:
        import dist_loss_worker
    finally:
        sys.path.remove(HERE)
    return list(dist_loss_worker.CASES)


CASES = _case_names()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_loss")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(WORLD), os.path.join(HERE, "dist_loss_worker.py"),
           "--out", str(out)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                             check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 300 s:\n{(e.stderr or b'')[-3000:]!r}")
    found = {}
    for r in range(WORLD):
        path = out / f"rank{r}.json"
        if path.exists():
            found[r] = json.loads(path.read_text())
    if len(found) != WORLD:
        pytest.fail(f"torchrun exited {res.returncode} with {len(found)} of {WORLD} reports:\n"
                    f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return found


@pytest.mark.parametrize("name", CASES)
def test_two_ranks(reports, name):
    rows = [reports[r].get(name) for r in range(WORLD)]
    assert all(row is not None for row in rows), f"{name}: not reported by every rank"
    skipped = [row["skipped"] for row in rows if row["skipped"]]
    failed = [f"rank {r}: {row['detail']}" for r, row in enumerate(rows) if not row["ok"]]
    assert not failed, "\n".join(failed)
    if skipped:
        pytest.skip(skipped[0])
    assert all(row["ok"] for row in rows)


# --------------------------------------------------------------------------- in-process


def _brcd_args(bsz=9, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(bsz, length, generator=g, dtype=torch.float64)
    t = torch.randn(bsz, length, generator=g, dtype=torch.float64).sign()
    t2 = torch.randn(bsz, length, generator=g, dtype=torch.float64).sign()
    table = (torch.rand(3, length, generator=g) > 0.4).double()
    c = torch.randint(0, 3, (bsz,), generator=g)
    return s, t, t2, dict(mask_table=table, cluster_ids=c, aug_cluster_ids=c.roll(1))


def test_group_none_is_the_single_process_loss(monkeypatch):
    """group=None never touches torch.distributed and keeps today's values and gradients."""
    def boom(*a, **k):
        raise AssertionError("torch.distributed used with group=None")

    for name in ("all_gather", "is_initialized", "get_rank", "all_gather_object"):
        monkeypatch.setattr(dist, name, boom)
    s, t, t2, kw = _brcd_args()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = fasthash.brcd_contrastive_loss(s1, t, t2, **kw, group=None)
    want = ref.brcd_loss_ref(s2, t, t2, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (g1,), (g2,) = torch.autograd.grad(got, s1), torch.autograd.grad(want, s2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    default = fasthash.brcd_contrastive_loss(s, t, t2, **kw)
    assert torch.equal(default, fasthash.brcd_contrastive_loss(s, t, t2, **kw, group=None))
    nt = fasthash.nt_xent_loss(s, t2, 0.4, group=None)
    torch.testing.assert_close(nt, ref.nt_xent_ref(s, t2, 0.4), rtol=1e-10, atol=1e-10)
    assert torch.equal(fnn.NTXentLoss(0.4)(s, t2), fasthash.nt_xent_loss(s, t2, 0.4))


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(),
                    reason="a process group is initialised in this process")
@pytest.mark.parametrize("group,cls,match", [
    pytest.param("pg", ValueError, "not initialised", id="uninitialised"),
    pytest.param("non-member", ValueError, "contain this rank", id="non-member"),
    pytest.param("world", TypeError, "ProcessGroup", id="a-string"),
    pytest.param(2, TypeError, "ProcessGroup", id="an-int"),
])
def test_group_without_torch_distributed_is_refused(group, cls, match):
    if group == "pg":
        group = dist.ProcessGroup(0, 1)  # a group object, but init_process_group never ran
    elif group == "non-member":
        group = dist.GroupMember.NON_GROUP_MEMBER  # what new_group returns on other ranks
    s, t, t2, kw = _brcd_args()
    with pytest.raises(cls, match=match):
        fasthash.brcd_contrastive_loss(s, t, t2, **kw, group=group)
    with pytest.raises(cls, match=match):
        fasthash.nt_xent_loss(s, t, group=group)
    with pytest.raises(cls, match=match):
        fnn.NTXentLoss(group=group)(s, t)


def test_modules_keep_the_group():
    pg = dist.ProcessGroup(0, 1)
    loss = fnn.BRCDContrastiveLoss(alpha=0.5, group=pg)
    assert loss.group is pg and "group=" in repr(loss)
    assert "group" not in repr(fnn.NTXentLoss())


# --------------------------------------------------------------------------- row-subset ops


def _lse_inputs(bsz, length, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    za = blocked.normalize_rows(torch.randn(bsz, length, generator=g, dtype=dtype))
    zb = blocked.normalize_rows(torch.randn(bsz, length, generator=g, dtype=dtype))
    za[2] = 0  # an empty (fully masked) row
    pos = torch.randn(bsz, generator=g, dtype=dtype)
    c = torch.randint(0, 3, (bsz,), generator=g)
    rc, cc = torch.cat([c, c]), torch.cat([c, torch.randint(0, 3, (bsz,), generator=g)])
    gl = torch.randn(2 * bsz, generator=g, dtype=dtype)
    return za, zb, pos, rc, cc, gl


@pytest.mark.parametrize("tau", [0.3, 0.01], ids=["fixed-shift", "online-max"])
@pytest.mark.parametrize("off,n", [(0, 5), (5, 9), (23, 1), (0, 24)])
def test_row_subset_ops_equal_the_full_batch(monkeypatch, tau, off, n):
    """One rank's rows of the global batch: the same lse and gradient rows as the full op."""
    monkeypatch.setattr(blocked, "BLOCK_ROWS", 4)
    monkeypatch.setattr(blocked, "BLOCK_COLS", 6)
    bsz = 24
    za, zb, pos, rc, cc, gl = _lse_inputs(bsz, 10, off * 31 + n)
    inv_tau = 1 / tau
    full = blocked.contrastive_lse_cpu(za, zb, pos, rc, cc, inv_tau)
    gfull = blocked.contrastive_lse_backward_cpu(gl, za, zb, full, rc, cc, inv_tau, 2 * bsz)
    idx = torch.cat([torch.arange(off, off + n), bsz + torch.arange(off, off + n)])
    lse = registry.contrastive_lse_rows(za, zb, pos[off:off + n], rc, cc, inv_tau, off, n)
    torch.testing.assert_close(lse, full[idx], rtol=1e-12, atol=1e-12)
    for rows in (n, 2 * n):
        gz = registry.contrastive_lse_rows_backward(gl, za, zb, full, rc, cc, inv_tau, off, n,
                                                    rows)
        torch.testing.assert_close(gz, gfull[idx[:rows]], rtol=1e-10, atol=1e-12)


def test_row_subset_refuses_a_subset_outside_the_batch():
    za, zb, pos, rc, cc, _ = _lse_inputs(6, 8, 1)
    with pytest.raises(ValueError, match="does not fit"):
        registry.contrastive_lse_rows(za, zb, pos[:3], rc, cc, 3.0, 4, 3)
    with pytest.raises(ValueError, match="one positive per local row"):
        registry.contrastive_lse_rows(za, zb, pos[:2], rc, cc, 3.0, 0, 3)


def test_row_subset_backward_refuses_the_local_lse():
    """The backward takes the global [2B] lse / grad_lse; the forward's local [2n] output is
    the natural wrong thing to pass (the kernels would read past its end)."""
    za, zb, pos, rc, cc, gl = _lse_inputs(6, 8, 2)
    full = blocked.contrastive_lse_cpu(za, zb, pos, rc, cc, 3.0)
    loc = registry.contrastive_lse_rows(za, zb, pos[1:3], rc, cc, 3.0, 1, 2)
    with pytest.raises(ValueError, match=r"^lse must be the global \[2B\] = \[12\]"):
        registry.contrastive_lse_rows_backward(gl, za, zb, loc, rc, cc, 3.0, 1, 2, 4)
    with pytest.raises(ValueError, match=r"^grad_lse must be the global .* got shape \(4,\)"):
        registry.contrastive_lse_rows_backward(gl[:4], za, zb, full, rc, cc, 3.0, 1, 2, 4)
    pytest.importorskip("triton")
    from fasthash.ops import contrastive_triton as ct

    if torch.cuda.is_available():
        za, zb, rc, cc, gl, loc = (t.cuda() for t in (za, zb, rc, cc, gl, loc))
    f = [t.float() for t in (za, zb, gl, loc)]
    with pytest.raises(ValueError, match=r"^lse must be the global \[2B\] = \[12\]"):
        ct.contrastive_lse_backward(f[2], f[0], f[1], f[3], rc, cc, 3.0, 4, row_offset=1,
                                    row_count=2)
    with pytest.raises(ValueError, match="does not fit"):  # the blocked path's own check
        ct.contrastive_lse_forward(f[0], f[1], f[2][:3], rc, cc, 3.0, row_offset=4, row_count=3)


def test_mask_table_checksum_tells_swapped_entries_apart():
    """The metadata checksum of the distributed BRCD loss: a position-weighted sum gave
    [1, 0, 0, 1] and [0, 1, 1, 0] the same value (1 + 4 == 2 + 3)."""
    from fasthash.functional import _checksum

    a, b = torch.tensor([[1.0, 0, 0, 1]]), torch.tensor([[0.0, 1, 1, 0]])
    assert _checksum(a) != _checksum(b)
    assert _checksum(a) == _checksum(a.clone()) == _checksum(a.bool()) == _checksum(a.double())
    big = (torch.rand(7, 33, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    big[3, 4], big[3, 5] = 1, 0
    swapped = big.clone()
    swapped[3, [4, 5]] = swapped[3, [5, 4]]
    assert (swapped != big).any() and _checksum(swapped) != _checksum(big)
    assert _checksum(big) == int(_checksum(big)) < 2**32  # exact in the float64 metadata


@pytest.mark.parametrize("fixed_shift,splits", [(True, 1), (False, 3)],
                         ids=["fixed-shift", "online-max-3-splits"])
def test_row_subset_triton_launchers(fixed_shift, splits):
    """The Triton kernels' row offset (interpreted on CPU, compiled on CUDA) against the
    float64 blocked path: forward lse and both halves' gradient rows."""
    pytest.importorskip("triton")
    from fasthash.ops import contrastive_triton as ct

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 1e-5 if dev == "cpu" else 5e-3  # KERNELS.md: interpreter fp32 / GPU TF32
    bsz, off, n = 40, 7, 13
    za, zb, pos, rc, cc, gl = _lse_inputs(bsz, 24, 3)
    inv_tau = 1 / 0.2
    full = blocked.contrastive_lse_cpu(za, zb, pos, rc, cc, inv_tau)
    gfull = blocked.contrastive_lse_backward_cpu(gl, za, zb, full, rc, cc, inv_tau, 2 * bsz)
    idx = torch.cat([torch.arange(off, off + n), bsz + torch.arange(off, off + n)])
    f = lambda t: t.float().to(dev)  # noqa: E731
    kw = dict(row_offset=off, row_count=n, block_r=16, block_c=16, splits=splits)
    lse = ct.contrastive_lse_forward(f(za), f(zb), f(pos[off:off + n]), rc.to(dev), cc.to(dev),
                                     inv_tau, fixed_shift=fixed_shift, **kw)
    torch.testing.assert_close(lse.double().cpu(), full[idx], rtol=tol, atol=tol)
    for rows in (n, 2 * n):  # the student rows only (a detached teacher), then both halves
        gz = ct.contrastive_lse_backward(f(gl), f(za), f(zb), f(full), rc.to(dev), cc.to(dev),
                                         inv_tau, rows, **kw)
        err = (gz.double().cpu() - gfull[idx[:rows]]).abs().max().item()
        assert gz.shape == (rows, 24) and err <= tol * gfull.abs().max().item(), (rows, err)
