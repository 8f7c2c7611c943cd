"""Properties of the packed-code API: search, index, codes and _C bindings equal numpy oracles."""

# Hypothesis profiles ("ci": few derandomized examples; "fuzz": ~10^5 in total) are registered
# and loaded, from HYPOTHESIS_PROFILE (default "ci"), by the first import below.
import property_support as P  # noqa: I001  (registers the profiles first)
from property_support import one_torch_thread  # noqa: F401  (module-scoped autouse fixture)

import os
import tempfile
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import fasthash
import fasthash.index as fi
from fasthash import (
    HammingIndex,
    from_faiss_bytes,
    hamming_distance,
    hamming_radius,
    hamming_topk,
    pack_codes,
    to_faiss_bytes,
    unpack_codes,
)

C = fasthash._C  # None when the extension is not built (the search falls back to the reference)
LEVELS = C.available_simd_levels() if C is not None else []
THREADS = st.sampled_from([None, 1, 2, 3, 4, 7])
SIMD = st.sampled_from([None, *LEVELS])

needs_c = pytest.mark.skipif(C is None, reason="fasthash._C is not built")


@st.composite
def search_case(draw, max_w: int = 5, max_n: int = 70, max_q: int = 6, min_q: int = 0):
    """(queries, gallery, mask) as np.uint64 plus the kinds to pass them as."""
    w = draw(st.integers(1, max_w))
    n = draw(st.integers(1, max_n))
    nq = draw(st.integers(min_q, max_q))
    x = draw(P.words_arrays(n, w))
    if nq and draw(st.booleans()):  # queries drawn from the gallery: exact matches and ties
        rows = draw(st.lists(st.integers(0, n - 1), min_size=nq, max_size=nq))
        q = x[rows].copy()
    else:
        q = draw(P.words_arrays(nq, w))
    m = draw(P.masks(nq, w))
    kind = draw(st.sampled_from(P.WORD_KINDS))
    mixed = draw(st.sampled_from([None, *P.WORD_KINDS]))  # gallery kind, None = same
    return q, x, m, kind, mixed or kind


def _wrap(q, x, m, kind, gkind):
    return P.as_kind(q, kind), P.as_kind(x, gkind), P.as_kind(m, kind)


def _expect_kind(out, kind, gkind):
    if kind.startswith("np") and gkind.startswith("np"):
        assert all(isinstance(a, np.ndarray) for a in out), [type(a) for a in out]
    if kind.startswith("torch") and gkind.startswith("torch"):
        assert all(isinstance(a, torch.Tensor) for a in out), [type(a) for a in out]


# ----------------------------------------------------------------------------- search


@given(case=search_case(), data=st.data(), threads=THREADS, simd=SIMD)
def test_topk_equals_stable_argsort(case, data, threads, simd):
    q, x, m, kind, gkind = case
    k = data.draw(st.integers(1, x.shape[0]), label="k")
    qq, xx, mm = _wrap(q, x, m, kind, gkind)
    d, i = hamming_topk(qq, xx, k, mm, num_threads=threads, simd=simd)
    _expect_kind((d, i), kind, gkind)
    d, i = P.to_np(d), P.to_np(i)
    assert d.dtype == np.int32 and i.dtype == np.int64
    rd, ri = P.topk_oracle(P.dist_oracle(q, x, m), k)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)


@given(case=search_case(), data=st.data(), threads=THREADS, simd=SIMD)
def test_radius_equals_oracle(case, data, threads, simd):
    q, x, m, kind, gkind = case
    r = data.draw(st.integers(0, 64 * x.shape[1] + 3), label="r")
    qq, xx, mm = _wrap(q, x, m, kind, gkind)
    out = hamming_radius(qq, xx, r, mm, num_threads=threads, simd=simd)
    _expect_kind(out, kind, gkind)
    lims, d, i = (P.to_np(a) for a in out)
    assert lims.dtype == np.int64 and d.dtype == np.int32 and i.dtype == np.int64
    rl, rd, ri = P.radius_oracle(P.dist_oracle(q, x, m), r)
    np.testing.assert_array_equal(lims, rl)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)


@given(case=search_case(max_n=40), empty_gallery=st.booleans(), threads=THREADS)
def test_hamming_distance_equals_popcount_of_xor(case, empty_gallery, threads):
    q, x, m, kind, gkind = case
    if empty_gallery:
        x = x[:0]
    d = hamming_distance(*_wrap(q, x, m, kind, gkind), num_threads=threads)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.int32
    np.testing.assert_array_equal(d.numpy(), P.dist_oracle(q, x, m))


#: gallery sizes around the engine's blocks, chunks and thread splits (32k-code ranges, 64k)
_BIG_N = [255, 256, 257, 1023, 1025, 4097, 32767, 32769, 65535, 65537, 70001]


@P.heavy(0.05)
@given(
    n=st.sampled_from(_BIG_N), w=st.integers(1, 3), data=st.data(), threads=THREADS,
    simd=SIMD, ties=st.booleans(),
)
def test_large_galleries_and_many_queries(n, w, data, threads, simd, ties):
    """Sizes where the engine blocks, chunks and splits the gallery over threads and groups
    queries (Q up to 80): results are still one stable argsort, ties across splits by index."""
    nq = data.draw(st.integers(1, 80 if n < 5000 else 16), label="Q")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    if ties:  # few distinct codes: ties everywhere, including across thread splits
        x = rng.integers(0, 4, (n, w), dtype=np.uint64)
    else:
        x = rng.integers(0, 2**64, (n, w), dtype=np.uint64)
    q = np.concatenate([x[rng.integers(0, n, nq // 2)],
                        rng.integers(0, 2**64, (nq - nq // 2, w), dtype=np.uint64)])
    m = data.draw(P.masks(nq, w), label="mask")
    k = data.draw(st.sampled_from([1, 2, 10, 100, 257, 1000, n]), label="k")
    k = min(k, n)
    d_ref = P.dist_oracle(q, x, m)
    d, i = hamming_topk(q, x, k, m, num_threads=threads, simd=simd)
    rd, ri = P.topk_oracle(d_ref, k)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    r = data.draw(st.integers(0, 3 if not ties else 1), label="r")
    lims, d, i = hamming_radius(q, x, r, m, num_threads=threads, simd=simd)
    order = np.argsort(d_ref, axis=1, kind="stable")
    want_d = [row[o][row[o] <= r] for row, o in zip(d_ref, order, strict=True)]
    want_i = [o[row[o] <= r] for row, o in zip(d_ref, order, strict=True)]
    np.testing.assert_array_equal(lims, np.concatenate([[0], np.cumsum([len(v) for v in want_d])]))
    np.testing.assert_array_equal(d, np.concatenate(want_d))
    np.testing.assert_array_equal(i, np.concatenate(want_i))


@given(case=search_case(min_q=1), data=st.data())
def test_topk_is_a_prefix_of_a_longer_topk_and_of_radius(case, data):
    """Consistency between entry points: top-k is a prefix of top-N, and the radius results at
    r = the k-th distance contain exactly the top-k's distances below it."""
    q, x, m, _, _ = case
    n = x.shape[0]
    k = data.draw(st.integers(1, n), label="k")
    d_all, i_all = hamming_topk(q, x, n, m)
    d, i = hamming_topk(q, x, k, m)
    np.testing.assert_array_equal(d, d_all[:, :k])
    np.testing.assert_array_equal(i, i_all[:, :k])
    r = int(d[:, -1].min())
    lims, rd, _ = hamming_radius(q, x, r, m)
    for row in range(q.shape[0]):
        assert lims[row + 1] - lims[row] == int((d_all[row] <= r).sum())


@given(case=search_case(min_q=1), data=st.data())
def test_non_contiguous_inputs_are_exact_or_rejected(case, data):
    """A strided view either gives the exact answer or a clean ValueError, never garbage."""
    q, x, m, _, _ = case
    which = data.draw(st.sampled_from(["queries", "gallery"]), label="which")
    big = np.repeat(q if which == "queries" else x, 2, axis=0)[::2]  # a stride-2 row view
    assert not big.flags.c_contiguous or big.shape[0] <= 1
    args = (big, x) if which == "queries" else (q, big)
    k = data.draw(st.integers(1, x.shape[0]), label="k")
    try:
        d, i = hamming_topk(*args, k, m)
    except ValueError:
        return
    rd, ri = P.topk_oracle(P.dist_oracle(q, x, m), k)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)


# ----------------------------------------------------------------------------- the _C bindings


@needs_c
@given(case=search_case(), data=st.data())
def test_bindings_equal_oracle_at_every_level(case, data):
    """fasthash._C directly: every SIMD level and thread count gives the oracle's answer."""
    q, x, m, _, _ = case
    k = data.draw(st.integers(1, x.shape[0]), label="k")
    r = data.draw(st.integers(0, 64 * x.shape[1]), label="r")
    threads = data.draw(st.integers(0, 5), label="num_threads")
    d_ref = P.dist_oracle(q, x, m)
    rd, ri = P.topk_oracle(d_ref, k)
    rl, rrd, rri = P.radius_oracle(d_ref, r)
    for level in LEVELS:
        note(f"simd={level}")
        d, i = C.topk(q, x, k, m, threads, level)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_array_equal(i, ri)
        lims, d, i = C.radius(q, x, r, m, threads, level)
        np.testing.assert_array_equal(lims, rl)
        np.testing.assert_array_equal(d, rrd)
        np.testing.assert_array_equal(i, rri)
        np.testing.assert_array_equal(C.hamming_distances(q, x, m, threads, level), d_ref)


_BAD_ARRAYS = st.sampled_from(
    ["float64", "float32", "int32", "uint32", "uint8", "bool", "complex", "object", "list",
     "none", "str", "0d", "1d", "3d", "fortran", "strided", "big-endian"]
)


def _mangle(a: np.ndarray, how: str):
    """A deliberately wrong version of a uint64 [rows, W] array."""
    if how in ("float64", "float32", "int32", "uint32", "uint8", "bool", "complex"):
        return a.astype(how)
    if how == "object":
        return a.astype(object)
    if how == "list":
        return a.tolist()
    if how == "none":
        return None
    if how == "str":
        return "words"
    if how == "0d":
        return np.uint64(7)
    if how == "1d":
        return a.reshape(-1)
    if how == "3d":
        return a.reshape(1, *a.shape)
    if how == "fortran":
        return np.asfortranarray(np.concatenate([a, a], axis=1))[:, : a.shape[1]]
    if how == "strided":
        return np.repeat(a, 2, axis=0)[::2]
    if how == "big-endian":
        return a.astype(">u8")
    raise AssertionError(how)


@needs_c
@given(
    case=search_case(max_n=20, max_q=4),
    fn=st.sampled_from(["topk", "radius", "hamming_distances"]),
    target=st.sampled_from(["queries", "gallery", "mask", "none"]),
    how=_BAD_ARRAYS,
    k=st.one_of(st.integers(-3, 25), st.sampled_from([2**31, 2**62, -(2**63)])),
    threads=st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**40])),
    simd=st.sampled_from(["", "scalar", "avx2", "avx512", "AVX2", "sse", "auto", "\0"]),
)
def test_bindings_reject_or_answer_exactly(case, fn, target, how, k, threads, simd):
    """Arbitrary arguments to _C: a TypeError/ValueError, or (valid input) the exact answer."""
    q, x, m, _, _ = case
    args = {"queries": q, "gallery": x, "mask": m}
    if target != "none":
        if target == "mask" and m is None:
            args["mask"] = x[:1] if x.shape[1] else x
        args[target] = _mangle(np.atleast_2d(np.ascontiguousarray(args[target])), how)
    try:
        if fn == "topk":
            out = C.topk(args["queries"], args["gallery"], k, args["mask"], threads, simd)
        elif fn == "radius":
            out = C.radius(args["queries"], args["gallery"], k, args["mask"], threads, simd)
        else:
            out = C.hamming_distances(args["queries"], args["gallery"], args["mask"], threads, simd)
    except P.BAD_INPUT:
        return
    # accepted: then the arguments must have been valid and the answer must be exact
    qq, xx, mm = args["queries"], args["gallery"], args["mask"]
    for name, a in (("queries", qq), ("gallery", xx)):
        assert isinstance(a, np.ndarray) and a.dtype == np.uint64 and a.ndim == 2, name
    assert simd in ("", *LEVELS), f"accepted simd={simd!r}"
    assert 0 <= threads, f"accepted num_threads={threads}"
    d_ref = P.dist_oracle(qq, xx, mm)
    if fn == "topk":
        assert 1 <= k <= xx.shape[0], f"accepted k={k} for N={xx.shape[0]}"
        rd, ri = P.topk_oracle(d_ref, k)
        np.testing.assert_array_equal(out[0], rd)
        np.testing.assert_array_equal(out[1], ri)
    elif fn == "radius":
        assert k >= 0 and xx.shape[0] >= 1, f"accepted r={k}"
        rl, rd, ri = P.radius_oracle(d_ref, k)
        for got, want in zip(out, (rl, rd, ri), strict=True):
            np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_array_equal(out, d_ref)


# ----------------------------------------------------------------------------- invalid input


@st.composite
def bad_search_call(draw):
    """A hamming_topk / hamming_radius / hamming_distance call with exactly one bad argument."""
    q, x, m, _, _ = draw(search_case(max_n=20, max_q=4, min_q=1))
    fn = draw(st.sampled_from(["topk", "radius", "distance"]))
    what = draw(st.sampled_from(
        ["queries", "gallery", "mask", "k", "threads", "simd", "width", "mask-rows", "empty"]
    ))
    kw: dict = {}
    extra = 1  # k or r: valid unless "k" is the bad argument
    if what in ("queries", "gallery", "mask"):
        bad = draw(_BAD_ARRAYS.filter(lambda h: h not in ("strided", "fortran", "big-endian")))
        if what == "queries":
            q = _mangle(q, bad)
        elif what == "gallery":
            x = _mangle(x, bad)
        else:
            if bad == "none":
                bad = "float64"
            m = _mangle(x[:1].copy(), bad) if bad not in ("1d",) else np.zeros(
                x.shape[1] + 1, np.uint64)
    elif what == "k":
        if fn == "distance":
            fn = "topk"
        extra = draw(st.sampled_from([0, -1, x.shape[0] + 1, True, 1.5, "3", None, 2**70, -1.0,
                                      np.float64(2.0)]))
        if fn == "radius" and isinstance(extra, int) and not isinstance(extra, bool) and extra > 0:
            extra = -extra
    elif what == "threads":
        kw["num_threads"] = draw(st.sampled_from([0, -1, True, 2.0, "2", 2**70]))
    elif what == "simd":
        if fn == "distance":
            fn = "topk"
        bad = ["sse", "AVX-512", "neon", 3] + (["avx512"] if "avx512" not in LEVELS else [])
        kw["simd"] = draw(st.sampled_from(bad))
    elif what == "width":
        x = np.concatenate([x, x[:, :1]], axis=1)
    elif what == "mask-rows":
        m = np.zeros((q.shape[0] + 1, q.shape[1]), np.uint64)
    elif what == "empty":
        if fn == "distance":
            fn = "topk"
        x = x[:0]
        extra = 1
    if fn == "radius" and what == "k" and extra == 0:
        extra = -1
    return fn, what, q, x, m, extra, kw


# the argument names an error message must mention (DESIGN.md convention 8)
_NAMES = {
    "queries": ("queries", "x_words"), "gallery": ("gallery", "y_words"), "mask": ("mask",),
    "k": ("k", "r"), "threads": ("num_threads",), "simd": ("simd",),
    "width": ("gallery", "y_words", "queries", "x_words"), "mask-rows": ("mask",),
    "empty": ("gallery", "k"),
}


@given(call=bad_search_call())
def test_search_rejects_bad_input_cleanly(call):
    fn, what, q, x, m, extra, kw = call
    note(f"bad argument: {what}")
    with pytest.raises(P.BAD_INPUT) as err:
        if fn == "topk":
            hamming_topk(q, x, extra, m, **kw)
        elif fn == "radius":
            hamming_radius(q, x, extra, m, **kw)
        else:
            hamming_distance(q, x, m, **kw)
    msg = str(err.value)
    assert "\n" not in msg.strip(), f"multi-line error message: {msg!r}"
    assert any(n in msg for n in _NAMES[what]), f"{what}: message names no argument: {msg!r}"


# ----------------------------------------------------------------------------- codes


@st.composite
def code_batch(draw, max_bits: int = 200, max_n: int = 6):
    bits = draw(st.integers(1, max_bits))
    n = draw(st.integers(0, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = rng.random((n, bits)) < draw(st.sampled_from([0.0, 0.5, 1.0, 0.1]))
    return bits, b


def _encode(b: np.ndarray, form: str):
    if form == "pm1-float32":
        return np.where(b, 1.0, -1.0).astype(np.float32)
    if form == "pm1-float64":
        return np.where(b, 1.0, -1.0)
    if form == "int8-01":
        return b.astype(np.int8)
    if form == "int64-01":
        return b.astype(np.int64)
    if form == "bool":
        return b
    if form == "torch-pm1":
        return torch.from_numpy(np.where(b, 1.0, -1.0).astype(np.float32))
    if form == "torch-bf16":
        return torch.from_numpy(np.where(b, 1.0, -1.0).astype(np.float32)).to(torch.bfloat16)
    if form == "torch-bool":
        return torch.from_numpy(b.copy())
    if form == "torch-int32-01":
        return torch.from_numpy(b.astype(np.int32))
    raise AssertionError(form)


CODE_FORMS = ["pm1-float32", "pm1-float64", "int8-01", "int64-01", "bool", "torch-pm1",
              "torch-bf16", "torch-bool", "torch-int32-01"]


@given(batch=code_batch(), form=st.sampled_from(CODE_FORMS))
def test_pack_equals_bit_loop_and_unpack_inverts_it(batch, form):
    bits, b = batch
    codes = _encode(b, form)
    words = pack_codes(codes)
    if isinstance(codes, torch.Tensor):
        assert isinstance(words, torch.Tensor) and words.dtype == torch.int64
    else:
        assert isinstance(words, np.ndarray) and words.dtype == np.uint64
    w = P.to_u64(words)
    np.testing.assert_array_equal(w, P.pack_oracle(b))
    if b.shape[0]:
        assert not (w[:, -1] & ~P.tail_mask(bits)).any(), "padding bits must be 0"
    back = unpack_codes(words, bits)
    assert P.to_np(back).dtype == np.float32
    np.testing.assert_array_equal(P.to_np(back), np.where(b, 1.0, -1.0).astype(np.float32))


@given(batch=code_batch(), data=st.data())
def test_unpack_ignores_padding_bits(batch, data):
    bits, b = batch
    w = P.pack_oracle(b)
    assume(bits % 64 and b.shape[0])
    junk = data.draw(P.words_arrays(b.shape[0], 1), label="junk") & ~P.tail_mask(bits)
    dirty = w.copy()
    dirty[:, -1] |= junk[:, 0]
    for kind in ("np.uint64", "torch.int64"):
        out = P.to_np(unpack_codes(P.as_kind(dirty, kind), bits))
        np.testing.assert_array_equal(out > 0, P.unpack_oracle(w, bits))


@given(batch=code_batch())
def test_faiss_bytes_round_trip(batch):
    bits, b = batch
    w = P.pack_oracle(b)
    u8 = to_faiss_bytes(w, bits)
    assert u8.dtype == np.uint8 and u8.flags.c_contiguous and u8.shape == (b.shape[0],
                                                                            (bits + 7) // 8)
    np.testing.assert_array_equal(u8, P.faiss_bytes_oracle(w, bits))
    back = from_faiss_bytes(u8, bits)
    assert back.dtype == np.uint64
    np.testing.assert_array_equal(back, w)
    np.testing.assert_array_equal(to_faiss_bytes(P.as_kind(w, "torch.int64"), bits), u8)


@given(batch=code_batch(), data=st.data())
def test_from_faiss_bytes_rejects_stray_tail_bits(batch, data):
    bits, b = batch
    assume(bits % 8 and b.shape[0])
    u8 = P.faiss_bytes_oracle(P.pack_oracle(b), bits)
    row = data.draw(st.integers(0, b.shape[0] - 1), label="row")
    bit = data.draw(st.integers(bits % 8, 7), label="bit")
    u8[row, -1] |= np.uint8(1 << bit)
    with pytest.raises(ValueError):
        from_faiss_bytes(u8, bits)


@st.composite
def bad_codes(draw):
    """Something pack_codes must reject: wrong values, NaN/inf, wrong ndim, dtype, type."""
    bits = draw(st.integers(1, 70))
    n = draw(st.integers(1, 4))
    what = draw(st.sampled_from(
        ["value", "nan", "inf", "int-2", "1d", "3d", "complex", "string", "list", "none",
         "bits-mismatch", "zero-bits", "torch-value", "torch-nan", "torch-complex", "object"]
    ))
    a = np.ones((n, bits), np.float32)
    kw = {}
    if what == "value":
        a[draw(st.integers(0, n - 1)), draw(st.integers(0, bits - 1))] = draw(
            st.sampled_from([0.0, 0.5, 2.0, -3.0]))
    elif what in ("nan", "inf"):
        a[0, 0] = np.nan if what == "nan" else -np.inf
    elif what == "int-2":
        a = np.full((n, bits), 2, np.int32)
    elif what == "1d":
        a = a[0]
    elif what == "3d":
        a = a[None]
    elif what == "complex":
        a = a.astype(np.complex64)
    elif what == "string":
        a = a.astype(str)
    elif what == "list":
        a = a.tolist()
    elif what == "none":
        a = None
    elif what == "bits-mismatch":
        kw["bits"] = bits + draw(st.sampled_from([1, -1, 64]))
    elif what == "zero-bits":
        a = np.ones((n, 0), np.float32)
    elif what == "torch-value":
        a = torch.full((n, bits), 0.25)
    elif what == "torch-nan":
        a = torch.full((n, bits), float("nan"))
    elif what == "torch-complex":
        a = torch.ones((n, bits), dtype=torch.complex64)
    elif what == "object":
        a = a.astype(object)
    return what, a, kw


@given(case=bad_codes())
def test_pack_codes_rejects_bad_input_cleanly(case):
    what, a, kw = case
    note(what)
    with pytest.raises(P.BAD_INPUT):
        pack_codes(a, **kw)


@given(
    bits=st.integers(-2, 200),
    w=st.integers(0, 5),
    dtype=st.sampled_from(["uint64", "int64", "float64", "int32", "uint8", "torch.int32"]),
    fn=st.sampled_from(["unpack", "to_faiss", "from_faiss"]),
    ndim=st.sampled_from([1, 2, 3]),
)
def test_word_converters_answer_or_reject_cleanly(bits, w, dtype, fn, ndim):
    """unpack_codes / to_faiss_bytes / from_faiss_bytes on arbitrary shapes, dtypes and bits:
    a correct answer for valid input, TypeError/ValueError otherwise."""
    shape = {1: (w,), 2: (3, w), 3: (1, 3, w)}[ndim]
    if fn == "from_faiss":
        shape = shape[:-1] + ((bits + 7) // 8 if bits > 0 and w else w,)
    if dtype.startswith("torch"):
        a = torch.zeros(shape, dtype=torch.int32)
    else:
        a = np.zeros(shape, dtype=dtype)
    try:
        if fn == "unpack":
            out = unpack_codes(a, bits)
        elif fn == "to_faiss":
            out = to_faiss_bytes(a, bits)
        else:
            out = from_faiss_bytes(a, bits)
    except P.BAD_INPUT:
        return
    assert bits >= 1 and ndim == 2, f"accepted bits={bits}, shape {shape}"
    if fn == "unpack":
        assert dtype in ("uint64", "int64") and w == P.nwords(bits)
        assert P.to_np(out).shape == (3, bits) and (P.to_np(out) == -1).all()
    elif fn == "to_faiss":
        assert dtype in ("uint64", "int64") and w == P.nwords(bits)
        assert out.shape == (3, (bits + 7) // 8) and not out.any()
    else:
        assert dtype == "uint8" and out.shape == (3, P.nwords(bits)) and not out.any()


# ----------------------------------------------------------------------------- the index


@st.composite
def index_ops(draw):
    """bits, a list of added batches (bool codes) and a query batch."""
    bits = draw(st.integers(1, 200))
    batches = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = draw(st.sampled_from([0.5, 0.05, 0.95]))
    added = [rng.random((n, bits)) < p for n in batches]
    nq = draw(st.integers(1, 5))
    queries = rng.random((nq, bits)) < p
    forms = draw(st.lists(st.sampled_from(CODE_FORMS + ["words", "torch-words"]),
                          min_size=len(added) + 1, max_size=len(added) + 1))
    return bits, added, queries, forms


def _index_input(b: np.ndarray, form: str):
    if form == "words":
        return P.pack_oracle(b)
    if form == "torch-words":
        return P.as_kind(P.pack_oracle(b), "torch.int64")
    return _encode(b, form)


def _check_index(index, gallery_words, qw, qin, k, r, m):
    d_ref = P.dist_oracle(qw, gallery_words, m)
    d, i = index.search(qin, k, m)
    assert isinstance(d, torch.Tensor) == isinstance(qin, torch.Tensor)
    rd, ri = P.topk_oracle(d_ref, k)
    np.testing.assert_array_equal(P.to_np(d), rd)
    np.testing.assert_array_equal(P.to_np(i), ri)
    lims, d, i = (P.to_np(a) for a in index.range_search(qin, r, m))
    rl, rrd, rri = P.radius_oracle(d_ref, r)
    np.testing.assert_array_equal(lims, rl)
    np.testing.assert_array_equal(d, rrd)
    np.testing.assert_array_equal(i, rri)


@given(ops=index_ops(), data=st.data(), mmap=st.booleans(), verify=st.booleans(),
       seg_rows=st.integers(1, 7))
def test_index_search_save_load_round_trip(ops, data, mmap, verify, seg_rows):
    bits, added, queries, forms = ops
    index = HammingIndex(bits)
    for b, form in zip(added, forms, strict=False):
        index.add(_index_input(b, form))
    gw = P.pack_oracle(np.concatenate(added))
    assert len(index) == index.ntotal == gw.shape[0]
    np.testing.assert_array_equal(index.words_array(), gw)
    qw = P.pack_oracle(queries)
    qin = _index_input(queries, forms[-1])
    m = data.draw(P.masks(qw.shape[0], qw.shape[1]), label="mask")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.fhidx")
        index.save(path)
        # small segments: a mapped gallery is searched in several pieces whose results merge
        with mock.patch.object(fi, "_SEGMENT_BYTES", 8 * P.nwords(bits) * seg_rows):
            loaded = HammingIndex.load(path, mmap=mmap, verify=verify)
            assert loaded.bits == bits and len(loaded) == gw.shape[0]
            np.testing.assert_array_equal(np.asarray(loaded.words_array()), gw)
            if gw.shape[0] == 0:
                with pytest.raises(ValueError):
                    loaded.search(qin, 1)
                return
            k = data.draw(st.integers(1, gw.shape[0]), label="k")
            r = data.draw(st.integers(0, bits), label="r")
            _check_index(index, gw, qw, qin, k, r, m)
            _check_index(loaded, gw, qw, qin, k, r, m)
            # adding to a loaded (maybe mapped) index copies it and keeps every code
            loaded.add(queries)
            gw2 = np.concatenate([gw, qw])
            _check_index(loaded, gw2, qw, qin, min(k + 1, gw2.shape[0]), r, m)
            del loaded


@given(ops=index_ops(), data=st.data(), mmap=st.booleans())
def test_index_file_corruption_is_detected_or_harmless(ops, data, mmap):
    """Flipping any byte or truncating the file: load raises ValueError, or (a flip in the
    header's zero padding) the loaded index holds exactly the saved codes."""
    bits, added, _, _ = ops
    index = HammingIndex(bits)
    for b in added:
        index.add(b)
    gw = index.words_array().copy()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.fhidx")
        index.save(path)
        raw = bytearray(open(path, "rb").read())
        how = data.draw(st.sampled_from(["flip", "truncate", "append"]), label="how")
        if how == "flip":
            pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
            raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="len")]
        else:
            raw += bytes(data.draw(st.integers(1, 16), label="extra"))
        with open(path, "wb") as f:
            f.write(raw)
        try:
            loaded = HammingIndex.load(path, mmap=mmap, verify=True)
        except ValueError:
            return
        assert how == "flip" and 36 <= pos < 4096, f"undetected {how} at {locals().get('pos')}"
        np.testing.assert_array_equal(np.asarray(loaded.words_array()), gw)
        del loaded


@given(
    bits=st.integers(1, 130),
    what=st.sampled_from(
        ["bits", "add-shape", "add-dtype", "add-tail", "add-values", "add-list", "k", "r",
         "query-shape", "mask", "empty-search", "load-garbage"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_index_rejects_bad_input_cleanly(bits, what, seed):
    rng = np.random.default_rng(seed)
    w = P.nwords(bits)
    good = rng.random((3, bits)) < 0.5
    index = HammingIndex(bits)
    if what not in ("empty-search",):
        index.add(good)
    note(what)
    bad_words = P.pack_oracle(good)
    if bits % 64:
        bad_words[0, -1] |= np.uint64(1) << np.uint64(63)
    calls = {
        "bits": lambda: HammingIndex([0, -1, -64, 2.0, True, "8"][seed % 6]),
        "add-shape": lambda: index.add(np.ones((3, bits + (2 if bits + 1 == w else 1)))),
        "add-dtype": lambda: index.add(np.ones((3, bits), dtype=np.complex64)),
        "add-tail": lambda: index.add(bad_words if bits % 64 else np.ones((3, bits), np.int8) * 3),
        "add-values": lambda: index.add(np.full((3, bits), 0.5, np.float32)),
        "add-list": lambda: index.add(good.tolist()),
        "k": lambda: index.search(good, [0, -1, 4, 100, 1.0, None][seed % 6]),
        "r": lambda: index.range_search(good, [-1, -5, 0.5, None][seed % 4]),
        "query-shape": lambda: index.search(np.ones((2, bits + 3), np.float32), 1),
        "mask": lambda: index.search(good, 1, np.zeros(w + 1, np.uint64)),
        "empty-search": lambda: index.search(good, 1),
    }
    if what == "load-garbage":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x")
            with open(path, "wb") as f:
                f.write(rng.bytes(int(rng.integers(0, 5000))))
            with pytest.raises(ValueError):
                HammingIndex.load(path)
        return
    with pytest.raises(P.BAD_INPUT):
        calls[what]()
