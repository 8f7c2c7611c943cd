"""Retrieval metrics match hand-computed cases and an independent numpy implementation, and the
streamed evaluation equals the one-shot one (ties by index, multi-label, no relevant, K > N)."""

import json
import warnings

import numpy as np
import pytest
import torch

from brcd.retrieval import as_packed, evaluate, isd, nra
from brcd.retrieval import metrics as M
from brcd.retrieval.index import topk


def codes_from_ints(values, bits):
    """±1 codes whose packed value is each integer (bit j of the int -> bit j of the code)."""
    v = np.asarray(values, dtype=np.int64)
    b = (v[:, None] >> np.arange(bits)) & 1
    return np.where(b == 1, 1.0, -1.0)


def same(a, b) -> bool:
    """Exact equality of two results (NaN == NaN) via their JSON text."""
    return json.dumps(a.as_dict(), sort_keys=True) == json.dumps(b.as_dict(), sort_keys=True)


# ---------------------------------------------------------------- independent numpy reference
def ref_metrics(qc, dc, ql, dl, k, pk, radius):
    """Per-query loops: lexsort on (index, distance), the DeepHash formulas written out."""
    qb, db = qc > 0, dc > 0
    nq, n = qb.shape[0], db.shape[0]
    bits = qb.shape[1]
    k = min(k, n)
    aps_k, aps_all, pks, prs, P, R = [], [], [], [], [], []
    for i in range(nq):
        d = (qb[i][None, :] != db).sum(1)
        order = np.lexsort((np.arange(n), d))
        if ql.ndim == 1:
            rel = dl == ql[i]
        else:
            rel = (dl @ ql[i]) > 0
        rs = rel[order]

        def ap(cut, rs=rs):
            hits, s = 0, 0.0
            for j in range(cut):
                if rs[j]:
                    hits += 1
                    s += hits / (j + 1)
            return s / hits if hits else 0.0

        aps_k.append(ap(k))
        aps_all.append(ap(n))
        pks.append([rs[: min(c, n)].sum() / min(c, n) for c in pk])
        within = d <= radius
        prs.append(rel[within].sum() / within.sum() if within.sum() else 0.0)
        P.append([rel[d <= r].sum() / (d <= r).sum() if (d <= r).sum() else np.nan
                  for r in range(bits + 1)])
        R.append([rel[d <= r].sum() / rel.sum() if rel.sum() else np.nan
                  for r in range(bits + 1)])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pr_p = np.nanmean(np.array(P, float), axis=0)
        pr_r = np.nanmean(np.array(R, float), axis=0)
    return dict(
        map_at_k=np.mean(aps_k), map_all=np.mean(aps_all), pk=np.mean(pks, axis=0),
        p_at_r2=np.mean(prs), pr_p=pr_p, pr_r=pr_r,
    )


# ---------------------------------------------------------------- hand-computed cases
def test_hand_computed_ties_by_index():
    # query 0b000; db distances [1, 0, 1, 1, 2] -> rank by (d, idx): 1, 0, 2, 3, 4
    q = codes_from_ints([0], 3)
    db = codes_from_ints([1, 0, 2, 4, 3], 3)
    ql = np.array([7])
    dl = np.array([7, 0, 7, 0, 7])  # ranked relevance: [0, 1, 1, 0, 1]
    r = evaluate(q, db, ql, dl, topk=3, pk=(1, 2, 3, 5))
    # AP@3: hits at ranks 2, 3 -> (1/2 + 2/3) / 2
    assert r.map_at_k == pytest.approx((1 / 2 + 2 / 3) / 2)
    # AP@all: hits at 2, 3, 5 -> (1/2 + 2/3 + 3/5) / 3
    assert r.map_all == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert r.precision_at == pytest.approx({1: 0.0, 2: 0.5, 3: 2 / 3, 5: 3 / 5})
    assert r.p_at_r2 == pytest.approx(3 / 5)
    # PR over radii: r=0 retrieves {1} (irrelevant), r=1 {0,1,2,3} (2 relevant), r>=2 all
    assert r.pr_precision == pytest.approx([0.0, 0.5, 0.6, 0.6])
    assert r.pr_recall == pytest.approx([0.0, 2 / 3, 1.0, 1.0])


def test_tie_order_changes_ap():
    # Two items at the same distance: the lower database index ranks first.
    q = codes_from_ints([0], 2)
    db = codes_from_ints([1, 2], 2)  # both at distance 1
    first = evaluate(q, db, np.array([1]), np.array([1, 0]), topk=1)
    second = evaluate(q, db, np.array([1]), np.array([0, 1]), topk=1)
    assert first.map_at_k == 1.0 and second.map_at_k == 0.0


def test_no_relevant_counts_as_zero():
    q = codes_from_ints([0, 3], 2)
    db = codes_from_ints([0, 1, 2], 2)
    r = evaluate(q, db, np.array([5, 9]), np.array([5, 5, 5]), topk=2)
    # query 0: all relevant -> AP 1; query 1 (label 9): nothing relevant -> 0, still counted
    assert r.map_at_k == pytest.approx(0.5)
    assert r.map_all == pytest.approx(0.5)
    assert r.p_at_r2 == pytest.approx(0.5)


def test_k_larger_than_n_is_clipped():
    q = codes_from_ints([0], 2)
    db = codes_from_ints([3, 0], 2)
    r = evaluate(q, db, np.array([1]), np.array([1, 0]), topk=1000, pk=(1, 10))
    # ranking: idx1 (d0, irrelevant), idx0 (d2, relevant) -> AP = 1/2; P@10 -> P@2
    assert r.topk == 2
    assert r.map_at_k == pytest.approx(0.5)
    assert r.precision_at == pytest.approx({1: 0.0, 2: 0.5})


def test_multi_label_shares_one_label():
    q = codes_from_ints([0], 2)
    db = codes_from_ints([0, 1, 3], 2)
    ql = np.array([[1, 0, 1]])
    dl = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0]])  # relevance [0, 1, 1]
    r = evaluate(q, db, ql, dl, topk=3)
    assert r.map_at_k == pytest.approx((1 / 2 + 2 / 3) / 2)


# ---------------------------------------------------------------- agreement with the reference
@pytest.mark.parametrize(
    "bits,nq,n,multi",
    [pytest.param(16, 37, 301, False, id="16b-single"),
     pytest.param(13, 20, 150, True, id="13b-multi"),
     pytest.param(100, 9, 257, False, id="100b-single-2words")],
)
def test_matches_numpy_reference(bits, nq, n, multi):
    rng = np.random.default_rng(bits + nq)
    # few distinct codes so ties are frequent
    base = np.where(rng.random((12, bits)) < 0.5, 1.0, -1.0)
    qc = base[rng.integers(0, 12, nq)]
    dc = base[rng.integers(0, 12, n)]
    flip = rng.random(dc.shape) < 0.05
    dc = np.where(flip, -dc, dc)
    if multi:
        ql = (rng.random((nq, 5)) < 0.25).astype(np.int64)
        dl = (rng.random((n, 5)) < 0.25).astype(np.int64)
    else:
        ql, dl = rng.integers(0, 6, nq), rng.integers(0, 6, n)
    pk = (1, 5, 50, 100, 1000)
    ref = ref_metrics(qc, dc, ql, dl, 50, pk, 2)
    got = evaluate(qc, dc, ql, dl, topk=50, pk=pk)
    assert got.map_at_k == pytest.approx(ref["map_at_k"], abs=1e-12)
    assert got.map_all == pytest.approx(ref["map_all"], abs=1e-12)
    want_pk = dict(zip([min(c, n) for c in pk], ref["pk"], strict=True))
    assert got.precision_at == pytest.approx(want_pk, abs=1e-12)
    assert got.p_at_r2 == pytest.approx(ref["p_at_r2"], abs=1e-12)
    np.testing.assert_allclose(got.pr_precision, ref["pr_p"], atol=1e-12)
    np.testing.assert_allclose(got.pr_recall, ref["pr_r"], atol=1e-12)


def test_streamed_equals_one_shot_and_packed_input():
    rng = np.random.default_rng(0)
    qc = np.where(rng.random((53, 32)) < 0.5, 1.0, -1.0)
    dc = np.where(rng.random((411, 32)) < 0.5, 1.0, -1.0)
    ql, dl = rng.integers(0, 4, 53), rng.integers(0, 4, 411)
    one = evaluate(qc, dc, ql, dl, topk=100, block_entries=1 << 30)
    calls = []
    streamed = evaluate(qc, dc, ql, dl, topk=100, block_entries=411 * 7,
                        progress=lambda d, t: calls.append(d))
    assert len(calls) == 8 and calls[-1] == 53  # ceil(53 / 7) bounded blocks
    assert same(streamed, one)
    np.testing.assert_array_equal(streamed.ap_at_k, one.ap_at_k)
    qw, bits = as_packed(qc)
    dw, _ = as_packed(torch.from_numpy(dc))
    packed = evaluate(qw, dw, ql, dl, topk=100, bits=bits)
    assert same(packed, one)
    no_all = evaluate(qc, dc, ql, dl, topk=100, map_all=False)
    assert no_all.map_at_k == one.map_at_k and np.isnan(no_all.map_all)


def test_torch_inputs_equal_numpy():
    rng = np.random.default_rng(1)
    s = np.where(rng.random((30, 16)) < 0.5, 1.0, -1.0)
    t = np.where(rng.random((60, 16)) < 0.5, 1.0, -1.0)
    lab_q, lab_d = rng.integers(0, 3, 30), rng.integers(0, 3, 60)
    a = evaluate(s, t, lab_q, lab_d, topk=10)
    assert evaluate(s, s, lab_q, lab_q, topk=5).map_at_k > 0
    as_torch = evaluate(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(lab_q),
                        torch.from_numpy(lab_d), topk=10)
    assert same(as_torch, a)


# ---------------------------------------------------------------- alignment analysis
def test_isd_hand_and_random():
    assert isd(codes_from_ints([0, 3], 4), codes_from_ints([1, 3], 4)) == pytest.approx(1 / 8)
    rng = np.random.default_rng(2)
    s = np.where(rng.random((50, 70)) < 0.5, 1.0, -1.0)
    t = np.where(rng.random((50, 70)) < 0.5, 1.0, -1.0)
    assert isd(s, t) == pytest.approx((s != t).mean())
    assert isd(s, s) == 0.0


def test_nra_against_reference():
    rng = np.random.default_rng(3)
    sq = np.where(rng.random((17, 24)) < 0.5, 1.0, -1.0)
    sd = np.where(rng.random((120, 24)) < 0.5, 1.0, -1.0)
    flip = rng.random(sd.shape) < 0.2
    tq, td = np.where(rng.random(sq.shape) < 0.1, -sq, sq), np.where(flip, -sd, sd)
    got = nra(sq, sd, tq, td, ks=(1, 10, 500))
    for k in (1, 10, 500):
        kk = min(k, 120)
        vals = []
        for i in range(17):
            ds, dt = (sq[i] != sd).sum(1), (tq[i] != td).sum(1)
            a = set(np.lexsort((np.arange(120), ds))[:kk])
            b = set(np.lexsort((np.arange(120), dt))[:kk])
            vals.append(len(a & b) / kk)
        assert got[k] == pytest.approx(np.mean(vals))
    assert got[500] == 1.0  # K clipped to N: every neighbour set is the whole database
    assert nra(sq, sd, sq, sd, ks=(10,))[10] == 1.0


def test_topk_ties_by_index():
    d, i = topk(*[as_packed(codes_from_ints(v, 3))[0] for v in ([0], [3, 1, 1, 0])], 3)
    assert d.tolist() == [[0, 1, 1]] and i.tolist() == [[3, 1, 2]]


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        pytest.param(dict(topk=0), ValueError, "K must be", id="k0"),
        pytest.param(dict(query_labels=np.array([0, 1])), ValueError, "query_labels", id="qlab"),
        pytest.param(dict(db_labels=np.zeros((3, 2))), ValueError, "both", id="label-kinds"),
        pytest.param(dict(db_labels=np.array([0.5, 1, 1])), TypeError, "db_labels", id="floatlab"),
        pytest.param(dict(db_codes=np.ones((3, 5))), ValueError, "bits", id="bits-mismatch"),
        pytest.param(dict(query_codes=np.full((1, 4), 0.3)), ValueError, "query_codes", id="pm1"),
        pytest.param(dict(query_codes=np.zeros((1, 1), np.uint64)), ValueError, "bits=",
                     id="packed-no-bits"),
        pytest.param(dict(radius=-1), ValueError, "radius", id="radius"),
    ],
)
def test_errors_name_the_argument(kwargs, exc, match):
    args = dict(query_codes=np.ones((1, 4)), db_codes=np.ones((3, 4)),
                query_labels=np.array([0]), db_labels=np.array([0, 1, 1]), topk=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        evaluate(**args)


def test_metric_functions_direct():
    rs = np.array([[True, False, True], [False, False, False]])
    np.testing.assert_allclose(M.average_precision(rs, 2), [1.0, 0.0])
    h_all, h_rel = M.radius_histograms(np.array([[0, 2, 2]]), np.array([[False, True, True]]), 3)
    assert h_all.tolist() == [[1, 0, 2, 0]] and h_rel.tolist() == [[0, 0, 2, 0]]
    p, r = M.pr_from_histograms(h_all, h_rel)
    np.testing.assert_allclose(p, [0, 0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r, [0, 0, 1, 1])


def test_block_distances_match_reference():
    from brcd.retrieval.index import block_distances
    from fasthash.reference import hamming_distance_ref

    rng = np.random.default_rng(4)
    q = rng.integers(0, 2**63, (7, 2), dtype=np.uint64)
    x = rng.integers(0, 2**63, (300, 2), dtype=np.uint64)
    np.testing.assert_array_equal(block_distances(q, x), hamming_distance_ref(q, x).numpy())


def test_codes_longer_than_65535_bits_rank_by_their_full_distance():
    # distances above 65,535 must not wrap around (a uint16 sort key made 65,536 rank as 0)
    from brcd.retrieval.index import stable_order

    bits = 65_536 + 64
    q = np.ones((1, bits))
    db = np.ones((3, bits))
    db[0, :65_536] = -1  # distance 65,536
    db[1, :1] = -1  # distance 1
    db[2, :2] = -1  # distance 2
    r = evaluate(q, db, np.array([0]), np.array([1, 0, 0]), topk=2, pk=(1, 2, 3), map_all=True)
    assert r.map_at_k == 1.0 and r.precision_at[1] == 1.0 and r.map_all == 1.0
    assert stable_order(np.array([[65_536, 1, 1]]), bits=bits).tolist() == [[1, 2, 0]]
    assert stable_order(np.array([[65_536, 1, 1]])).tolist() == [[1, 2, 0]]
    assert stable_order(np.array([[5, 1, 1]]), bits=16).tolist() == [[1, 2, 0]]


@pytest.mark.parametrize("which", ["query_codes", "db_codes"])
def test_packed_words_with_bits_beyond_L_are_refused(which):
    q = as_packed(codes_from_ints([3, 5], 13))[0]
    db = as_packed(codes_from_ints([1, 2, 3, 7], 13))[0]
    bad = (q if which == "query_codes" else db).copy()
    bad[0, 0] |= np.uint64(1) << np.uint64(20)  # a bit beyond L = 13
    args = (bad, db) if which == "query_codes" else (q, bad)
    with pytest.raises(ValueError, match=f"{which} has bits set beyond bits=13"):
        evaluate(*args, np.array([0, 1]), np.array([0, 1, 0, 1]), topk=2, bits=13)
    assert evaluate(q, db, np.array([0, 1]), np.array([0, 1, 0, 1]), topk=2, bits=13).bits == 13
    with pytest.raises(ValueError, match="bits set beyond bits=13"):
        isd(bad, bad, bits=13)


@pytest.mark.parametrize("bits,nq,n,k,multi", [
    (32, 211, 3001, 1000, False), (3, 37, 101, 50, False), (5, 20, 33, 40, True),
    (65, 90, 777, 100, True)])
def test_map_at_k_equals_the_streaming_evaluate(bits, nq, n, k, multi):
    """The top-K path (few bits: many ties, broken by index) gives evaluate's mAP@K exactly."""
    from brcd.retrieval import map_at_k

    rng = np.random.default_rng(bits + nq)
    q, db = np.sign(rng.standard_normal((nq, bits))), np.sign(rng.standard_normal((n, bits)))
    if multi:
        ql, dl = (rng.random((nq, 4)) < 0.3).astype(int), (rng.random((n, 4)) < 0.3).astype(int)
    else:
        ql, dl = rng.integers(0, 10, nq), rng.integers(0, 10, n)
    want = evaluate(q, db, ql, dl, topk=k, map_all=False).map_at_k
    assert map_at_k(q, db, ql, dl, topk=k, block_entries=4 * min(k, n)) == want
    assert map_at_k(q, db, ql, dl, topk=k) == want
    with pytest.raises(ValueError, match="db_codes must have L"):
        map_at_k(q, db[:, :-1], ql, dl, topk=k)
