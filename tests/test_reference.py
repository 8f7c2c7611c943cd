"""The reference ops equal explicit Python-loop computations of BRCD_SPEC §3-5 on tiny inputs."""

import math

import numpy as np
import pytest
import torch

from fasthash import reference as R
from fasthash.codes import pack_codes


def _pm(rng, n, length):
    return torch.from_numpy(np.where(rng.random((n, length)) > 0.5, 1.0, -1.0))


def _bits(rng, n, length, p=0.6):
    return torch.from_numpy((rng.random((n, length)) < p).astype(np.float64))


# ----------------------------------------------------------------------------- similarity
def _loop_masked_sim(x, y, mx, my):
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)
    for a in range(x.shape[0]):
        for b in range(y.shape[0]):
            num = sum(mx[a, j] * my[b, j] * x[a, j] * y[b, j] for j in range(x.shape[1]))
            na = math.sqrt(sum((mx[a, j] * x[a, j]) ** 2 for j in range(x.shape[1])))
            nb = math.sqrt(sum((my[b, j] * y[b, j]) ** 2 for j in range(x.shape[1])))
            out[a, b] = 0.0 if na == 0 or nb == 0 else num / (na * nb)
    return out


def test_masked_similarity_matches_loop_on_relaxed_codes():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (4, 13)))
    y = torch.from_numpy(rng.uniform(-1, 1, (3, 13)))
    mx, my = _bits(rng, 4, 13), _bits(rng, 3, 13)
    mx[1] = 0  # an empty mask row gives similarity 0
    got = R.masked_similarity_ref(x, y, mx, my)
    torch.testing.assert_close(got, _loop_masked_sim(x, y, mx, my), rtol=1e-12, atol=1e-12)
    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("length", [8, 13, 64, 100], ids=lambda v: f"L{v}")
def test_masked_similarity_equals_packed_hamming_form_on_pm1(length):
    rng = np.random.default_rng(length)
    x, y = _pm(rng, 5, length), _pm(rng, 6, length)
    mx, my = _bits(rng, 5, length), _bits(rng, 6, length)
    got = R.masked_similarity_ref(x, y, mx, my)
    xw, yw = pack_codes(x.numpy()), pack_codes(y.numpy())
    mxw, myw = pack_codes(mx.numpy().astype(np.int64)), pack_codes(my.numpy().astype(np.int64))
    for a in range(5):
        for b in range(6):
            inter = mxw[a] & myw[b]
            pi = int(np.bitwise_count(inter).sum())
            ham = int(np.bitwise_count((xw[a] ^ yw[b]) & inter).sum())
            na, nb = int(np.bitwise_count(mxw[a]).sum()), int(np.bitwise_count(myw[b]).sum())
            want = 0.0 if na * nb == 0 else (pi - 2 * ham) / math.sqrt(na * nb)
            assert got[a, b].item() == pytest.approx(want, abs=1e-12)
    # unmasked: 1 - 2 * hamming / L
    d = R.hamming_distance_ref(xw, yw).double()
    torch.testing.assert_close(R.masked_similarity_ref(x, y), 1 - 2 * d / length)


def test_masked_bits_get_exactly_zero_gradient():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(-1, 1, (3, 10))).requires_grad_()
    y = torch.from_numpy(rng.uniform(-1, 1, (4, 10)))
    mx = _bits(rng, 3, 10)
    R.masked_similarity_ref(x, y, mx, None).sum().backward()
    assert torch.all(x.grad[mx == 0] == 0)
    assert torch.any(x.grad[mx == 1] != 0)


# ----------------------------------------------------------------------------- hamming / search
def _loop_hamming(q, x, m):
    out = np.zeros((q.shape[0], x.shape[0]), dtype=np.int64)
    for i in range(q.shape[0]):
        for j in range(x.shape[0]):
            mi = m if m is None or m.ndim == 1 else m[i]
            for w in range(q.shape[1]):
                v = int(q[i, w]) ^ int(x[j, w])
                if mi is not None:
                    v &= int(mi[w])
                out[i, j] += bin(v).count("1")
    return out


@pytest.mark.parametrize("mask_kind", ["none", "global", "per-query"])
def test_hamming_topk_radius_match_loops(mask_kind):
    rng = np.random.default_rng(7)
    length = 70  # two words, tail bits
    q = pack_codes(rng.random((4, length)) > 0.5)
    x = pack_codes(rng.random((3, length)) > 0.5)
    x = np.concatenate([x, x[:2], x[1:2]])  # duplicated rows -> ties
    mask = {
        "none": None,
        "global": pack_codes(rng.random((1, length)) > 0.3)[0],
        "per-query": pack_codes(rng.random((4, length)) > 0.3),
    }[mask_kind]
    want = _loop_hamming(q, x, mask)
    d = R.hamming_distance_ref(q, x, mask)
    np.testing.assert_array_equal(d.numpy(), want)
    order = np.argsort(want, axis=1, kind="stable")
    for k in (1, 3, x.shape[0]):
        dk, ik = R.topk_ref(q, x, k, mask)
        assert dk.dtype == torch.int32 and ik.dtype == torch.int64
        np.testing.assert_array_equal(ik.numpy(), order[:, :k])
        np.testing.assert_array_equal(dk.numpy(), np.take_along_axis(want, order[:, :k], 1))
    r = int(np.median(want))
    lims, dr, ir = R.radius_ref(q, x, r, mask)
    for i in range(q.shape[0]):
        sel = [j for j in order[i] if want[i, j] <= r]
        np.testing.assert_array_equal(ir[lims[i] : lims[i + 1]].numpy(), sel)
        np.testing.assert_array_equal(dr[lims[i] : lims[i + 1]].numpy(), want[i, sel])


def test_all_zero_mask_gives_zero_distances():
    rng = np.random.default_rng(2)
    q = pack_codes(rng.random((3, 40)) > 0.5)
    x = pack_codes(rng.random((5, 40)) > 0.5)
    assert R.hamming_distance_ref(q, x, np.zeros(1, dtype=np.uint64)).sum() == 0


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda q, x: R.topk_ref(q, x, 0), "k must", id="k0"),
        pytest.param(lambda q, x: R.topk_ref(q, x, 6), "k must", id="k-gt-n"),
        pytest.param(lambda q, x: R.radius_ref(q, x, -1), "r must", id="neg-radius"),
        pytest.param(lambda q, x: R.hamming_distance_ref(q, x[:0]), "at least one", id="empty"),
        pytest.param(
            lambda q, x: R.hamming_distance_ref(q, np.zeros((5, 2), np.uint64)),
            "same number of words",
            id="bits-mismatch",
        ),
        pytest.param(
            lambda q, x: R.hamming_distance_ref(q, x, np.zeros((2, 1), np.uint64)),
            "mask must be one mask",
            id="mask-rows",
        ),
        pytest.param(
            lambda q, x: R.hamming_distance_ref(q, x, np.zeros(2, np.uint64)),
            "mask must have 1 words",
            id="mask-len",
        ),
    ],
)
def test_search_refs_reject_bad_input(call, match):
    rng = np.random.default_rng(0)
    q = pack_codes(rng.random((3, 40)) > 0.5)
    x = pack_codes(rng.random((5, 40)) > 0.5)
    with pytest.raises(ValueError, match=match):
        call(q, x)


def test_search_refs_reject_wrong_dtype():
    with pytest.raises(TypeError, match="queries"):
        R.hamming_distance_ref(np.zeros((2, 1), np.float32), np.zeros((2, 1), np.uint64))


# ----------------------------------------------------------------------------- losses
def _loop_nt_xent(z1, z2, tau):
    z = torch.cat([z1, z2]).tolist()
    n, b = len(z), len(z1)

    def cos(u, v):
        nu = math.sqrt(sum(a * a for a in u))
        nv = math.sqrt(sum(a * a for a in v))
        return sum(a * c for a, c in zip(u, v, strict=True)) / (nu * nv)

    total = 0.0
    for a in range(n):
        p = (a + b) % n
        denom = sum(math.exp(cos(z[a], z[c]) / tau) for c in range(n) if c != a)
        total += -cos(z[a], z[p]) / tau + math.log(denom)
    return total / n


def test_nt_xent_matches_loop():
    rng = np.random.default_rng(4)
    z1 = torch.from_numpy(rng.normal(size=(3, 6)))
    z2 = torch.from_numpy(rng.normal(size=(3, 6)))
    assert R.nt_xent_ref(z1, z2, 0.3).item() == pytest.approx(_loop_nt_xent(z1, z2, 0.3), 1e-12)


def test_bernoulli_kl_matches_loop_and_stops_gradient():
    rng = np.random.default_rng(5)
    p1 = torch.from_numpy(rng.uniform(0.05, 0.95, (3, 4))).requires_grad_()
    p2 = torch.from_numpy(rng.uniform(0.05, 0.95, (3, 4))).requires_grad_()

    def kl(p, q):
        return sum(
            sum(
                p[i][j] * math.log(p[i][j] / q[i][j])
                + (1 - p[i][j]) * math.log((1 - p[i][j]) / (1 - q[i][j]))
                for j in range(len(p[0]))
            )
            for i in range(len(p))
        ) / len(p)

    a, b = p1.tolist(), p2.tolist()
    got = R.bernoulli_kl_ref(p1, p2)
    assert got.item() == pytest.approx(0.5 * (kl(a, b) + kl(b, a)), rel=1e-9)
    got.backward()
    # each term differentiates only its first argument: d/dp1 of 0.5 * KL(p1 || sg p2)
    g1 = 0.5 * (torch.log(p1 / p2) - torch.log((1 - p1) / (1 - p2))) / 3
    torch.testing.assert_close(p1.grad, g1.detach())


def _loop_brcd(s, t, t2, table, c, c_aug, alpha, tau, per_row=False):
    """BRCD_SPEC §3-5 written out per row and per column (the mean, or the 2B row losses)."""
    bsz, length = s.shape
    ones = [1.0] * length
    m = [table[c[k]].tolist() if table is not None else ones for k in range(bsz)]
    z = [[m[k][j] * s[k, j].item() for j in range(length)] for k in range(bsz)]
    z += [[m[k][j] * t2[k, j].item() for j in range(length)] for k in range(bsz)]
    rows_m = m + m

    def sim(u, v, mu, mv):
        num = sum(mu[j] * mv[j] * u[j] * v[j] for j in range(length))
        nu = math.sqrt(sum((mu[j] * u[j]) ** 2 for j in range(length)))
        nv = math.sqrt(sum((mv[j] * v[j]) ** 2 for j in range(length)))
        return 0.0 if nu == 0 or nv == 0 else num / (nu * nv)

    def cos(u, v):
        return sim(u, v, ones, ones)

    pos = []
    for k in range(bsz):
        a_k = 1.0 if (c is not None and c_aug[k] != c[k]) else alpha
        ind = cos(s[k].tolist(), t[k].tolist()) / tau
        struct = sim(z[k], z[bsz + k], rows_m[k], rows_m[bsz + k]) / tau
        pos.append(a_k * ind + (1 - a_k) * struct)
    rows = []
    for a in range(2 * bsz):
        k = a % bsz
        terms = [pos[k]]
        for b in range(2 * bsz):
            if b == a or b == (a + bsz) % (2 * bsz):
                continue
            if c is not None:
                col_c = c[b] if b < bsz else c_aug[b - bsz]
                if col_c == c[k]:
                    continue
            terms.append(sim(z[a], z[b], rows_m[a], rows_m[b]) / tau)
        mx = max(terms)
        rows.append(-pos[k] + mx + math.log(sum(math.exp(v - mx) for v in terms)))
    return rows if per_row else sum(rows) / (2 * bsz)


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("relaxed", [False, True], ids=["pm1", "relaxed"])
def test_brcd_loss_matches_loop_with_clusters(alpha, relaxed):
    rng = np.random.default_rng(int(alpha * 10) + relaxed)
    bsz, length, n_clusters = 5, 9, 3
    if relaxed:
        s = torch.from_numpy(rng.uniform(-1, 1, (bsz, length)))
    else:
        s = _pm(rng, bsz, length)
    t, t2 = _pm(rng, bsz, length), _pm(rng, bsz, length)
    table = _bits(rng, n_clusters, length, 0.7)
    table[2] = 0  # a cluster whose mask is empty
    c = torch.tensor([0, 1, 0, 2, 1])
    c_aug = torch.tensor([0, 2, 0, 2, 1])  # sample 1 is an offset positive
    got = R.brcd_loss_ref(s, t, t2, table, c, c_aug, alpha, 0.3)
    want = _loop_brcd(s, t, t2, table, c.tolist(), c_aug.tolist(), alpha, 0.3)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_brcd_reductions_match_loop_rows():
    rng = np.random.default_rng(12)
    s, t, t2 = (_pm(rng, 4, 10) for _ in range(3))
    table = _bits(rng, 2, 10, 0.7)
    c, c_aug = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])
    rows = R.brcd_loss_ref(s, t, t2, table, c, c_aug, 0.8, 0.3, reduction="none")
    want = _loop_brcd(s, t, t2, table, c.tolist(), c_aug.tolist(), 0.8, 0.3, per_row=True)
    np.testing.assert_allclose(rows.numpy(), want, rtol=1e-10)
    total = R.brcd_loss_ref(s, t, t2, table, c, c_aug, 0.8, 0.3, reduction="sum")
    assert total.item() == pytest.approx(sum(want), rel=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        R.brcd_loss_ref(s, t, t2, reduction="avg")


def test_brcd_without_clusters_matches_loop():
    rng = np.random.default_rng(9)
    s, t, t2 = (_pm(rng, 4, 12) for _ in range(3))
    got = R.brcd_loss_ref(s, t, t2, alpha=0.8, temperature=0.5)
    assert got.item() == pytest.approx(_loop_brcd(s, t, t2, None, None, None, 0.8, 0.5), 1e-10)


def test_brcd_special_cases():
    rng = np.random.default_rng(11)
    s = torch.from_numpy(rng.uniform(-1, 1, (6, 16))).requires_grad_()
    t, t2 = _pm(rng, 6, 16), _pm(rng, 6, 16)
    # alpha = 0, all-ones mask, no clusters: NT-Xent of (student, teacher other view)
    ones = torch.ones(1, 16, dtype=torch.float64)
    for table in (None, ones):
        got = R.brcd_loss_ref(s, t, t2, table, alpha=0.0, temperature=0.3)
        torch.testing.assert_close(got, R.nt_xent_ref(s, t2, 0.3))
    # an all-ones mask with clusters but no shared cluster changes nothing
    c = torch.arange(6)
    torch.testing.assert_close(
        R.brcd_loss_ref(s, t, t2, ones.expand(6, 16), c, c, 0.8, 0.3),
        R.brcd_loss_ref(s, t, t2, None, alpha=0.8, temperature=0.3),
    )
    # alpha = 1: the positive is the individual-space term only, so t2 only enters negatives;
    # gradients reach the student and never the teacher
    t_req = t.clone().requires_grad_()
    loss = R.brcd_loss_ref(s, t_req, t2, alpha=1.0, temperature=0.3)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and t_req.grad is None
    # false-negative removal lowers the loss when clusters share members
    c_shared = torch.tensor([0, 0, 1, 1, 2, 2])
    with_fn = R.brcd_loss_ref(s, t, t2, ones.expand(3, 16), c_shared, c_shared, 0.8, 0.3)
    without = R.brcd_loss_ref(s, t, t2, None, alpha=0.8, temperature=0.3)
    assert with_fn.item() < without.item()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        pytest.param({"temperature": 0.0}, ValueError, "temperature", id="tau0"),
        pytest.param({"alpha": 1.5}, ValueError, "alpha", id="alpha"),
        pytest.param({"cluster_ids": torch.tensor([0, 1, 5])}, ValueError, "cluster_ids", id="ids"),
        pytest.param({"mask_table": torch.ones(2, 7)}, ValueError, "mask_table", id="mask-len"),
        pytest.param({"cluster_ids": torch.tensor([0.0, 1, 1])}, TypeError, "integer", id="f-ids"),
    ],
)
def test_brcd_rejects_bad_arguments(kwargs, err, match):
    s = torch.ones(3, 8)
    args = {"mask_table": torch.ones(2, 8), "cluster_ids": torch.tensor([0, 1, 1])}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        R.brcd_loss_ref(s, s, s, **args)


def test_loss_refs_reject_bad_codes():
    good = torch.ones(3, 8)
    with pytest.raises(ValueError, match="z1"):
        R.nt_xent_ref(torch.ones(3, 8, dtype=torch.int64), good)
    with pytest.raises(ValueError, match="z2 must have L = 8"):
        R.nt_xent_ref(good, torch.ones(3, 7))
    with pytest.raises(ValueError, match="student contains NaN"):
        R.brcd_loss_ref(torch.full((3, 8), float("nan")), good, good)
    with pytest.raises(ValueError, match="teacher_other_view must have B"):
        R.brcd_loss_ref(good, good, torch.ones(2, 8))
    with pytest.raises(ValueError, match="at least one row"):
        R.masked_similarity_ref(torch.ones(0, 8), good)
    with pytest.raises(ValueError, match="mask_y must have shape"):
        R.masked_similarity_ref(good, good, None, torch.ones(3, 9))
    with pytest.raises(ValueError, match="p1 must hold probabilities"):
        R.bernoulli_kl_ref(good * 2, good * 0.5)


def test_references_take_numpy_scalars_and_refuse_meta_tensors():
    rng = np.random.default_rng(9)
    z1, z2 = _pm(rng, 4, 7), _pm(rng, 4, 7)
    assert torch.equal(R.nt_xent_ref(z1, z2, np.float32(0.5)), R.nt_xent_ref(z1, z2, 0.5))
    with pytest.raises(ValueError, match="^z1 must be on the CPU or a CUDA device, got meta$"):
        R.nt_xent_ref(z1.to("meta"), z2)
    with pytest.raises(ValueError, match="^temperature must be a finite number > 0"):
        R.nt_xent_ref(z1, z2, np.float32("inf"))
