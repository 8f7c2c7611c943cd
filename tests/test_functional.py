"""The CPU path of fasthash.functional (blocked torch, custom ops) equals the float64 references
in values and gradients, never allocates N x N, rejects bad input by name, and its fasthash::
ops pass opcheck and run under torch.compile."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fasthash
from fasthash import env
from fasthash import nn as fnn
from fasthash import reference as ref
from fasthash.ops import blocked, registry


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles much smaller than N, so every path crosses tile and band boundaries."""
    monkeypatch.setattr(blocked, "BLOCK_ROWS", 16)
    monkeypatch.setattr(blocked, "BLOCK_COLS", 24)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _codes(b, length, g, dtype=torch.float64):
    return torch.randn(b, length, generator=g, dtype=dtype)


def _brcd_inputs(bsz, length, g, n_table=4):
    s = _codes(bsz, length, g)
    t = _codes(bsz, length, g).sign()
    t2 = _codes(bsz, length, g).sign()
    table = (torch.rand(n_table, length, generator=g) > 0.4).double()
    table[0] = 0  # an empty mask row
    c = torch.randint(0, n_table, (bsz,), generator=g)
    ca = torch.where(torch.rand(bsz, generator=g) < 0.3,
                     torch.randint(0, n_table, (bsz,), generator=g), c)
    return s, t, t2, table, c, ca


# --------------------------------------------------------------------------- exactness (float64)


@pytest.mark.parametrize("bsz,length,tau,alpha,with_clusters", [
    pytest.param(1, 8, 0.3, 0.8, False, id="B1-L8"),
    pytest.param(33, 13, 0.05, 0.8, True, id="B33-L13-tau.05"),
    pytest.param(100, 64, 1.0, 0.0, True, id="B100-L64-a0"),
    pytest.param(57, 100, 0.3, 1.0, False, id="B57-L100-a1"),
])
def test_brcd_float64_matches_reference(small_blocks, bsz, length, tau, alpha, with_clusters):
    s, t, t2, table, c, ca = _brcd_inputs(bsz, length, _gen(bsz))
    kw = dict(alpha=alpha, temperature=tau)
    if with_clusters:
        kw.update(mask_table=table, cluster_ids=c, aug_cluster_ids=ca)
    s1 = s.clone().requires_grad_()
    want = ref.brcd_loss_ref(s1, t, t2, **kw)
    (g_want,) = torch.autograd.grad(want * 2.5, s1)
    s2 = s.clone().requires_grad_()
    got = fasthash.brcd_contrastive_loss(s2, t, t2, **kw)
    assert got.dtype == torch.float64
    (g,) = torch.autograd.grad(got * 2.5, s2)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-10 * g_want.abs().max().item())


def test_nt_xent_float64_matches_reference(small_blocks):
    g = _gen(1)
    z1, z2 = _codes(45, 48, g).requires_grad_(), _codes(45, 48, g).requires_grad_()
    want = ref.nt_xent_ref(z1, z2, 0.3)
    gw = torch.autograd.grad(want, (z1, z2))
    got = fasthash.nt_xent_loss(z1, z2, 0.3)
    gg = torch.autograd.grad(got, (z1, z2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradcheck_tiny(small_blocks):
    g = _gen(2)
    s, t, t2, table, c, ca = _brcd_inputs(5, 8, g, n_table=3)
    s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: fasthash.brcd_contrastive_loss(s, t, t2, mask_table=table, cluster_ids=c,
                                                 aug_cluster_ids=ca, reduction="none"), (s,))
    z1, z2 = _codes(4, 8, g).requires_grad_(), _codes(4, 8, g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fasthash.nt_xent_loss(a, b, 0.5), (z1, z2))
    x, y = _codes(3, 8, g).requires_grad_(), _codes(4, 8, g).requires_grad_()
    mx = (torch.rand(3, 8, generator=g) > 0.5).double()
    ids = torch.tensor([0, 1, 2, 1])
    for norm in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, y, norm=norm: fasthash.masked_hamming_similarity(
                x, y, mx, (table, ids), normalize=norm), (x, y))


@pytest.mark.parametrize("n,m,length", [(1, 7, 8), (33, 100, 13), (257, 33, 128)])
def test_masked_similarity_matches_reference(n, m, length):
    g = _gen(n + m)
    x, y = _codes(n, length, g), _codes(m, length, g)
    mx = (torch.rand(n, length, generator=g) > 0.5).double()
    mx[0] = 0  # all-zero row -> similarity 0, zero gradient
    table = (torch.rand(3, length, generator=g) > 0.5).double()
    table[2] = 0
    table[2, 1] = 1  # one active bit
    ids = torch.randint(0, 3, (m,), generator=g)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = ref.masked_similarity_ref(xr, yr, mx, table[ids])
    go = torch.randn(n, m, generator=g, dtype=torch.float64)
    gw = torch.autograd.grad(want, (xr, yr), go)
    xf, yf = x.float().requires_grad_(), y.float().T.contiguous().T.requires_grad_()
    got = fasthash.masked_hamming_similarity(xf, yf, mx.bool(), (table.float(), ids))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    gx, gy = torch.autograd.grad(got, (xf, yf), go.float())
    for a, b in zip((gx, gy), gw, strict=True):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()
    assert (gx[mx == 0] == 0).all() and (gy[table[ids] == 0] == 0).all()
    assert (got[0] == 0).all()


def test_masked_similarity_pm1_is_hamming():
    """On ±1 codes the unmasked similarity is 1 - 2 hamming / L (the defining identity)."""
    g = _gen(3)
    x, y = _codes(9, 40, g, torch.float32).sign(), _codes(11, 40, g, torch.float32).sign()
    ham = (x[:, None, :] != y[None, :, :]).sum(-1).float()
    torch.testing.assert_close(fasthash.masked_hamming_similarity(x, y), 1 - 2 * ham / 40)
    raw = fasthash.masked_hamming_similarity(x, y, normalize=False)
    torch.testing.assert_close(raw, 40 - 2 * ham)


# --------------------------------------------------------------------------- fp32 CPU path


@pytest.mark.parametrize("tau,onehot", [(0.01, True), (0.3, True), (0.3, False)],
                         ids=["online-max", "fixed-shift-onehot", "fixed-shift-compare"])
def test_fp32_lse_variants(monkeypatch, tau, onehot):
    """Online max (small tau), fixed shift with the clusters folded into the matmul, and fixed
    shift with explicit compares (many distinct clusters)."""
    if not onehot:
        monkeypatch.setattr(blocked, "_MAX_ONEHOT", 1)
    g = _gen(4)
    s, t, t2, table, c, ca = _brcd_inputs(300, 64, g)
    kw = dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca, temperature=tau)
    s1 = s.clone().requires_grad_()
    want = ref.brcd_loss_ref(s1, t, t2, **kw)
    (gw,) = torch.autograd.grad(want, s1)
    s2 = s.float().requires_grad_()
    got = fasthash.brcd_contrastive_loss(s2, t.float(), t2.float(), **kw)
    (gg,) = torch.autograd.grad(got, s2)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert (gg.double() - gw).abs().max() <= 1e-5 * gw.abs().max()


def test_reductions_and_half_inputs():
    g = _gen(5)
    s, t, t2, table, c, ca = _brcd_inputs(20, 16, g)
    kw = dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca)
    rows = fasthash.brcd_contrastive_loss(s, t, t2, reduction="none", **kw)
    assert rows.shape == (40,)
    torch.testing.assert_close(rows.mean(), fasthash.brcd_contrastive_loss(s, t, t2, **kw))
    torch.testing.assert_close(rows.sum(), fasthash.brcd_contrastive_loss(s, t, t2, reduction="sum",
                                                                           **kw))
    sb = s.bfloat16().requires_grad_()
    lb = fasthash.brcd_contrastive_loss(sb, t.bfloat16(), t2.bfloat16(), **kw)
    assert lb.dtype == torch.float32
    lb.backward()
    assert sb.grad.dtype == torch.bfloat16
    want = ref.brcd_loss_ref(sb.detach().double(), t, t2, **kw)
    torch.testing.assert_close(lb.double(), want, rtol=1e-5, atol=1e-5)


def test_teacher_detached_by_default():
    g = _gen(6)
    s = _codes(8, 16, g).requires_grad_()
    t, t2 = _codes(8, 16, g).requires_grad_(), _codes(8, 16, g).requires_grad_()
    fasthash.brcd_contrastive_loss(s, t, t2).backward()
    assert s.grad is not None and t.grad is None and t2.grad is None
    fasthash.brcd_contrastive_loss(s, t, t2, detach_teacher=False).backward()
    assert t.grad is not None and t2.grad is not None and (t2.grad != 0).any()


def test_never_materialises_n_squared(monkeypatch):
    """No op in forward + backward produces a tensor with >= N^2 / 8 elements (N = 2B)."""
    monkeypatch.setattr(blocked, "BLOCK_ROWS", 64)
    monkeypatch.setattr(blocked, "BLOCK_COLS", 128)
    g = _gen(7)
    s, t, t2, table, c, ca = _brcd_inputs(512, 32, g)
    s = s.float().requires_grad_()

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, o.numel())
            return out

    with Largest():
        loss = fasthash.brcd_contrastive_loss(s, t.float(), t2.float(), mask_table=table.float(),
                                              cluster_ids=c, aug_cluster_ids=ca)
        loss.backward()
    n = 2 * 512
    assert 64 * 128 <= Largest.biggest < n * n // 8


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    g = _gen(8)
    s, t, t2, table, c, ca = _brcd_inputs(6, 10, g)
    nan = s.clone()
    nan[1, 2] = float("nan")
    inf = s.clone()
    inf[0, 0] = float("inf")
    brcd = fasthash.brcd_contrastive_loss
    sim = fasthash.masked_hamming_similarity
    return [
        ("student-shape", lambda: brcd(s[:, :5], t, t2), "teacher_same"),
        ("teacher-rows", lambda: brcd(s, t[:4], t2), "teacher_same"),
        ("int-codes", lambda: brcd(s.long(), t, t2), "student"),
        ("nan", lambda: brcd(nan, t, t2), "student"),
        ("inf", lambda: brcd(s, t, inf), "teacher_other"),
        ("tau0", lambda: brcd(s, t, t2, temperature=0.0), "temperature"),
        ("tau-neg", lambda: fasthash.nt_xent_loss(s, t, -1.0), "temperature"),
        ("alpha", lambda: brcd(s, t, t2, alpha=1.5), "alpha"),
        ("ids-range", lambda: brcd(s, t, t2, mask_table=table, cluster_ids=c + 4), "cluster_ids"),
        ("aug-range", lambda: brcd(s, t, t2, mask_table=table, cluster_ids=c,
                                   aug_cluster_ids=ca - 9), "aug_cluster_ids"),
        ("aug-alone", lambda: brcd(s, t, t2, aug_cluster_ids=ca), "aug_cluster_ids"),
        ("mask-len", lambda: brcd(s, t, t2, mask_table=table[:, :7], cluster_ids=c),
         "mask_table"),
        ("mask-values", lambda: brcd(s, t, t2, mask_table=table * 2, cluster_ids=c),
         "mask_table"),
        ("table-no-ids", lambda: brcd(s, t, t2, mask_table=table), "cluster_ids"),
        ("reduction", lambda: brcd(s, t, t2, reduction="avg"), "reduction"),
        ("nt-rows", lambda: fasthash.nt_xent_loss(s, t[:3]), "z2"),
        ("sim-length", lambda: sim(s, t[:, :4]), "y"),
        ("sim-int", lambda: sim(s.int(), t), "x"),
        ("sim-mask-len", lambda: sim(s, t, mask_x=torch.ones(6, 9)), "mask_x"),
        ("sim-mask-rows", lambda: sim(s, t, mask_y=torch.ones(5, 10)), "mask_y"),
        ("sim-ids-range", lambda: sim(s, t, (table, c + 4)), "mask_x"),
        ("sim-ids-shape", lambda: sim(s, t, None, (table, c[:3])), "mask_y"),
        ("sim-tuple", lambda: sim(s, t, (table,)), "mask_x"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_bad_input_names_the_argument(case):
    _, fn, name = case
    with pytest.raises((ValueError, TypeError), match=name):
        fn()


# --------------------------------------------------------------------------- registration


def test_opcheck():
    g = _gen(9)
    za = blocked.normalize_rows(torch.randn(6, 12, generator=g)).requires_grad_()
    zb = blocked.normalize_rows(torch.randn(6, 12, generator=g)).requires_grad_()
    pos = torch.randn(6, generator=g).requires_grad_()
    c = torch.randint(0, 3, (12,), generator=g)
    torch.library.opcheck(registry.contrastive_lse, (za, zb, pos, c, c.flip(0), 3.0))
    lse = registry.contrastive_lse(za, zb, pos, None, None, 2.0).detach()
    torch.library.opcheck(registry.contrastive_lse_backward,
                          (torch.randn(12, generator=g), za.detach(), zb.detach(), lse, None,
                           None, 2.0, 6))
    x = torch.randn(5, 12, generator=g, requires_grad=True)
    y = torch.randn(7, 12, generator=g, requires_grad=True)
    table = (torch.rand(3, 12, generator=g) > 0.5).float()
    ids = torch.randint(0, 3, (7,), generator=g)
    torch.library.opcheck(registry.masked_similarity, (x, y, table[:1].expand(5, 12).contiguous(),
                                                       None, table, ids, True))
    torch.library.opcheck(registry.masked_similarity_grad,
                          (torch.randn(5, 7, generator=g), x.detach(), y.detach(), None, None,
                           table, ids, True))


def test_torch_compile_fullgraph():
    """The ops trace into one graph (fake kernels, autograd formula) and compile (aot_eager:
    dynamo + AOTAutograd with the registered backward; inductor codegen is exercised in the
    benchmark script, it takes ~45 s to warm up on this machine)."""
    g = _gen(10)

    def f(a, b, x, y):
        za, zb = blocked.normalize_rows(a), blocked.normalize_rows(b)
        pos = (za * zb).sum(1) * 3.0
        lse = registry.contrastive_lse(za, zb, pos, None, None, 3.0)
        sim = registry.masked_similarity(x, y, None, None, None, None, True)
        return (lse - torch.cat([pos, pos])).mean() + sim.square().sum()

    args = [torch.randn(9, 16, generator=g, requires_grad=True) for _ in range(4)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    want = f(*args)
    gw = torch.autograd.grad(want, args)
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, gw, strict=True):
        torch.testing.assert_close(a, b)


def test_modules():
    g = _gen(11)
    s, t, t2, table, c, ca = _brcd_inputs(10, 16, g)
    loss = fnn.BRCDContrastiveLoss(alpha=0.5, temperature=0.2)
    torch.testing.assert_close(
        loss(s, t, t2, table, c, ca),
        fasthash.brcd_contrastive_loss(s, t, t2, mask_table=table, cluster_ids=c,
                                       aug_cluster_ids=ca, alpha=0.5, temperature=0.2))
    torch.testing.assert_close(fnn.NTXentLoss(0.5)(s, t), fasthash.nt_xent_loss(s, t, 0.5))
    sim = fnn.MaskedHammingSimilarity(normalize=False)
    torch.testing.assert_close(sim(s, t), s @ t.T)
    assert "alpha=0.5" in repr(loss)


def test_import_does_not_load_triton():
    """Importing never loads triton; a CPU call never loads our kernel modules (torch itself
    imports triton inside custom-op dispatch via torch._dynamo, which we cannot prevent)."""
    code = ("import sys, fasthash, fasthash.functional, fasthash.nn, fasthash.ops; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; fasthash.nt_xent_loss(torch.randn(3, 8), torch.randn(3, 8)); "
            "assert not [m for m in sys.modules "
            "            if m.startswith('fasthash.ops.') and m.endswith('_triton')]")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --------------------------------------------------------------------------- packed distances


@pytest.mark.parametrize("w", [1, 2])
def test_hamming_distance_cpu(w):
    g = _gen(12 + w)
    q = torch.randint(-(2**62), 2**62, (7, w), generator=g)
    x = torch.randint(-(2**62), 2**62, (33, w), generator=g)
    d = fasthash.hamming_distance(q, x)
    assert d.dtype == torch.int32
    assert torch.equal(d.long(), ref.hamming_distance_ref(q, x))
    dn = fasthash.hamming_distance(q.numpy().view(np.uint64), x.numpy().view(np.uint64))
    assert torch.equal(dn, d)
    m = torch.randint(-(2**62), 2**62, (w,), generator=g)
    assert torch.equal(fasthash.hamming_distance(q, x, m).long(),
                       ref.hamming_distance_ref(q, x, m))
    with pytest.raises(ValueError, match="y_words"):
        fasthash.hamming_distance(q, x[:, :0])
    with pytest.raises(ValueError, match="mask"):
        fasthash.hamming_distance(q, x, torch.zeros(3, w, dtype=torch.int64))


class _FakeC:
    """A stand-in for fasthash._C recording how hamming_distances is called."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def hamming_distances(self, q, x, *args, **kwargs):
        self.calls.append(sorted(kwargs))
        return self.real.hamming_distances(q, x, *args, **kwargs)


def _masked_case(w=2):
    g = _gen(20 + w)
    q = torch.randint(-(2**62), 2**62, (5, w), generator=g)
    x = torch.randint(-(2**62), 2**62, (40, w), generator=g)
    per_query = torch.randint(-(2**62), 2**62, (5, w), generator=g)
    return q, x, [per_query[0], per_query[:1], per_query]


def test_masked_hamming_distance_runs_the_compiled_core(monkeypatch):
    """A mask no longer sends the CPU path to the reference: _C gets the mask and the threads."""
    if not fasthash.HAS_C:
        pytest.skip("needs fasthash._C")
    fake = _FakeC(fasthash._C)
    monkeypatch.setattr(fasthash, "_C", fake)
    monkeypatch.setattr(env, "_WARNED", set())
    q, x, masks = _masked_case()
    for m in masks:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            d = fasthash.hamming_distance(q, x, m, num_threads=2)
        assert d.dtype == torch.int32
        assert torch.equal(d.long(), ref.hamming_distance_ref(q, x, m))
    assert fake.calls[-1] == ["mask", "num_threads"]
    empty = fasthash.hamming_distance(q, x[:0], masks[0])
    assert empty.shape == (5, 0) and empty.dtype == torch.int32
    with pytest.raises(ValueError, match="num_threads"):
        fasthash.hamming_distance(q, x, num_threads=0)


def test_masked_hamming_distance_fallback_warns_once(monkeypatch):
    q, x, masks = _masked_case()
    monkeypatch.setattr(env, "_WARNED", set())
    monkeypatch.setattr(fasthash, "HAS_C", False)
    monkeypatch.setattr(fasthash, "_C", None)
    with pytest.warns(RuntimeWarning, match="not built"):
        d = fasthash.hamming_distance(q, x, masks[2])
    assert torch.equal(d.long(), ref.hamming_distance_ref(q, x, masks[2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        for m in masks:
            got = fasthash.hamming_distance(q, x, m)
            assert torch.equal(got.long(), ref.hamming_distance_ref(q, x, m))


# --------------------------------------------------------------------------- argument kinds


def _meta(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda s: fasthash.masked_hamming_similarity(_meta(2, 10), s), "x",
                     id="sim-x"),
        pytest.param(lambda s: fasthash.masked_hamming_similarity(s, _meta(2, 10)), "y",
                     id="sim-y"),
        pytest.param(lambda s: fasthash.masked_hamming_similarity(s, s, _meta(6, 10)), "mask_x",
                     id="sim-mask"),
        pytest.param(lambda s: fasthash.nt_xent_loss(_meta(6, 10), s), "z1", id="nt-xent"),
        pytest.param(lambda s: fasthash.brcd_contrastive_loss(_meta(6, 10), s, s), "student",
                     id="brcd-student"),
        pytest.param(lambda s: fasthash.brcd_contrastive_loss(
            s, s, s, mask_table=_meta(1, 10)), "mask_table", id="brcd-table"),
        pytest.param(lambda s: fasthash.brcd_contrastive_loss(
            s, s, s, mask_table=torch.ones(2, 10),
            cluster_ids=_meta(6, dtype=torch.int64)), "cluster_ids", id="brcd-ids"),
        pytest.param(lambda s: fasthash.hamming_distance(_meta(2, 1, dtype=torch.int64),
                                                         _meta(3, 1, dtype=torch.int64)),
                     "x_words", id="distance"),
    ],
)
def test_meta_tensors_are_refused_by_name(call, match):
    s = torch.ones(6, 10)
    want = f"^{match} must be on the CPU or a CUDA device, got meta$"
    with pytest.raises(ValueError, match=want):
        call(s)


def test_hamming_distance_mask_of_the_wrong_kind_names_mask():
    q = np.zeros((2, 1), np.uint64)
    for mask in ([1], (1,), [np.ones(1, np.uint64)]):
        with pytest.raises(TypeError, match=r"^mask must be a numpy array or torch tensor, got "):
            fasthash.hamming_distance(q, q, mask=mask)
        with pytest.raises(TypeError, match=r"^mask must be a numpy array or torch tensor, got "):
            fasthash.hamming_distance(torch.from_numpy(q.view(np.int64)), q.view(np.int64),
                                      mask=mask)


def test_numpy_scalars_for_temperature_and_alpha():
    g = _gen(3)
    s, t, t2, table, c, ca = _brcd_inputs(6, 10, g)
    kw = dict(mask_table=table, cluster_ids=c, aug_cluster_ids=ca)
    want = fasthash.brcd_contrastive_loss(s, t, t2, alpha=0.5, temperature=0.25, **kw)
    for a, tau in ((np.float32(0.5), np.float32(0.25)), (np.float64(0.5), np.float16(0.25)),
                   (0.5, np.float32(0.25))):
        got = fasthash.brcd_contrastive_loss(s, t, t2, alpha=a, temperature=tau, **kw)
        assert torch.equal(got, want)
    assert torch.equal(fasthash.nt_xent_loss(s, t, np.float32(0.25)),
                       fasthash.nt_xent_loss(s, t, 0.25))
    for bad in (np.bool_(True), True, np.float32("nan"), np.float64("inf"), np.float32(0)):
        with pytest.raises(ValueError, match="^temperature must be a finite number > 0"):
            fasthash.nt_xent_loss(s, t, bad)
    for bad in (np.bool_(False), np.float32("nan"), np.float32(1.5)):
        with pytest.raises(ValueError, match=r"^alpha must be a number in \[0, 1\]"):
            fasthash.brcd_contrastive_loss(s, t, t2, alpha=bad)


def test_a_temperature_whose_inverse_overflows_float32_is_refused():
    """1 / 1e-300 is no float32: the blocked path crashed building its shift; the bound is the
    smallest normal float32, 2**-126, where 1 / tau (and log2(e) / tau) are still finite."""
    s, t = torch.randn(4, 8, generator=_gen(5)), torch.randn(4, 8, generator=_gen(6))
    for bad in (1e-300, 2.0**-127, np.float64(1e-39)):
        with pytest.raises(ValueError, match=r"^temperature must be .*2\*\*-126 .*float32"):
            fasthash.nt_xent_loss(s, t, bad)
        with pytest.raises(ValueError, match=r"^temperature must be .*2\*\*-126"):
            fasthash.brcd_contrastive_loss(s, t, t, temperature=bad)
    rows = fasthash.nt_xent_loss(s, t, 2.0**-126, reduction="none")  # accepted: |rows| < 2**128
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    assert torch.isfinite(fasthash.nt_xent_loss(s.double(), t.double(), 2.0**-126))
