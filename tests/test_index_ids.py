"""HammingIndex ids: searches return ids in (distance, position) order, mixing and bad ids are
refused, remove_ids, file format version 2 (ids saved, mapped, checksummed; version 1 still
loads), pickling, FAISS IndexBinaryIDMap round trips and consistent snapshots under threads."""

import os
import pickle
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
import torch

import fasthash
from fasthash import _indexfile as F
from fasthash import index as I
from fasthash.index import HammingIndex


def _codes(n: int, bits: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (n, bits)).astype(np.uint8)


def _with_ids(bits: int, n: int, seed: int = 0) -> tuple[HammingIndex, np.ndarray, np.ndarray]:
    codes = _codes(n, bits, seed)
    ids = np.random.default_rng(seed + 1).permutation(10 * n)[:n].astype(np.int64) * 3 + 1
    index = HammingIndex(bits)
    index.add(codes, ids=ids)
    return index, codes, ids


def _same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _expect_ids(codes, ids, q, k, r, mask=None):
    """What an index with ids must return: the plain search, positions replaced by ids."""
    words, qw = fasthash.pack_codes(codes), fasthash.pack_codes(q)
    d, i = fasthash.hamming_topk(qw, words, k, mask)
    lims, rd, ri = fasthash.hamming_radius(qw, words, r, mask)
    return (d, ids[i]), (lims, rd, ids[ri])


# ----------------------------------------------------------------------------- searching


@pytest.mark.parametrize("bits", [13, 100])
def test_searches_return_ids_in_distance_position_order(bits):
    index, codes, ids = _with_ids(bits, 301)
    q = _codes(7, bits, seed=5)
    top, rad = _expect_ids(codes, ids, q, 17, bits // 3)
    _same(index.search(q, 17), top)
    _same(index.range_search(q, bits // 3), rad)
    mask = np.full(-(-bits // 64), 0x5555_5555_5555_5555, np.uint64)
    mask &= fasthash.pack_codes(np.ones((1, bits), np.uint8))[0]
    top_m, rad_m = _expect_ids(codes, ids, q, 5, 2, mask)
    _same(index.search(q, 5, mask), top_m)
    _same(index.range_search(q, 2, mask), rad_m)
    dt, it = index.search(torch.from_numpy(q), 17)
    assert isinstance(it, torch.Tensor) and it.dtype == torch.int64
    _same((dt, it), top)


def test_ties_follow_insertion_position_not_id_value():
    """Copies of one row get descending ids: a tie is ordered by position, so ids descend."""
    bits, copies = 100, 40
    row = _codes(1, bits)
    index = HammingIndex(bits)
    ids = np.arange(copies, dtype=np.int64)[::-1] * 7
    index.add(np.repeat(row, 15, axis=0), ids=ids[:15])
    index.add(np.repeat(row, copies - 15, axis=0), ids=ids[15:])
    d, i = index.search(row, copies)  # k = N
    assert d.tolist() == [[0] * copies]
    assert i.tolist() == [ids.tolist()]
    lims, _, ri = index.range_search(row, 0)
    assert lims.tolist() == [0, copies] and ri.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 40"):
        index.search(row, copies + 1)  # as hamming_topk: k > N is an error, never padded
    with pytest.raises(ValueError, match="k must satisfy"):
        fasthash.hamming_topk(fasthash.pack_codes(row), index.words_array(), copies + 1)


def test_duplicate_ids_are_separate_results_and_removed_together():
    index = HammingIndex(13)
    codes = _codes(6, 13)
    index.add(codes, ids=[5, 9, 5, 2, 9, 5])
    _, i = index.search(codes, 6)
    assert sorted(i[0].tolist()) == [2, 5, 5, 5, 9, 9]
    assert index.remove_ids(np.array([5])) == 3
    assert index.ids_array().tolist() == [9, 2, 9]
    np.testing.assert_array_equal(index.words_array(), fasthash.pack_codes(codes[[1, 3, 4]]))
    assert index.remove_ids([9, 9, 123456]) == 2  # a repeated or absent id counts once / not
    assert index.remove_ids([77]) == 0 and index.remove_ids([]) == 0
    assert index.ids_array().tolist() == [2] and len(index) == 1
    with pytest.raises(ValueError, match="read-only"):
        index.ids_array()[0] = 3  # handed-out arrays cannot change the index
    with pytest.raises(ValueError, match="read-only"):
        index.words_array()[0] = 3


def test_remove_ids_without_ids_removes_positions_and_later_codes_move_down():
    codes = _codes(10, 100)
    index = HammingIndex(100)
    index.add(codes)
    assert index.ids_array() is None
    assert index.remove_ids(torch.tensor([8, 0, 3, 3, 50])) == 3  # 50 >= len: ignored
    keep = [1, 2, 4, 5, 6, 7, 9]
    np.testing.assert_array_equal(index.words_array(), fasthash.pack_codes(codes[keep]))
    _, i = index.search(codes[[9]], 1)
    assert i.tolist() == [[6]]  # code 9 is at position 6 now
    assert index.remove_ids([7]) == 0 and len(index) == 7


def test_search_after_removal_equals_a_fresh_index():
    index, codes, ids = _with_ids(100, 400, seed=3)
    gone = ids[::3]
    assert index.remove_ids(gone) == len(gone)
    keep = ~np.isin(ids, gone)
    q = _codes(5, 100, seed=9)
    top, rad = _expect_ids(codes[keep], ids[keep], q, 30, 40)
    _same(index.search(q, 30), top)
    _same(index.range_search(q, 40), rad)


# ----------------------------------------------------------------------------- kinds and errors


def test_ids_and_no_ids_do_not_mix():
    codes = _codes(4, 13)
    plain = HammingIndex(13)
    plain.add(codes[:0], ids=[])  # no codes: decides nothing
    plain.add(codes)
    with pytest.raises(ValueError, match="added without ids, so codes cannot be added with ids"):
        plain.add(codes, ids=[1, 2, 3, 4])
    with_ids = HammingIndex(13)
    with_ids.add(codes[:0])
    with_ids.add(codes, ids=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="added with ids, so codes cannot be added without"):
        with_ids.add(codes)
    assert len(plain) == len(with_ids) == 4 and with_ids.has_ids and not plain.has_ids
    # emptied by remove_ids, each keeps its kind
    assert with_ids.remove_ids([1, 2, 3, 4]) == 4 and with_ids.ids_array().tolist() == []
    assert with_ids.has_ids and "ids" in repr(with_ids)
    with pytest.raises(ValueError, match="added with ids"):
        with_ids.add(codes)
    assert plain.remove_ids([0, 1, 2, 3]) == 4 and plain.ids_array() is None
    with pytest.raises(ValueError, match="added without ids"):
        plain.add(codes, ids=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="empty"):
        with_ids.search(codes, 1)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        pytest.param([1, -1, 2, -5], ValueError, r"ids must be >= 0 .* ids\[1\] = -1", id="neg"),
        pytest.param(np.array([0, 1, 2, -2**63]), ValueError, r"ids\[3\] = -9223372036854775808",
                     id="int64-min"),
        pytest.param([0, 1, 2], ValueError, r"ids must have shape \[4\] .*got \(3,\)", id="short"),
        pytest.param(np.zeros((4, 1), np.int64), ValueError, r"ids must have shape \[4\]",
                     id="2-d"),
        pytest.param(np.arange(4.0), TypeError, "ids must hold integers .*float64", id="float"),
        pytest.param([0, 1, 2.5, 3], TypeError, "ids must hold integers", id="float-list"),
        pytest.param(torch.ones(4, dtype=torch.bool), TypeError, "ids must hold integers",
                     id="bool-tensor"),
        pytest.param(np.ones(4, bool), TypeError, "ids must hold integers", id="bool"),
        pytest.param(torch.arange(4.0), TypeError, "ids must hold integers", id="float-tensor"),
        pytest.param(["a", "b", "c", "d"], TypeError, "ids must hold integers", id="str"),
        pytest.param(np.full(4, 2**63, np.uint64), ValueError, r"ids must be < 2\*\*63",
                     id="uint64-huge"),
        # Python ints beyond int64 make numpy pick float64 / object: a range error, not a type
        pytest.param([0, 1, 2, 2**63], ValueError, r"2\*\*63.*got 9223372036854775808",
                     id="list-2**63"),
        pytest.param([0, -1, 2, 2**63], ValueError,
                     r"ids must hold int64 ids in \[0, 2\*\*63\), got -1", id="list--1-and-2**63"),
        pytest.param((0, 1, 2, 2**64), ValueError, r"in \[0, 2\*\*63\), got 18446744073709551616",
                     id="tuple-2**64"),
        pytest.param(7, TypeError, "ids must be a numpy array, torch tensor or sequence",
                     id="scalar"),
    ],
)
def test_bad_ids_are_refused_naming_the_argument(ids, error, match):
    index = HammingIndex(13)
    with pytest.raises(error, match=match):
        index.add(_codes(4, 13), ids=ids)
    assert len(index) == 0  # nothing was added, and the kind is still open
    index.add(_codes(4, 13))


def test_ids_of_every_integer_kind_are_accepted_and_copied():
    index = HammingIndex(13)
    codes = _codes(3, 13)
    src = np.array([3, 1, 2], np.uint16)
    index.add(codes, ids=src)
    src[:] = 0  # the index holds a copy
    index.add(codes, ids=torch.tensor([4, 5, 6], dtype=torch.int32))
    index.add(codes, ids=range(7, 10))
    ids = index.ids_array()
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1, 2, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"ids\[0\] = -3"):
        index.remove_ids([-3])


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("verify", [True, False])
def test_save_load_keeps_ids(tmp_path, mmap, verify, monkeypatch):
    index, codes, ids = _with_ids(100, 503)
    path = tmp_path / "g.fhidx"
    index.save(path)
    head = F.parse_header(str(path), path.read_bytes()[: F.HEADER_SIZE], os.path.getsize(path))
    assert (head.version, head.flags, head.tables, head.count) == (2, 1, 0, 503)
    assert head.ids_offset % 4096 == 0 and os.path.getsize(path) == head.ids_offset + 8 * 503
    back = HammingIndex.load(path, mmap=mmap, verify=verify)
    assert ("mmap" in repr(back)) == mmap and back.file_tables == 0
    np.testing.assert_array_equal(back.ids_array(), ids)
    words, got_ids = back.snapshot()
    np.testing.assert_array_equal(words, index.words_array())
    np.testing.assert_array_equal(got_ids, ids)
    q = _codes(6, 100, seed=2)
    monkeypatch.setattr(I, "_SEGMENT_BYTES", 16 * 97)  # several segments, merged
    _same(back.search(q, 21), index.search(q, 21))
    _same(back.range_search(q, 38), index.range_search(q, 38))
    with pytest.raises(ValueError, match="added with ids"):
        back.add(codes[:2])


def test_empty_index_with_ids_keeps_its_kind_through_a_file(tmp_path):
    index = HammingIndex(13)
    index.add(_codes(2, 13), ids=[4, 4])
    index.remove_ids([4])
    index.save(tmp_path / "e")
    assert os.path.getsize(tmp_path / "e") == 4096
    back = HammingIndex.load(tmp_path / "e")
    assert len(back) == 0 and back.ids_array().tolist() == []
    with pytest.raises(ValueError, match="added with ids"):
        back.add(_codes(1, 13))


def test_tables_are_recorded_for_mih_files(tmp_path):
    index, _, _ = _with_ids(64, 10)
    index._save(tmp_path / "m", tables=5)
    assert HammingIndex.load(tmp_path / "m").file_tables == 5
    assert HammingIndex(64).file_tables == 0
    with pytest.raises(ValueError, match="tables"):
        index._save(tmp_path / "m", tables=-1)


def _write_v1(path, bits: int, words: np.ndarray) -> None:
    """A version 1 file, as fasthash before ids wrote it (32-byte header + CRC32, no ids)."""
    raw = np.ascontiguousarray(words, dtype="<u8").tobytes()
    head = struct.pack("<8sIIQII", b"FASTHASH", 1, bits, words.shape[0], words.shape[1],
                       zlib.crc32(raw))
    head += struct.pack("<I", zlib.crc32(head))
    with open(path, "wb") as f:
        f.write(head.ljust(4096, b"\0") + raw)


@pytest.mark.parametrize("mmap", [True, False])
def test_version_1_files_still_load(tmp_path, mmap):
    codes = _codes(257, 100, seed=4)
    words = fasthash.pack_codes(codes)
    _write_v1(tmp_path / "v1", 100, words)
    back = HammingIndex.load(tmp_path / "v1", mmap=mmap)
    assert len(back) == 257 and back.ids_array() is None and back.file_tables == 0
    np.testing.assert_array_equal(back.words_array(), words)
    _same(back.search(codes[:3], 9), fasthash.hamming_topk(words[:3], words, 9))
    raw = bytearray((tmp_path / "v1").read_bytes())
    raw[4096 + 77] ^= 0x10
    (tmp_path / "v1").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{tmp_path / 'v1'}: corrupted data"):
        HammingIndex.load(tmp_path / "v1", mmap=mmap)
    back.add(codes[:1], ids=None)  # a version 1 index holds codes without ids
    with pytest.raises(ValueError, match="added without ids"):
        back.add(codes[:1], ids=[1])


def _saved_with_ids(tmp_path, n: int = 300):
    index, _, _ = _with_ids(100, n)
    path = tmp_path / "i.fhidx"
    index.save(path)
    h = F.parse_header(str(path), path.read_bytes()[: F.HEADER_SIZE], os.path.getsize(path))
    return path, bytearray(path.read_bytes()), h


@pytest.mark.parametrize("mmap", [True, False])
def test_damaged_ids_sections_are_refused(tmp_path, mmap):
    path, good, h = _saved_with_ids(tmp_path)
    flip_id = bytearray(good)
    flip_id[h.ids_offset + 8 * 123 + 2] ^= 1
    gap = bytearray(good)
    gap[h.ids_offset - 1] = 1
    cases = {
        "corrupted ids": flip_id,
        "corrupted file .non-zero padding before the ids": gap,
        "truncated or padded": good[:-8],
    }
    for match, bad in cases.items():
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=f"{path}: {match}"):
            HammingIndex.load(path, mmap=mmap)
    # a negative id under a valid CRC32 (a crafted file) is refused too
    ids = np.frombuffer(bytes(good[h.ids_offset :]), "<i8").copy()
    ids[7] = -1
    raw = ids.astype("<i8").tobytes()
    bad = good[: h.ids_offset] + raw
    bad[: F.HEADER_SIZE] = F.pack_header(100, h.count, 2, h.data_crc, 1, 0, zlib.crc32(raw))
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=f"{path}: negative id -1"):
        HammingIndex.load(path, mmap=mmap)


def test_an_ids_checksum_without_ids_is_refused(tmp_path):
    """A header (valid CRC32) of a file without ids that records an ids CRC is crafted or
    corrupted: refused, like every other inconsistent field."""
    plain = HammingIndex(64)
    plain.add(np.arange(5, dtype=np.uint64).reshape(-1, 1))
    path = tmp_path / "plain"
    plain.save(path)
    raw = bytearray(path.read_bytes())
    h = F.parse_header(str(path), bytes(raw[: F.HEADER_SIZE]), len(raw))
    assert not h.has_ids and h.ids_crc == 0
    raw[: F.HEADER_SIZE] = F.pack_header(64, 5, 1, h.data_crc, 0, 7, 0xDEADBEEF)
    path.write_bytes(bytes(raw))
    for mmap in (True, False):
        with pytest.raises(ValueError, match=r"corrupted header \(ids CRC without ids\)"):
            HammingIndex.load(path, mmap=mmap)


def test_unknown_flags_and_versions_are_refused(tmp_path):
    path, good, h = _saved_with_ids(tmp_path, n=3)
    for fields, match in (((100, 3, 2, h.data_crc, 3, 0, h.ids_crc), "unsupported header flags"),
                          ((100, 3, 2, h.data_crc, 0, 0, h.ids_crc), "truncated or padded")):
        path.write_bytes(F.pack_header(*fields) + bytes(good[F.HEADER_SIZE :]))
        with pytest.raises(ValueError, match=match):
            HammingIndex.load(path)


def test_byte_flips_in_an_ids_file_are_always_refused(tmp_path):
    path, good, h = _saved_with_ids(tmp_path, n=200)
    rng = np.random.default_rng(11)
    offsets = list(rng.integers(0, len(good), 30)) + [32, 36, 40, 44, h.ids_offset - 1,
                                                       h.ids_offset, len(good) - 1]
    for off in offsets:
        bad = bytearray(good)
        bad[off] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(bad))
        for mmap in (True, False):
            with pytest.raises(ValueError, match=str(path)):
                HammingIndex.load(path, mmap=mmap)


def test_removing_from_a_mapped_index_copies_it_and_leaves_the_file(tmp_path):
    index, codes, ids = _with_ids(100, 250)
    path = tmp_path / "g"
    index.save(path)
    before = path.read_bytes()
    mapped = HammingIndex.load(path, mmap=True)
    assert mapped.remove_ids([10**9]) == 0 and "mmap" in repr(mapped)  # nothing to copy
    assert mapped.remove_ids(ids[100:]) == 150 and "ram" in repr(mapped)
    np.testing.assert_array_equal(mapped.ids_array(), ids[:100])
    np.testing.assert_array_equal(mapped.words_array(), fasthash.pack_codes(codes[:100]))
    assert path.read_bytes() == before
    plain = HammingIndex(100)
    plain.add(codes)
    plain.save(tmp_path / "p")
    mapped_plain = HammingIndex.load(tmp_path / "p", mmap=True)
    assert mapped_plain.remove_ids([0]) == 1 and len(mapped_plain) == 249
    np.testing.assert_array_equal(mapped_plain.words_array(), fasthash.pack_codes(codes[1:]))


# ----------------------------------------------------------------------------- copies, FAISS


@pytest.mark.parametrize("mmap", [True, False])
def test_pickle_keeps_ids_and_kind(tmp_path, mmap):
    index, codes, ids = _with_ids(13, 40)
    index._save(tmp_path / "p", tables=2)
    src = HammingIndex.load(tmp_path / "p", mmap=mmap)
    back = pickle.loads(pickle.dumps(src))
    assert "ram" in repr(back) and back.file_tables == 2
    np.testing.assert_array_equal(back.ids_array(), ids)
    _same(back.search(codes[:3], 5), index.search(codes[:3], 5))
    with pytest.raises(ValueError, match="added with ids"):
        back.add(codes)
    empty = pickle.loads(pickle.dumps(HammingIndex(13)))
    empty.add(codes, ids=ids)  # an undecided index stays undecided
    assert len(empty) == 40


class _HandoffLock:
    """A lock whose first release runs ``then`` at once: another thread's call taking the lock
    the moment it is free, a deterministic version of the worst thread interleaving."""

    def __init__(self, then):
        self._lock, self._then = threading.Lock(), [then]

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()
        if self._then:
            self._then.pop()()


def test_pickle_takes_the_kind_with_the_same_snapshot():
    """__getstate__ read the kind after its snapshot's lock was released: an add with ids
    landing in between pickled 'ids: yes' with no ids array (an index that crashes later)."""
    index = HammingIndex(64)
    index._lock = _HandoffLock(lambda: index.add(np.ones((1, 1), np.uint64), ids=[7]))
    back = pickle.loads(pickle.dumps(index))  # the add lands at the first release
    assert index.has_ids and index.ids_array().tolist() == [7]
    assert len(back) == 0 and not back.has_ids and back.ids_array() is None
    back.add(np.ones((1, 1), np.uint64), ids=[8])  # still undecided: either kind may come
    _same(back.search(np.ones((1, 1), np.uint64), 1), ([[0]], [[8]]))


def test_faiss_idmap_round_trip():
    faiss = pytest.importorskip("faiss")
    index, codes, ids = _with_ids(100, 120)
    f = index.to_faiss()
    assert isinstance(f, faiss.IndexBinaryIDMap) and f.ntotal == 120 and f.d == 104
    np.testing.assert_array_equal(faiss.vector_to_array(f.id_map), ids)
    fd, fi = f.search(fasthash.to_faiss_bytes(index.words_array()[:4], 100), 1)
    d, i = index.search(codes[:4], 1)
    np.testing.assert_array_equal(fd, d)
    np.testing.assert_array_equal(fi, i)  # own codes at distance 0, unique here
    back = HammingIndex.from_faiss(f)
    assert back.bits == 104 and len(back) == 120
    np.testing.assert_array_equal(back.ids_array(), ids)
    np.testing.assert_array_equal(back.words_array(), index.words_array())
    sub = faiss.IndexBinaryFlat(16)  # kept alive here: IndexBinaryIDMap2 does not hold it
    empty = HammingIndex.from_faiss(faiss.IndexBinaryIDMap2(sub))
    assert empty.ids_array().tolist() == []  # an empty IDMap is an index with ids
    assert isinstance(empty.to_faiss(), faiss.IndexBinaryIDMap)
    plain = HammingIndex(16)
    plain.add(_codes(3, 16))
    assert type(plain.to_faiss()) is faiss.IndexBinaryFlat
    bad = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(16))
    bad.add_with_ids(np.zeros((2, 2), np.uint8), np.array([3, -1]))
    with pytest.raises(ValueError, match=r"ids\[1\] = -1"):
        HammingIndex.from_faiss(bad)
    hashed = faiss.IndexBinaryHash(16, 4)
    with pytest.raises(TypeError, match="IndexBinaryIDMap around one"):
        HammingIndex.from_faiss(faiss.IndexBinaryIDMap(hashed))


# ----------------------------------------------------------------------------- threads


@pytest.fixture
def frequent_thread_switches():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleavings show within a second
    yield
    sys.setswitchinterval(old)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_snapshots_pair_words_and_ids_while_another_thread_adds_and_removes():
    """Code j carries id j (its single word is j): every snapshot and search must agree."""
    index, batches = HammingIndex(32), 400
    index.add(np.arange(8, dtype=np.uint64).reshape(-1, 1), ids=np.arange(8))
    errors, done = [], threading.Event()

    def writer():
        try:
            for lo in range(8, 8 * (batches + 1), 8):
                index.add(np.arange(lo, lo + 8, dtype=np.uint64).reshape(-1, 1),
                          ids=np.arange(lo, lo + 8))
                if lo % 64 == 0:
                    index.remove_ids([lo - 3])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    q, sizes = np.zeros((1, 1), np.uint64), set()
    while not done.is_set():
        words, ids = index.snapshot()
        assert words.shape[0] == ids.shape[0]
        np.testing.assert_array_equal(words[:, 0].astype(np.int64), ids)
        lims, d, i = index.range_search(q, 32)
        # the distance of code j to 0 is popcount(j): the ids found carry their own codes
        assert np.array_equal(d, np.bitwise_count(i.astype(np.uint64)).astype(np.int32))
        d8, top = index.search(q, 8)
        assert np.array_equal(d8, np.bitwise_count(top.astype(np.uint64)).astype(np.int32))
        sizes.add(int(lims[-1]))
    t.join()
    assert not errors, errors[0]
    assert len(index) == 8 * (batches + 1) - len(range(64, 8 * (batches + 1), 64))
    assert len(sizes) > 1  # the reads did overlap the writes
