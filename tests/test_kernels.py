"""The Triton kernels (interpreted on CPU, compiled on CUDA) match the float64 references in
values and gradients: masked similarity, fused BRCD / NT-Xent losses, packed distances, top-k."""

import pytest
import torch

pytest.importorskip("triton")

import fasthash  # noqa: E402
from fasthash import reference as ref  # noqa: E402
from fasthash.ops import blocked  # noqa: E402
from fasthash.ops import contrastive_triton as ct  # noqa: E402
from fasthash.ops import hamming_topk_triton as ht  # noqa: E402
from fasthash.ops import masked_similarity_triton as mt  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter: full fp32 dots; GPU: TF32 dots (KERNELS.md tolerances, measured at tau = 0.3;
# a TF32 error in a similarity is amplified by 1/tau in the logits, so they scale with 0.3/tau)
LOSS_RTOL = 1e-5 if DEV == "cpu" else 1e-3
GRAD_TOL = 1e-5 if DEV == "cpu" else 5e-3


def _tau_scale(tau):
    return 1.0 if DEV == "cpu" else max(1.0, 0.3 / tau)


@pytest.fixture
def triton_route(monkeypatch):
    """Route the fasthash:: ops' CPU implementations to the Triton launchers (the interpreter
    runs them on CPU tensors), so the public API is tested end to end through the kernels."""
    if DEV == "cpu":
        monkeypatch.setattr(blocked, "masked_similarity_cpu", mt.masked_similarity_forward)
        monkeypatch.setattr(blocked, "masked_similarity_grad_cpu", mt.masked_similarity_backward)
        monkeypatch.setattr(blocked, "contrastive_lse_cpu", ct.contrastive_lse_forward)
        monkeypatch.setattr(blocked, "contrastive_lse_backward_cpu", ct.contrastive_lse_backward)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_grad(got, want, name, factor=1.0):
    scale = want.abs().max().item()
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    tol = GRAD_TOL * factor * max(scale, 1e-12)
    assert err <= tol, f"{name}: max err {err:.3g}, max|g| {scale:.3g}"


def _noncontig(t):
    """The same values with a row stride of 2 L (a view into a wider buffer)."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    return wide[:, ::2]


# --------------------------------------------------------------------------- masked similarity

SIM_CASES = [
    # (N, M, L, mask_x, mask_y, normalize, non-contiguous)
    pytest.param(1, 7, 8, None, None, True, False, id="N1-M7-L8-nomask"),
    pytest.param(7, 33, 13, "dense", "dense", True, False, id="N7-M33-L13-dense"),
    pytest.param(33, 100, 48, "table", "edge", True, False, id="N33-M100-L48-table-edge"),
    pytest.param(100, 257, 64, None, None, False, False, id="N100-M257-L64-raw"),
    pytest.param(257, 1, 100, "edge", "table", True, True, id="N257-M1-L100-noncontig"),
    pytest.param(33, 33, 128, "dense", None, False, True, id="N33-M33-L128-raw-noncontig"),
]


def _mask(kind, rows, length, g):
    if kind is None:
        return None, None
    if kind == "dense":
        return (torch.rand(rows, length, generator=g) > 0.4).float(), None
    if kind == "edge":  # all-ones, all-zero and one-active-bit rows
        m = (torch.rand(rows, length, generator=g) > 0.5).float()
        m[0] = 1
        if rows > 1:
            m[1] = 0
        if rows > 2:
            m[2] = 0
            m[2, length // 2] = 1
        return m, None
    table = (torch.rand(4, length, generator=g) > 0.5).float()
    table[3] = 0
    return table, torch.randint(0, 4, (rows,), generator=g)


@pytest.mark.parametrize("n,m,length,kx,ky,normalize,noncontig", SIM_CASES)
def test_masked_similarity(triton_route, n, m, length, kx, ky, normalize, noncontig):
    g = _gen(n * 1000 + m)
    x = torch.randn(n, length, generator=g, dtype=torch.float64)
    y = torch.randn(m, length, generator=g, dtype=torch.float64)
    mx, ix = _mask(kx, n, length, g)
    my, iy = _mask(ky, m, length, g)
    dx_ = mx if ix is None else (None if mx is None else mx[ix])
    dy_ = my if iy is None else (None if my is None else my[iy])
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = ref.masked_similarity_ref(xr, yr, dx_, dy_) if normalize else (
        (xr if dx_ is None else xr * dx_) @ (yr if dy_ is None else yr * dy_).T)
    go = torch.randn(n, m, generator=g, dtype=torch.float64)
    gx_want, gy_want = torch.autograd.grad(want, (xr, yr), go)

    xf, yf = x.float().to(DEV), y.float().to(DEV)
    if noncontig:
        xf = _noncontig(xf)
    xf.requires_grad_()
    yf.requires_grad_()
    arg = lambda t, i: None if t is None else (t.to(DEV) if i is None else (t.to(DEV), i.to(DEV)))
    got = fasthash.masked_hamming_similarity(xf, yf, arg(mx, ix), arg(my, iy), normalize=normalize)
    assert got.dtype == torch.float32 and got.shape == (n, m)
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=LOSS_RTOL,
                               atol=LOSS_RTOL * scale)
    gx, gy = torch.autograd.grad(got, (xf, yf), go.float().to(DEV))
    _assert_grad(gx, gx_want, "dx")
    _assert_grad(gy, gy_want, "dy")
    if dx_ is not None:  # masked bits get exactly zero gradient
        assert (gx.cpu()[dx_ == 0] == 0).all()


def test_masked_similarity_l_loop_and_bf16():
    """Forward walks L in chunks (block_l < L); bf16 codes are upcast after the load."""
    g = _gen(5)
    x = torch.randn(20, 100, generator=g).to(DEV)
    y = torch.randn(17, 100, generator=g).to(DEV)
    want = ref.masked_similarity_ref(x.double().cpu(), y.double().cpu())
    got = mt.masked_similarity_forward(x, y, None, None, None, None, True, block_n=16,
                                       block_m=16, block_l=32)
    torch.testing.assert_close(got.double().cpu(), want, rtol=LOSS_RTOL, atol=LOSS_RTOL)
    xb, yb = x.bfloat16(), y.bfloat16()
    want_b = ref.masked_similarity_ref(xb.double().cpu(), yb.double().cpu())
    got_b = mt.masked_similarity_forward(xb, yb, None, None, None, None, True)
    torch.testing.assert_close(got_b.double().cpu(), want_b, rtol=LOSS_RTOL, atol=LOSS_RTOL)


# --------------------------------------------------------------------------- fused losses

LOSS_CASES = [
    # (B, L, masks, clusters, tau, alpha, reduction, non-contiguous)
    pytest.param(1, 8, None, None, 0.3, 0.8, "mean", False, id="B1-L8"),
    pytest.param(7, 13, "table", "fn+offset", 0.05, 0.8, "mean", False, id="B7-L13-fn-tau.05"),
    pytest.param(33, 48, "one-row", None, 1.0, 0.0, "sum", True, id="B33-L48-onerow-a0"),
    pytest.param(100, 64, "table", "no-fn", 0.3, 1.0, "none", False, id="B100-L64-nofn-a1"),
    pytest.param(33, 128, "edge", "fn", 0.3, 0.8, "none", True, id="B33-L128-edge-masks"),
    pytest.param(257, 100, "table", "fn+offset", 0.3, 0.8, "mean", False, id="B257-L100"),
]


def _clusters(kind, bsz, n_table, g):
    if kind is None:
        return None, None
    if kind == "no-fn":  # every sample its own cluster: no false negatives
        c = torch.randperm(bsz, generator=g) % n_table
        return c, c
    c = torch.randint(0, n_table, (bsz,), generator=g)
    if kind == "fn":
        return c, None
    ca = torch.where(torch.rand(bsz, generator=g) < 0.3,
                     torch.randint(0, n_table, (bsz,), generator=g), c)
    return c, ca


@pytest.mark.parametrize("bsz,length,masks,clusters,tau,alpha,reduction,noncontig", LOSS_CASES)
def test_brcd_loss(triton_route, bsz, length, masks, clusters, tau, alpha, reduction, noncontig):
    g = _gen(bsz * 10 + length)
    s = torch.randn(bsz, length, generator=g, dtype=torch.float64)
    t = torch.randn(bsz, length, generator=g, dtype=torch.float64).sign()
    t2 = torch.randn(bsz, length, generator=g, dtype=torch.float64).sign()
    n_table = bsz if clusters == "no-fn" else 5
    table = None
    if masks == "one-row":
        table = (torch.rand(1, length, generator=g) > 0.3).double()
    elif masks is not None:
        table = (torch.rand(n_table, length, generator=g) > 0.5).double()
        if masks == "edge":
            table[0] = 0
            table[1] = 0
            table[1, 3] = 1
    c, ca = _clusters(clusters, bsz, n_table, g)
    kw = dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca, alpha=alpha, temperature=tau)

    sr = s.clone().requires_grad_()
    if reduction == "none":  # per-row losses: the reference via its mean is not enough
        want_rows = ref.brcd_loss_ref(sr, t, t2, reduction="none", **kw)
        w = torch.rand(2 * bsz, generator=g, dtype=torch.float64)
        (gs_want,) = torch.autograd.grad((want_rows * w).sum(), sr)
        want = want_rows.detach()
    else:
        want = ref.brcd_loss_ref(sr, t, t2, **kw)
        if reduction == "sum":
            want = want * 2 * bsz
        (gs_want,) = torch.autograd.grad(want * 1.7, sr)  # grad_output != 1
        want = want.detach()

    sf = s.float().to(DEV)
    if noncontig:
        sf = _noncontig(sf)
    sf.requires_grad_()
    dev = lambda v: None if v is None else v.to(DEV)
    got = fasthash.brcd_contrastive_loss(
        sf, t.float().to(DEV), t2.float().to(DEV), mask_table=dev(table), cluster_ids=dev(c),
        aug_cluster_ids=dev(ca), alpha=alpha, temperature=tau, reduction=reduction)
    tol = LOSS_RTOL * _tau_scale(tau)
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    if reduction == "none":
        (gs,) = torch.autograd.grad((got * w.float().to(DEV)).sum(), sf)
    else:
        (gs,) = torch.autograd.grad(got * 1.7, sf)
    _assert_grad(gs, gs_want, "d student", _tau_scale(tau))


@pytest.mark.parametrize("bsz,length,tau,noncontig", [
    pytest.param(7, 13, 0.3, False, id="B7-L13"),
    pytest.param(100, 64, 0.05, True, id="B100-L64-tau.05-noncontig"),
])
def test_nt_xent(triton_route, bsz, length, tau, noncontig):
    g = _gen(bsz + length)
    z1 = torch.randn(bsz, length, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(bsz, length, generator=g, dtype=torch.float64, requires_grad=True)
    want = ref.nt_xent_ref(z1, z2, tau)
    g1, g2 = torch.autograd.grad(want * 0.5, (z1, z2))
    a, b = z1.detach().float().to(DEV), z2.detach().float().to(DEV)
    if noncontig:
        a = _noncontig(a)
    a.requires_grad_()
    b.requires_grad_()
    got = fasthash.nt_xent_loss(a, b, tau)
    tol = LOSS_RTOL * _tau_scale(tau)
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=tol, atol=tol)
    ga, gb = torch.autograd.grad(got * 0.5, (a, b))
    _assert_grad(ga, g1, "dz1", _tau_scale(tau))
    _assert_grad(gb, g2, "dz2", _tau_scale(tau))


@pytest.mark.parametrize("fixed_shift", [True, False], ids=["fixed-shift", "online-max"])
@pytest.mark.parametrize("splits", [1, 3])
def test_contrastive_lse_launchers(fixed_shift, splits):
    """Both forward variants and split column loops agree with the float64 blocked path."""
    g = _gen(11)
    bsz, length = 40, 24
    za = blocked.normalize_rows(torch.randn(bsz, length, generator=g, dtype=torch.float64))
    zb = blocked.normalize_rows(torch.randn(bsz, length, generator=g, dtype=torch.float64))
    za[3] = 0  # an empty (fully masked) row
    pos = torch.randn(bsz, generator=g, dtype=torch.float64)
    c = torch.randint(0, 3, (bsz,), generator=g)
    rc, cc = torch.cat([c, c]), torch.cat([c, torch.randint(0, 3, (bsz,), generator=g)])
    gl = torch.randn(2 * bsz, generator=g, dtype=torch.float64)
    inv_tau = 1 / 0.2
    lse_want = blocked.contrastive_lse_cpu(za, zb, pos, rc, cc, inv_tau)
    gz_want = blocked.contrastive_lse_backward_cpu(gl, za, zb, lse_want, rc, cc, inv_tau, bsz)
    f = lambda t: t.float().to(DEV)
    lse = ct.contrastive_lse_forward(f(za), f(zb), f(pos), rc.to(DEV), cc.to(DEV), inv_tau,
                                     block_r=16, block_c=16, splits=splits,
                                     fixed_shift=fixed_shift)
    tol = LOSS_RTOL * _tau_scale(0.2)
    torch.testing.assert_close(lse.double().cpu(), lse_want, rtol=tol, atol=tol)
    gz = ct.contrastive_lse_backward(f(gl), f(za), f(zb), f(lse_want), rc.to(DEV), cc.to(DEV),
                                     inv_tau, bsz, block_r=16, block_c=16, splits=splits)
    _assert_grad(gz, gz_want, "dz", _tau_scale(0.2))
    assert (gz[3].cpu() != 0).any()  # an empty row as a *row* still gets the column terms


# --------------------------------------------------------------------------- packed search


def _words(n, w, g):
    return torch.randint(-(2**62), 2**62, (n, w), generator=g) * 2 + torch.randint(
        0, 2, (n, w), generator=g)


TOPK_CASES = [
    # (Q, N, W, k, mask kind, splits)
    pytest.param(1, 7, 1, 1, None, None, id="Q1-N7-k1"),
    pytest.param(7, 257, 1, 10, None, None, id="Q7-N257-k10"),
    pytest.param(33, 100, 2, 5, "global", 2, id="Q33-N100-W2-global-split2"),
    pytest.param(5, 100, 3, 33, "per-query", None, id="Q5-N100-W3-perquery-k33"),
    pytest.param(3, 33, 1, 33, None, 3, id="Q3-N33-k=N"),
]


@pytest.mark.parametrize("nq,nx,w,k,mask,splits", TOPK_CASES)
def test_hamming_topk(nq, nx, w, k, mask, splits):
    g = _gen(nq * 7 + nx)
    q, x = _words(nq, w, g), _words(nx, w, g)
    x[5 % nx] = x[2 % nx]  # exact duplicate: a tie broken by index
    x[-1] = q[0]  # distance 0
    x[nx // 2] = x[nx // 2] ^ 1  # near-duplicates
    m = None
    if mask == "global":
        m = _words(1, w, g)[0]
    elif mask == "per-query":
        m = _words(nq, w, g)
    d_want, i_want = ref.topk_ref(q, x, k, m)
    d, i = ht.hamming_topk_cuda(q.to(DEV), x.to(DEV), k, None if m is None else m.to(DEV),
                                splits=splits)
    assert d.dtype == torch.int32 and i.dtype == torch.int64
    assert torch.equal(d.cpu(), d_want) and torch.equal(i.cpu(), i_want)
    dist = ht.hamming_distance_forward(q.to(DEV), x.to(DEV), None if m is None else m.to(DEV))
    assert torch.equal(dist.cpu().long(), ref.hamming_distance_ref(q, x, m))


def test_hamming_topk_sort_path_and_ties():
    """The bitonic (GPU default) selection path, and many equal distances ordered by index."""
    g = _gen(3)
    q = _words(9, 2, g)
    x = _words(40, 2, g)
    x[10:30] = x[0]  # 21 identical codes: ties everywhere
    d, i = ht.hamming_topk_cuda(q.to(DEV), x.to(DEV), 16, use_sort=True, block_q=16, block_n=16)
    d_want, i_want = ref.topk_ref(q, x, 16)
    assert torch.equal(d.cpu(), d_want) and torch.equal(i.cpu(), i_want)


def test_hamming_topk_large_k_fallback(monkeypatch):
    """k above the in-kernel limit merges exact distance chunks with torch.topk."""
    monkeypatch.setattr(ht, "_MAX_KP", 16)
    g = _gen(4)
    q, x = _words(4, 1, g), _words(70, 1, g)
    d, i = ht.hamming_topk_cuda(q.to(DEV), x.to(DEV), 40)
    d_want, i_want = ref.topk_ref(q, x, 40)
    assert torch.equal(d.cpu(), d_want) and torch.equal(i.cpu(), i_want)


@pytest.mark.parametrize("bad", ["k0", "kbig", "words", "dtype", "mask"])
def test_hamming_topk_errors(bad):
    g = _gen(5)
    q, x = _words(2, 1, g).to(DEV), _words(5, 1, g).to(DEV)
    args = {"k0": (q, x, 0), "kbig": (q, x, 6), "words": (q, _words(5, 2, g).to(DEV), 1),
            "dtype": (q.int(), x, 1), "mask": (q, x, 1, _words(3, 1, g).to(DEV))}[bad]
    with pytest.raises((ValueError, TypeError), match="k must|words|int64|mask"):
        ht.hamming_topk_cuda(*args)
