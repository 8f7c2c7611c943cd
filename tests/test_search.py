"""hamming_topk / hamming_radius are bit-exact against the reference at every SIMD level."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fasthash
from fasthash import env
from fasthash import search as S
from fasthash.codes import as_words
from fasthash.reference import radius_ref, topk_ref

C = pytest.importorskip("fasthash._C")
LEVELS = C.available_simd_levels()


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def simd(request):
    if request.param not in LEVELS:
        pytest.skip(f"this CPU lacks {request.param}")
    return request.param


def np_topk(q, x, k, m=None):
    """Independent numpy reference: full distance matrix + stable argsort."""
    diff = q[:, None, :] ^ x[None, :, :]
    if m is not None:
        diff &= m.reshape(-1, 1, q.shape[1]) if m.ndim == 2 else m
    d = np.bitwise_count(diff).sum(-1).astype(np.int64)
    i = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, i, 1), i


def tie_heavy(rng, n, w, few_bits=3):
    """Codes using only a few bits, with duplicated rows: almost every distance is tied."""
    x = rng.integers(0, 1 << few_bits, (n, w), dtype=np.uint64)
    x[n // 2 :] = x[: n - n // 2]
    return x


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8, 9])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_matches_reference(simd, w, ties):
    rng = np.random.default_rng(w * 10 + ties)
    n = 1237  # not a multiple of any block size
    x = tie_heavy(rng, n, w) if ties else rng.integers(0, 2**64, (n, w), dtype=np.uint64)
    q = np.concatenate([x[:5], rng.integers(0, 2**64, (14, w), dtype=np.uint64)])
    masks = [None, rng.integers(0, 2**64, (w,), dtype=np.uint64),
             rng.integers(0, 2**64, (q.shape[0], w), dtype=np.uint64)]
    for m in masks:
        rd, ri = np_topk(q, x, n, m)  # a full stable sort: every k is a prefix
        for k in (1, 7, 300, n):
            d, i = fasthash.hamming_topk(q, x, k, m, num_threads=2, simd=simd)
            assert d.dtype == np.int32 and i.dtype == np.int64
            np.testing.assert_array_equal(d, rd[:, :k])
            np.testing.assert_array_equal(i, ri[:, :k])
    if simd == LEVELS[0] and w <= 3:  # the numpy helper agrees with THE spec
        for m in masks:
            rd, ri = topk_ref(q, x, 50, m)
            d, i = fasthash.hamming_topk(q, x, 50, m, simd=simd)
            np.testing.assert_array_equal(d, rd.numpy())
            np.testing.assert_array_equal(i, ri.numpy())


def test_wide_codes_and_odd_lengths(simd):
    rng = np.random.default_rng(3)
    for bits in (1, 63, 100, 4096):
        codes = rng.choice([-1.0, 1.0], (301, bits)).astype(np.float32)
        x = fasthash.pack_codes(codes)  # padding bits are zero by construction
        q = x[::37].copy()
        rd, ri = topk_ref(q, x, 17)
        d, i = fasthash.hamming_topk(q, x, 17, simd=simd)
        np.testing.assert_array_equal(d, rd.numpy())
        np.testing.assert_array_equal(i, ri.numpy())
        assert (d[:, 0] == 0).all()


@pytest.mark.parametrize("w", [2, 3, 4])
def test_few_queries_on_multiword_codes(simd, w):
    """1-3 queries take the row-major kernels (no blocked copy); ranges end mid-block."""
    rng = np.random.default_rng(40 + w)
    x = tie_heavy(rng, 3001, w, few_bits=4)
    x[::2] = rng.integers(0, 2**64, (1501, w), dtype=np.uint64)
    for nq in (1, 2, 3):
        q = x[5 : 5 + nq].copy()
        for m in (None, rng.integers(0, 2**64, (nq, w), dtype=np.uint64)):
            rd, ri = np_topk(q, x, 3001, m)
            for k in (1, 40, 3001):
                for t in (1, 2):
                    d, i = fasthash.hamming_topk(q, x, k, m, num_threads=t, simd=simd)
                    np.testing.assert_array_equal(d, rd[:, :k])
                    np.testing.assert_array_equal(i, ri[:, :k])


@pytest.mark.parametrize("w", [2, 5])
def test_many_queries_on_multiword_codes(simd, w):
    """Enough query groups that the whole gallery is transposed once up front."""
    rng = np.random.default_rng(50 + w)
    x = tie_heavy(rng, 2003, w, few_bits=5)
    x[1::3] = rng.integers(0, 2**64, (668, w), dtype=np.uint64)
    q = np.concatenate([x[:30], rng.integers(0, 2**64, (37, w), dtype=np.uint64)])
    for m in (None, rng.integers(0, 2**64, (67, w), dtype=np.uint64)):
        rd, ri = np_topk(q, x, 2003, m)
        for k in (3, 500):
            d, i = fasthash.hamming_topk(q, x, k, m, num_threads=2, simd=simd)
            np.testing.assert_array_equal(d, rd[:, :k])
            np.testing.assert_array_equal(i, ri[:, :k])


def test_all_zero_mask_and_edge_sizes(simd):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 2**64, (100, 2), dtype=np.uint64)
    q = rng.integers(0, 2**64, (9, 2), dtype=np.uint64)
    d, i = fasthash.hamming_topk(q, x, 100, np.zeros(2, np.uint64), simd=simd)
    assert (d == 0).all() and (i == np.arange(100)).all()  # all tied: index order
    one = x[:1]
    d, i = fasthash.hamming_topk(q, one, 1, simd=simd)
    np.testing.assert_array_equal(d[:, 0], np.bitwise_count(q ^ one).sum(1))
    assert (i == 0).all()


@pytest.mark.parametrize("nq", [1, 3, 40])
def test_threads_do_not_change_results(simd, nq):
    rng = np.random.default_rng(5)
    x = tie_heavy(rng, 70_001, 1, few_bits=6)  # several gallery splits, heavy ties
    q = rng.integers(0, 64, (nq, 1), dtype=np.uint64)
    ref = fasthash.hamming_topk(q, x, 50, num_threads=1, simd=simd)
    for t in (2, 3, 5):
        out = fasthash.hamming_topk(q, x, 50, num_threads=t, simd=simd)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])
    rd, ri = np_topk(q, x, 50)
    np.testing.assert_array_equal(ref[0], rd)
    np.testing.assert_array_equal(ref[1], ri)


@pytest.mark.parametrize(
    "n, w, nq, threads", [(270_003, 1, 16, 1), (270_003, 3, 5, 1), (1_100_003, 1, 3, 2)]
)
def test_large_k_sampled_limit_and_its_fallback(simd, n, w, nq, threads):
    """Large k on a large gallery (or gallery range) starts from a limit taken from a sample's
    distance histogram; a misleading sample must not change the answer (the query is rescanned)."""
    rng = np.random.default_rng(6)
    k = 300
    x = rng.integers(0, 2**64, (n, w), dtype=np.uint64)
    q = rng.integers(0, 2**64, (nq, w), dtype=np.uint64)
    # the first sampled piece is unusually close to query 0 (distance 2), the rest is not
    flips = rng.integers(0, 64, (60, 2))
    x[:60] = q[0]
    x[:60, 0] = q[0, 0] ^ (np.uint64(1) << flips[:, 0].astype(np.uint64)) ^ (
        np.uint64(1) << flips[:, 1].astype(np.uint64)
    )
    for m in (None, rng.integers(0, 2**64, (nq, w), dtype=np.uint64)):
        d, i = fasthash.hamming_topk(q, x, k, m, num_threads=threads, simd=simd)
        rd, ri = np_topk(q, x, k, m)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_array_equal(i, ri)


def test_radius_matches_reference(simd):
    rng = np.random.default_rng(7)
    for w, r in ((1, 26), (3, 80), (1, 0)):
        x = rng.integers(0, 2**64, (999, w), dtype=np.uint64)
        x[500:] = x[:499]
        q = np.concatenate([x[:3], rng.integers(0, 2**64, (6, w), dtype=np.uint64)])
        for m in (None, rng.integers(0, 2**64, (9, w), dtype=np.uint64)):
            rl, rd, ri = radius_ref(q, x, r, m)
            for t in (1, 2):
                lims, d, i = fasthash.hamming_radius(q, x, r, m, num_threads=t, simd=simd)
                np.testing.assert_array_equal(lims, rl.numpy())
                np.testing.assert_array_equal(d, rd.numpy())
                np.testing.assert_array_equal(i, ri.numpy())


def test_torch_in_torch_out_and_zero_copy_views():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 2**64, (200, 2), dtype=np.uint64)
    q = x[:4].copy()
    tq, tx = torch.from_numpy(q.view(np.int64)), torch.from_numpy(x.view(np.int64))
    d, i = fasthash.hamming_topk(tq, tx, 3)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.int32 and i.dtype == torch.int64
    nd, ni = fasthash.hamming_topk(q, x, 3)
    assert isinstance(nd, np.ndarray)
    np.testing.assert_array_equal(i.numpy(), ni)
    lims, rd, ri = fasthash.hamming_radius(tq, tx, 40)
    assert isinstance(lims, torch.Tensor)
    view = as_words(torch.from_numpy(x.view(np.int64)), "x", contiguous=True)
    assert view.ctypes.data == x.ctypes.data


def test_empty_query_batch():
    x = np.ones((5, 1), np.uint64)
    d, i = fasthash.hamming_topk(np.zeros((0, 1), np.uint64), x, 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda q, x: fasthash.hamming_topk(q.astype(np.float32), x, 1), TypeError, "queries"),
        (lambda q, x: fasthash.hamming_topk(q, x.astype(np.int32), 1), TypeError, "gallery"),
        (lambda q, x: fasthash.hamming_topk(q, np.tile(x, (2, 1))[::2], 1),
         ValueError, "contiguous"),
        (lambda q, x: fasthash.hamming_topk(q, np.tile(x, (1, 2)), 1), ValueError, "words"),
        (lambda q, x: fasthash.hamming_topk(q[0], x, 1), ValueError, "queries"),
        (lambda q, x: fasthash.hamming_topk(q, x, 0), ValueError, "k"),
        (lambda q, x: fasthash.hamming_topk(q, x, 11), ValueError, "k"),
        (lambda q, x: fasthash.hamming_topk(q, x, True), TypeError, "k"),
        (lambda q, x: fasthash.hamming_topk(q, x, 2.0), TypeError, "k"),
        (lambda q, x: fasthash.hamming_topk(q, x[:0], 1), ValueError, "gallery"),
        (lambda q, x: fasthash.hamming_radius(q, x, -1), ValueError, "r"),
        (lambda q, x: fasthash.hamming_topk(q, x, 1, np.ones((2, 1), np.uint64)), ValueError,
         "mask"),
        (lambda q, x: fasthash.hamming_topk(q, x, 1, np.ones(2, np.uint64)), ValueError, "mask"),
        (lambda q, x: fasthash.hamming_topk(q, x, 1, np.ones(1, np.float64)), TypeError, "mask"),
        (lambda q, x: fasthash.hamming_topk(q, x, 1, num_threads=0), ValueError, "num_threads"),
        (lambda q, x: fasthash.hamming_topk(q, x, 1, simd="sse9"), ValueError, "simd"),
        (lambda q, x: fasthash.hamming_topk(q.tolist(), x, 1), TypeError, "queries"),
    ],
)
def test_bad_input(call, exc, word):
    q = np.arange(3, dtype=np.uint64).reshape(3, 1)
    x = np.arange(10, dtype=np.uint64).reshape(10, 1)
    with pytest.raises(exc, match=word):
        call(q, x)


def test_fallback_without_extension(monkeypatch):
    rng = np.random.default_rng(9)
    x = rng.integers(0, 16, (5000, 1), dtype=np.uint64)  # > one reference block, many ties
    q = rng.integers(0, 16, (3, 1), dtype=np.uint64)
    m = rng.integers(0, 2**64, (3, 1), dtype=np.uint64)
    fast = fasthash.hamming_topk(q, x, 40, m)
    fast_r = fasthash.hamming_radius(q, x, 1, m)
    monkeypatch.setattr(S, "_C", None)
    monkeypatch.setattr(env, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="_C is not built"):
        slow = fasthash.hamming_topk(q, x, 40, m)
    slow_r = fasthash.hamming_radius(q, x, 1, m)
    for a, b in zip(fast + fast_r, slow + slow_r, strict=True):
        np.testing.assert_array_equal(a, b)


def test_merge_helpers_equal_one_stable_sort():
    """Piecewise results merged by (distance, index) equal the whole-gallery answer, whatever the
    order of the pieces; the reference fallback and HammingIndex segments rely on this."""
    rng = np.random.default_rng(11)
    x = tie_heavy(rng, 900, 1, few_bits=4)
    q = rng.integers(0, 16, (6, 1), dtype=np.uint64)
    bounds = [0, 1, 250, 251, 700, 900]
    pieces = list(zip(bounds[:-1], bounds[1:], strict=True))
    rd, ri = np_topk(q, x, 900)
    rl, rdd, rii = radius_ref(q, x, 1)
    for order in (pieces, pieces[::-1]):
        k = 60
        tops = []
        radii = []
        for lo, hi in order:
            d, i = S.hamming_topk(q, x[lo:hi], min(k, hi - lo))
            tops.append((d, i + lo))
            lims, dr, ir = S.hamming_radius(q, x[lo:hi], 1)
            radii.append((lims, dr, ir + lo))
        d, i = S.merge_topk(tops, k)
        assert d.dtype == np.int32 and i.dtype == np.int64
        np.testing.assert_array_equal(d, rd[:, :k])
        np.testing.assert_array_equal(i, ri[:, :k])
        for got, want in zip(S.merge_radius(radii, q.shape[0]), (rl, rdd, rii), strict=True):
            np.testing.assert_array_equal(got, want.numpy())
    d, i = S.merge_topk([(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int64))] * 2, 3)
    assert d.shape == i.shape == (0, 3)


def test_simd_env_override():
    code = "import fasthash._C as C; print(C.simd_level())"
    env = dict(os.environ, FASTHASH_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "scalar", out.stderr
    env["FASTHASH_SIMD"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTHASH_SIMD" in out.stderr


def test_set_simd_level_roundtrip():
    before = C.simd_level()
    try:
        C.set_simd_level("scalar")
        assert C.simd_level() == "scalar"
        with pytest.raises(ValueError, match="simd"):
            C.set_simd_level("nope")
    finally:
        C.set_simd_level(before)
    assert C.simd_level() == LEVELS[-1] or "FASTHASH_SIMD" in os.environ


def np_distances(q, x, m=None):
    """D[i, j] = popcount((q_i ^ x_j) & m_i): what _C.hamming_distances must equal bit for bit."""
    diff = q[:, None, :] ^ x[None, :, :]
    if m is not None:
        diff &= m.reshape(-1, 1, q.shape[1])
    return np.bitwise_count(diff).sum(-1)


@pytest.fixture(params=LEVELS)
def level_in_use(request):
    """Each level this CPU has, made the level in use through set_simd_level."""
    before = C.simd_level()
    C.set_simd_level(request.param)
    yield request.param
    C.set_simd_level(before)


def _masks(rng, nq, w):
    return {
        "none": None,
        "global": rng.integers(0, 2**64, (w,), dtype=np.uint64),
        "one_row": rng.integers(0, 2**64, (1, w), dtype=np.uint64),
        "per_query": rng.integers(0, 2**64, (nq, w), dtype=np.uint64),
    }


@pytest.mark.parametrize("w", [1, 2, 3, 4, 5, 8])
def test_hamming_distances_match_numpy(level_in_use, w):
    """Tail words, odd Q and N (partial blocks and chunks), 1-3 query register blocks, enough
    query groups for the whole-gallery transposition, every mask form and 1-3 threads."""
    rng = np.random.default_rng(100 + w)
    for nq, n in ((1, 1), (2, 9001), (3, 17), (8, 9), (67, 1237)):
        q = rng.integers(0, 2**64, (nq, w), dtype=np.uint64)
        x = rng.integers(0, 2**64, (n, w), dtype=np.uint64)
        for name, m in _masks(rng, nq, w).items():
            ref = np_distances(q, x, m)
            for t in (1, 2, 3):
                d = C.hamming_distances(q, x, m, num_threads=t)
                assert d.dtype == np.int32 and d.shape == (nq, n)
                np.testing.assert_array_equal(d, ref, err_msg=f"{name} Q={nq} N={n} t={t}")
            np.testing.assert_array_equal(C.hamming_distances(q, x, m, 2, level_in_use), ref)


@pytest.mark.parametrize("w", [1, 3])
def test_hamming_distances_gallery_ranges(level_in_use, w):
    """Few queries on a large gallery: the gallery is cut into ranges, one task each."""
    rng = np.random.default_rng(110 + w)
    x = rng.integers(0, 2**64, (70_001, w), dtype=np.uint64)
    q = rng.integers(0, 2**64, (3, w), dtype=np.uint64)
    m = rng.integers(0, 2**64, (3, w), dtype=np.uint64)
    ref, ref_m = np_distances(q, x), np_distances(q, x, m)
    for t in (1, 2, 3, 5):
        np.testing.assert_array_equal(C.hamming_distances(q, x, num_threads=t), ref)
        np.testing.assert_array_equal(C.hamming_distances(q, x, m, num_threads=t), ref_m)


def test_hamming_distances_positional_and_empty():
    rng = np.random.default_rng(10)
    q = rng.integers(0, 2**64, (3, 2), dtype=np.uint64)
    x = rng.integers(0, 2**64, (5, 2), dtype=np.uint64)
    np.testing.assert_array_equal(
        C.hamming_distances(q, x), np.bitwise_count(q[:, None] ^ x[None]).sum(-1)
    )
    for nq, n in ((0, 5), (3, 0), (0, 0)):
        for m in (None, np.ones(2, np.uint64)):
            d = C.hamming_distances(q[:nq], x[:n], m)
            assert d.dtype == np.int32 and d.shape == (nq, n)
    # a distance matrix may be empty, a search may not
    with pytest.raises(ValueError, match="gallery"):
        C.topk(q, x[:0], 1)
    with pytest.raises(ValueError, match="gallery"):
        C.radius(q, x[:0], 1)


@pytest.mark.parametrize(
    "args, exc, word",
    [
        pytest.param(lambda q, x: (q, np.tile(x, (1, 2))), ValueError, "gallery", id="widths"),
        pytest.param(lambda q, x: (q, x, np.ones(3, np.uint64)), ValueError, "mask",
                     id="mask_words"),
        pytest.param(lambda q, x: (q, x, np.ones((2, 2), np.uint64)), ValueError, "mask",
                     id="mask_rows"),
        pytest.param(lambda q, x: (q, x, np.ones(2, np.float64)), TypeError, "mask",
                     id="mask_dtype"),
        pytest.param(lambda q, x: (q.astype(np.int64), x), TypeError, "queries", id="dtype"),
        pytest.param(lambda q, x: (q[0], x), ValueError, "queries", id="ndim"),
        pytest.param(lambda q, x: (q, np.tile(x, (2, 1))[::2]), ValueError, "contiguous",
                     id="strided"),
        pytest.param(lambda q, x: (q[:, :0], x[:, :0]), ValueError, "word", id="zero_words"),
        pytest.param(lambda q, x: (q, x, None, -1), ValueError, "num_threads", id="threads"),
        pytest.param(lambda q, x: (q, x, None, 0, "sse9"), ValueError, "simd", id="simd"),
    ],
)
def test_hamming_distances_bad_input(args, exc, word):
    q = np.arange(6, dtype=np.uint64).reshape(3, 2)
    x = np.arange(10, dtype=np.uint64).reshape(5, 2)
    with pytest.raises(exc, match=f"^fasthash._C.hamming_distances: .*{word}"):
        C.hamming_distances(*args(q, x))


# ----------------------------------------------------------------------------- argument messages

META = torch.zeros(3, 1, dtype=torch.int64, device="meta")


def _index():
    idx = fasthash.HammingIndex(3)
    idx.add(np.ones((4, 3), np.float32))
    return idx


@pytest.mark.parametrize(
    "call, exc, match",
    [
        pytest.param(lambda q, x: fasthash.hamming_radius(q, x, 2**63), ValueError,
                     r"^r must satisfy 0 <= r <= 9223372036854775807, got 9223372036854775808$",
                     id="r-2^63"),
        pytest.param(lambda q, x: _index().range_search(np.ones((1, 3), np.float32), 2**64),
                     ValueError, r"^r must satisfy 0 <= r <= 9223372036854775807", id="index-r"),
        pytest.param(lambda q, x: fasthash.hamming_topk(q, x, 1, num_threads=2**31), ValueError,
                     r"^num_threads must satisfy 1 <= num_threads <= 1024, got 2147483648$",
                     id="threads-2^31"),
        pytest.param(lambda q, x: fasthash.hamming_radius(q, x, 1, num_threads=10**6),
                     ValueError, r"^num_threads must satisfy 1 <= num_threads <= 1024",
                     id="threads-10^6"),
        pytest.param(lambda q, x: fasthash.hamming_topk(q, x, 1, num_threads=1025), ValueError,
                     r"^num_threads must satisfy 1 <= num_threads <= 1024, got 1025$",
                     id="threads-1025"),
        pytest.param(lambda q, x: _index().search(np.ones((1, 3), np.float32), 1,
                                                  num_threads=2**31),
                     ValueError, r"^num_threads must satisfy 1 <= num_threads <= 1024",
                     id="index-threads"),
        pytest.param(lambda q, x: fasthash.hamming_topk(q, x, 1, simd=5), TypeError,
                     r"^simd must be None or a level name \('scalar', 'avx2' or 'avx512'\), "
                     r"got int$", id="simd-int"),
        pytest.param(lambda q, x: fasthash.hamming_radius(q, x, 1, simd=b"avx2"), TypeError,
                     r"^simd must be None or a level name .*got bytes$", id="simd-bytes"),
        pytest.param(lambda q, x: fasthash.hamming_topk(META, META, 1), ValueError,
                     r"^queries must be on the CPU or a CUDA device, got meta$", id="meta-topk"),
        pytest.param(lambda q, x: fasthash.hamming_radius(q, x, 1, META[0]), ValueError,
                     r"^mask must be on the CPU or a CUDA device, got meta$", id="meta-mask"),
        pytest.param(lambda q, x: _index().search(META, 1), ValueError,
                     r"^queries must be on the CPU or a CUDA device, got meta$",
                     id="meta-index-queries"),
        pytest.param(lambda q, x: _index().add(torch.ones(2, 3, device="meta")), ValueError,
                     r"^codes must be on the CPU or a CUDA device, got meta$", id="meta-add"),
        pytest.param(lambda q, x: _index().search(np.full((1, 3), 0.5, np.float32), 1),
                     ValueError, r"^queries \(floating point\) must hold only -1 and \+1",
                     id="index-float-queries"),
        pytest.param(lambda q, x: _index().range_search(np.full((1, 3), 2), 1), ValueError,
                     r"^queries \(integer\) must hold only 0 and 1", id="index-int-queries"),
    ],
)
def test_messages_name_the_argument_and_the_expected_value(call, exc, match):
    q = np.arange(3, dtype=np.uint64).reshape(3, 1)
    x = np.arange(10, dtype=np.uint64).reshape(10, 1)
    with pytest.raises(exc, match=match):
        call(q, x)


def test_compiled_core_bounds_num_threads_like_python():
    from fasthash import _checks

    assert C.MAX_THREADS == _checks.MAX_THREADS == 1024
    q = np.arange(3, dtype=np.uint64).reshape(3, 1)
    for call in (lambda: C.topk(q, q, 1, None, 1025), lambda: C.radius(q, q, 1, None, 1025),
                 lambda: C.hamming_distances(q, q, None, 1025)):
        with pytest.raises(ValueError, match=r"num_threads must satisfy 0 <= num_threads <= 1024"):
            call()


def test_thread_creation_failure_names_num_threads():
    """Worker threads that cannot be created (address space limited to 64 MiB above what the
    process uses) give a RuntimeError naming num_threads, in a subprocess."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc and RLIMIT_AS")
    code = """
        import resource
        import numpy as np
        import fasthash
        q = np.random.default_rng(0).integers(0, 2**63, (4096, 1), dtype=np.uint64)
        x = np.random.default_rng(1).integers(0, 2**63, (100_000, 1), dtype=np.uint64)
        fasthash.hamming_topk(q[:1], x, 1, num_threads=1)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
        try:
            fasthash.hamming_topk(q, x, 5, num_threads=200)
        except RuntimeError as e:
            print("ERROR", e)
        else:
            print("no error: threads were created")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    if line.startswith("no error"):
        pytest.skip("this system created 200 threads within the limit")
    assert line.startswith("ERROR num_threads: could not start worker thread "), line
    assert "pass a smaller num_threads" in line
