"""HammingIndex: add/search/range_search, atomic versioned files, mmap search, corruption errors."""

import os
import struct

import numpy as np
import pytest
import torch

import fasthash
from fasthash import index as I
from fasthash import search as S
from fasthash.index import HammingIndex


@pytest.fixture
def codes():
    rng = np.random.default_rng(0)
    c = rng.choice([-1.0, 1.0], (2000, 100)).astype(np.float32)
    c[1000:1500] = c[:500]  # duplicates: ties broken by index
    return c


def test_add_accepts_codes_words_and_torch(codes):
    words = fasthash.pack_codes(codes)
    a, b, c = HammingIndex(100), HammingIndex(100), HammingIndex(100)
    a.add(codes)
    b.add(words[:700])
    b.add(torch.from_numpy(words[700:].view(np.int64)))
    c.add(torch.from_numpy(codes) > 0)
    assert len(a) == len(b) == len(c) == 2000
    for idx in (b, c):
        np.testing.assert_array_equal(idx.words_array(), a.words_array())
    d, i = a.search(codes[:5], 10)
    rd, ri = fasthash.hamming_topk(words[:5], words, 10)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    dt, it = a.search(torch.from_numpy(codes[:5]), 10)
    assert isinstance(dt, torch.Tensor)
    np.testing.assert_array_equal(it.numpy(), ri)
    lims, rd2, ri2 = a.range_search(words[:5], 40)
    el, ed, ei = fasthash.hamming_radius(words[:5], words, 40)
    for x, y in ((lims, el), (rd2, ed), (ri2, ei)):
        np.testing.assert_array_equal(x, y)


def test_add_rejects_bad_codes():
    idx = HammingIndex(70)
    with pytest.raises(ValueError, match="beyond bits=70"):
        idx.add(np.full((2, 2), 2**63, np.uint64))  # bit 127 set: not a 70-bit code
    with pytest.raises(ValueError, match="codes"):
        idx.add(np.ones((2, 71), np.float32))
    with pytest.raises(ValueError, match="empty"):
        idx.search(np.ones((1, 70), np.float32), 1)
    idx.add(np.ones((3, 70), np.float32))
    with pytest.raises(ValueError, match="k"):
        idx.search(np.ones((1, 70), np.float32), 4)
    with pytest.raises(ValueError, match="r"):
        idx.range_search(np.ones((1, 70), np.float32), -1)
    with pytest.raises(ValueError, match="bits"):
        HammingIndex(0)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path, codes, mmap, monkeypatch):
    idx = HammingIndex(100)
    idx.add(codes)
    path = tmp_path / "g.fhidx"
    idx.save(path)
    assert os.listdir(tmp_path) == ["g.fhidx"]  # the temporary file was renamed away
    back = HammingIndex.load(path, mmap=mmap)
    assert len(back) == 2000 and back.bits == 100
    q = codes[::97]
    ref = idx.search(q, 25)
    mask = np.full((q.shape[0], 2), 0x0F0F0F0F0F0F0F0F, np.uint64)
    ref_m = idx.search(q, 25, mask=mask)
    ref_r = idx.range_search(q, 35)
    # small segments: the mapped gallery is searched piecewise and the pieces merged
    monkeypatch.setattr(I, "_SEGMENT_BYTES", 16 * 333)
    for got, want in ((back.search(q, 25), ref), (back.search(q, 25, mask=mask), ref_m),
                      (back.range_search(q, 35), ref_r)):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    back.add(codes[:3])  # a mapped index becomes an in-RAM copy before it changes
    assert len(back) == 2003


def test_moved_names_are_re_exported():
    assert fasthash.HammingIndex is S.HammingIndex is HammingIndex


def test_empty_index_roundtrip(tmp_path):
    HammingIndex(8).save(tmp_path / "e")
    assert len(HammingIndex.load(tmp_path / "e")) == 0


def _saved(tmp_path, codes):
    idx = HammingIndex(100)
    idx.add(codes[:300])
    path = tmp_path / "c.fhidx"
    idx.save(path)
    return path, bytearray(path.read_bytes())


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[: len(b) - 8], "truncated"),
        (lambda b: b[:100], "truncated"),
        (lambda b: b[:10], "not a fasthash index"),
        (lambda b: b"NOTFAST!" + b[8:], "not a fasthash index"),
        (lambda b: b[:4096 + 50] + bytes([b[4096 + 50] ^ 4]) + b[4096 + 51 :], "corrupted data"),
        (lambda b: b[:12] + bytes([b[12] ^ 1]) + b[13:], "corrupted header"),
        (lambda b: b + b"\0" * 8, "truncated or padded"),
    ],
)
def test_damaged_files_raise(tmp_path, codes, damage, match, mmap):
    path, raw = _saved(tmp_path, codes)
    path.write_bytes(bytes(damage(raw)))
    with pytest.raises(ValueError, match=match):
        HammingIndex.load(path, mmap=mmap)


def test_future_version_is_refused(tmp_path, codes):
    path, raw = _saved(tmp_path, codes)
    head = bytearray(raw[: I._HEADER.size])
    head[8:12] = struct.pack("<I", 99)
    fixed = bytes(head) + struct.pack("<I", __import__("zlib").crc32(bytes(head)))
    path.write_bytes(fixed + bytes(raw[len(fixed) :]))
    with pytest.raises(ValueError, match="version 99"):
        HammingIndex.load(path)


def test_faiss_roundtrip(codes):
    faiss = pytest.importorskip("faiss")
    idx = HammingIndex(100)
    idx.add(codes)
    f = idx.to_faiss()
    assert isinstance(f, faiss.IndexBinaryFlat) and f.ntotal == 2000
    fd, _ = f.search(fasthash.to_faiss_bytes(idx.words_array()[:4], 100), 5)
    d, _ = idx.search(codes[:4], 5)
    np.testing.assert_array_equal(fd, d)  # same distances (FAISS breaks ties differently)
    back = HammingIndex.from_faiss(f)
    assert back.bits == 104 and len(back) == 2000
    np.testing.assert_array_equal(back.words_array(), idx.words_array())


@pytest.mark.parametrize("mmap", [True, False])
def test_pickle_and_copy_keep_the_codes(tmp_path, codes, mmap):
    import copy
    import pickle

    idx = HammingIndex(100)
    idx.add(codes[:50])
    idx.save(tmp_path / "p")
    src = HammingIndex.load(tmp_path / "p", mmap=mmap)
    for back in (pickle.loads(pickle.dumps(src)), copy.deepcopy(src)):
        assert back.bits == 100 and len(back) == 50 and "ram" in repr(back)
        np.testing.assert_array_equal(back.words_array(), idx.words_array())
        back.add(codes[50:60])  # an independent index with its own lock
        assert len(back) == 60 and len(src) == 50
