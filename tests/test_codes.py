"""Packing, unpacking, the sign STE and FAISS layout interop are exact and reject bad input."""

import numpy as np
import pytest
import torch

from fasthash.codes import (
    as_search_words,
    as_words,
    from_faiss_bytes,
    num_words,
    pack_codes,
    sign_ste,
    to_faiss_bytes,
    unpack_codes,
)

LENGTHS = [1, 13, 40, 64, 100, 128, 256, 300]


def _loop_pack(bits: np.ndarray) -> np.ndarray:
    """Explicit per-bit packing: the layout written out by hand."""
    n, length = bits.shape
    out = np.zeros((n, num_words(length)), dtype=np.uint64)
    for i in range(n):
        for j in range(length):
            if bits[i, j]:
                out[i, j // 64] |= np.uint64(1) << np.uint64(j % 64)
    return out


@pytest.mark.parametrize("length", LENGTHS, ids=lambda v: f"L{v}")
def test_pack_matches_explicit_loop_and_round_trips(length):
    rng = np.random.default_rng(length)
    bits = rng.random((7, length)) > 0.5
    pm = np.where(bits, 1.0, -1.0).astype(np.float32)
    expected = _loop_pack(bits)
    for codes in (pm, bits, bits.astype(np.int64), torch.from_numpy(pm), torch.from_numpy(bits)):
        words = pack_codes(codes)
        got = words.numpy().view(np.uint64) if isinstance(words, torch.Tensor) else words
        np.testing.assert_array_equal(got, expected)
        back = unpack_codes(words, length)
        back = back.numpy() if isinstance(back, torch.Tensor) else back
        np.testing.assert_array_equal(back, pm)
    assert expected.shape == (7, num_words(length))


def test_padding_bits_are_zero_and_popcount_is_hamming():
    rng = np.random.default_rng(0)
    a = np.where(rng.random((5, 100)) > 0.5, 1.0, -1.0)
    b = np.where(rng.random((5, 100)) > 0.5, 1.0, -1.0)
    wa, wb = pack_codes(a), pack_codes(b)
    assert (wa[:, 1] >> np.uint64(36)).max() == 0
    ham = np.bitwise_count(wa ^ wb).sum(axis=1)
    np.testing.assert_array_equal(ham, (a != b).sum(axis=1))


def test_torch_pack_keeps_device_and_dtype():
    words = pack_codes(torch.ones(3, 70))
    assert words.dtype == torch.int64 and words.device.type == "cpu"
    assert words[0, 0].item() == -1  # all 64 bits set, read as int64
    assert words[0, 1].item() == 0b111111


def test_sign_ste_forward_and_identity_gradient():
    x = torch.tensor([-2.0, -0.0, 0.0, 0.3, 5.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]
    g = torch.tensor([0.5, -1.0, 2.0, 3.0, -4.0])
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize(
    "codes, match",
    [
        pytest.param(np.array([[1.0, 0.0]]), "-1 and \\+1", id="float-zero"),
        pytest.param(np.array([[1.0, np.nan]]), "NaN", id="nan"),
        pytest.param(torch.tensor([[1.0, float("inf")]]), "NaN or inf", id="inf-torch"),
        pytest.param(np.array([[2, 0]]), "0 and 1", id="int-two"),
        pytest.param(torch.tensor([[0.5, -1.0]]), "-1 and \\+1", id="half-torch"),
        pytest.param(np.ones(4), "2-D", id="1d"),
    ],
)
def test_pack_rejects_bad_codes(codes, match):
    with pytest.raises(ValueError, match=match):
        pack_codes(codes)


def test_pack_rejects_bits_mismatch_and_wrong_types():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.ones((2, 8)), bits=9)
    with pytest.raises(TypeError, match="codes"):
        pack_codes([[1, -1]])
    with pytest.raises(ValueError, match="words per row"):
        unpack_codes(np.zeros((2, 2), dtype=np.uint64), 64)
    with pytest.raises(TypeError, match="words"):
        unpack_codes(np.zeros((2, 1), dtype=np.float32), 64)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sign_ste(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("length", [8, 13, 64, 100, 256], ids=lambda v: f"L{v}")
def test_faiss_bytes_round_trip(length):
    rng = np.random.default_rng(length)
    words = pack_codes(rng.random((6, length)) > 0.5)
    u8 = to_faiss_bytes(words, length)
    assert u8.dtype == np.uint8 and u8.shape == (6, (length + 7) // 8)
    np.testing.assert_array_equal(from_faiss_bytes(u8, length), words)
    with pytest.raises(ValueError, match="bytes per row"):
        from_faiss_bytes(u8[:, :1], length + 64)


def test_from_faiss_rejects_bits_beyond_length():
    with pytest.raises(ValueError, match="beyond"):
        from_faiss_bytes(np.array([[0xFF]], dtype=np.uint8), 3)


def test_faiss_distances_agree():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    for length in (16, 40, 100):
        q = pack_codes(rng.random((5, length)) > 0.5)
        x = pack_codes(rng.random((50, length)) > 0.5)
        index = faiss.IndexBinaryFlat(8 * ((length + 7) // 8))
        index.add(to_faiss_bytes(x, length))
        d, i = index.search(to_faiss_bytes(q, length), 50)
        full = np.bitwise_count(q[:, None, :] ^ x[None, :, :]).sum(-1)
        np.testing.assert_array_equal(np.take_along_axis(full, i, axis=1), d)
        np.testing.assert_array_equal(np.sort(full, axis=1), d)


def test_as_words_views_without_copying_and_converts_kinds():
    x = np.array([[1, 2**63], [3, 4]], dtype=np.uint64)
    t = as_words(x, to="torch")
    assert t.dtype == torch.int64 and t.data_ptr() == x.ctypes.data
    back = as_words(t)
    assert back.dtype == np.uint64 and back.ctypes.data == x.ctypes.data
    assert as_words(torch.from_numpy(x.view(np.int64)).view(torch.uint64)).tolist() == x.tolist()
    assert as_words(x[:, :1], contiguous=False).shape == (2, 1)
    assert as_words(x[0], ndim=(1, 2)).shape == (2,)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_as_words_checks_the_code_length(kind):
    w = np.zeros((3, 2), dtype=np.uint64)
    w[1, 1] = np.uint64(1) << np.uint64(6)  # bit 70 of a 70-bit code: beyond it
    words = w if kind == "numpy" else torch.from_numpy(w.view(np.int64))
    as_words(words, bits=71, to=kind)
    with pytest.raises(ValueError, match="codes has bits set beyond bits=70"):
        as_words(words, "codes", bits=70, to=kind)
    as_words(words, bits=70, to=kind, check_tail=False)
    with pytest.raises(ValueError, match="words per row for bits=200"):
        as_words(words, bits=200, to=kind)
    w[1, 1] = np.uint64(2**63)
    with pytest.raises(ValueError, match="beyond bits=127"):
        as_words(words, bits=127, to=kind)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        pytest.param(lambda: as_words(np.zeros((2, 1), np.int32), "gallery"), TypeError,
                     "gallery must be packed words", id="dtype"),
        pytest.param(lambda: as_words([[1]], "queries"), TypeError, "queries must be a numpy",
                     id="list"),
        pytest.param(lambda: as_words(np.zeros(3, np.uint64), "q"), ValueError, "q must be 2-D",
                     id="ndim"),
        pytest.param(lambda: as_words(np.zeros((4, 2), np.uint64)[::2], "x", contiguous=True),
                     ValueError, "x must be C-contiguous", id="strided"),
        pytest.param(lambda: as_words(np.zeros((1, 1), np.uint64), bits=0), ValueError,
                     "bits must satisfy bits >= 1, got 0", id="bits0"),
        pytest.param(lambda: as_search_words(np.zeros((2, 1), np.uint64),
                                             np.zeros((3, 2), np.uint64)),
                     ValueError, "same number of words", id="pair-words"),
        pytest.param(lambda: as_search_words(np.zeros((2, 1), np.uint64),
                                             np.zeros((0, 1), np.uint64)),
                     ValueError, "gallery must contain at least one code", id="pair-empty"),
        pytest.param(lambda: as_search_words(np.zeros((2, 1), np.uint64),
                                             np.zeros((3, 1), np.uint64),
                                             np.zeros((3, 1), np.uint64)),
                     ValueError, "mask must be one mask", id="mask-rows"),
    ],
)
def test_as_words_messages_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_as_search_words_canonical_mask_and_devices():
    q, x = np.zeros((2, 1), np.uint64), np.ones((3, 1), np.uint64)
    for m in (np.ones(1, np.uint64), np.ones((1, 1), np.uint64)):
        assert as_search_words(q, x, m)[2].shape == (1, 1)
    tq, tx, tm = as_search_words(q, x, np.ones((2, 1), np.uint64), to="torch")
    assert tq.dtype == tx.dtype == tm.dtype == torch.int64 and tm.shape == (2, 1)
    _, e, _ = as_search_words(q, x[:0], nonempty=False)
    assert e.shape == (0, 1)
    with pytest.raises(ValueError, match="must be on the CPU"):
        as_search_words(torch.zeros(2, 1, dtype=torch.int64, device="meta"), x)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        pytest.param(lambda w: as_words(w, bits=1.5), TypeError,
                     r"^bits must be an integer, got float$", id="as_words-float"),
        pytest.param(lambda w: as_words(w, bits=True), TypeError,
                     r"^bits must be an integer, got bool$", id="as_words-bool"),
        pytest.param(lambda w: unpack_codes(w, None), TypeError,
                     r"^bits must be an integer, got NoneType$", id="unpack-none"),
        pytest.param(lambda w: unpack_codes(w, "3"), TypeError,
                     r"^bits must be an integer, got str$", id="unpack-str"),
        pytest.param(lambda w: unpack_codes(w, 2.5), TypeError,
                     r"^bits must be an integer, got float$", id="unpack-float"),
        pytest.param(lambda w: pack_codes(np.ones((2, 3)), bits="3"), TypeError,
                     r"^bits must be an integer, got str$", id="pack-str"),
        pytest.param(lambda w: pack_codes(np.ones((2, 3)), bits=3.5), TypeError,
                     r"^bits must be an integer, got float$", id="pack-float"),
        pytest.param(lambda w: to_faiss_bytes(w, None), TypeError,
                     r"^bits must be an integer, got NoneType$", id="to_faiss-none"),
        pytest.param(lambda w: from_faiss_bytes(np.zeros((1, 1), np.uint8), None), TypeError,
                     r"^bits must be an integer, got NoneType$", id="from_faiss-none"),
        pytest.param(lambda w: num_words("a"), TypeError,
                     r"^bits must be an integer, got str$", id="num_words-str"),
        pytest.param(lambda w: __import__("fasthash").HammingIndex(2**21), ValueError,
                     r"^bits must satisfy 1 <= bits <= 1048576, got 2097152$", id="index-big"),
    ],
)
def test_bad_bits_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call(np.zeros((2, 1), np.uint64))


def test_unpack_zero_rows_gives_an_empty_result():
    for length in (3, 64, 100):
        w = np.zeros((0, num_words(length)), np.uint64)
        out = unpack_codes(w, length)
        assert out.shape == (0, length) and out.dtype == np.float32
        t = unpack_codes(torch.from_numpy(w.view(np.int64)), length)
        assert t.shape == (0, length) and t.dtype == torch.float32
        assert pack_codes(out).shape == (0, num_words(length))  # and back


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda: pack_codes(torch.ones(2, 3, device="meta")),
                     r"^codes must be on the CPU or a CUDA device, got meta$", id="pack"),
        pytest.param(lambda: unpack_codes(torch.zeros(2, 1, dtype=torch.int64, device="meta"), 3),
                     r"^words must be on the CPU or a CUDA device, got meta$", id="unpack"),
        pytest.param(lambda: as_words(torch.zeros(2, 1, dtype=torch.int64, device="meta"), "m",
                                      to="torch"),
                     r"^m must be on the CPU or a CUDA device, got meta$", id="as_words"),
    ],
)
def test_meta_tensors_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()
