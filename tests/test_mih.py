"""MIHIndex (exact multi-index hashing) equals the linear scan and the reference, bit for bit."""

import pickle

import numpy as np
import pytest
import torch

import fasthash
from fasthash.mih import MIHIndex, default_num_tables
from fasthash.reference import radius_ref, topk_ref

C = pytest.importorskip("fasthash._C")
LEVELS = C.available_simd_levels()


@pytest.fixture(params=LEVELS)
def level(request):
    """Each SIMD level this CPU has, made the level in use (it runs the scan fallback)."""
    before = C.simd_level()
    C.set_simd_level(request.param)
    yield request.param
    C.set_simd_level(before)


def tail_mask(bits):
    w = (bits + 63) // 64
    m = np.full(w, np.uint64(2**64 - 1))
    if bits % 64:
        m[-1] = np.uint64((1 << (bits % 64)) - 1)
    return m


def clustered(rng, n, bits, clusters, flips, dup=0.0):
    """Centroids with a few flipped bits (what MIH prunes well); ``dup`` of the rows copied."""
    w = (bits + 63) // 64
    cent = rng.integers(0, 2**64, (clusters, w), dtype=np.uint64) & tail_mask(bits)
    x = cent[rng.integers(0, clusters, n)]
    for _ in range(flips):
        b = rng.integers(0, bits, n)
        x[np.arange(n), b // 64] ^= np.left_shift(np.uint64(1), (b % 64).astype(np.uint64))
    nd = int(dup * n)
    if nd:
        x[n - nd:] = x[rng.integers(0, n - nd, nd)]
    return x


def np_topk(q, x, m=None):
    """Full distance matrix + stable argsort (every k is a prefix)."""
    diff = q[:, None, :] ^ x[None, :, :]
    if m is not None:
        diff &= m.reshape(-1, 1, q.shape[1]) if m.ndim == 2 else m
    d = np.bitwise_count(diff).sum(-1).astype(np.int64)
    i = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, i, 1), i


def check_topk(index, q, x, ks, m=None, method="mih", ids=None):
    rd, ri = np_topk(q, x, m)
    for k in ks:
        d, i = index.search(q, k, m, method=method, num_threads=2)
        assert d.dtype == np.int32 and i.dtype == np.int64
        np.testing.assert_array_equal(d, rd[:, :k])
        np.testing.assert_array_equal(i, ri[:, :k] if ids is None else ids[ri[:, :k]])


def check_radius(index, q, x, rs, m=None, method="mih"):
    for r in rs:
        got = index.range_search(q, r, m, method=method, num_threads=2)
        want = fasthash.hamming_radius(q, x, r, m)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", [13, 32, 100, 128])
def test_exact_at_every_level_and_width(level, bits):
    rng = np.random.default_rng(bits)
    n = 1500
    x = clustered(rng, n, bits, 20, 3, dup=0.3)  # heavy ties: duplicated rows
    q = np.concatenate([x[:7], clustered(rng, 9, bits, 20, 5)])
    for m in (None, default_num_tables(bits, n), -(-bits // 64)):
        index = MIHIndex(bits, num_tables=m)
        index.add(x)
        check_topk(index, q, x, (1, 10, 257, n))
        check_radius(index, q, x, (0, 2, 7, bits, bits + 5))
    rd, ri = topk_ref(q, x, 40)  # THE spec agrees
    d, i = index.search(q, 40, method="mih")
    np.testing.assert_array_equal(d, rd.numpy())
    np.testing.assert_array_equal(i, ri.numpy())
    lims, d, i = index.range_search(q, 3, method="mih")
    rl, rdd, rii = radius_ref(q, x, 3)
    np.testing.assert_array_equal(lims, rl.numpy())
    np.testing.assert_array_equal(i, rii.numpy())


def test_uniform_codes_auto_and_forced(level):
    """Uniform random codes (MIH prunes little): every method gives the scan's answer."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**64, (5000, 1), dtype=np.uint64)
    q = rng.integers(0, 2**64, (40, 1), dtype=np.uint64)
    index = MIHIndex(64)
    index.add(x)
    for method in ("auto", "mih", "scan"):
        check_topk(index, q, x, (1, 100), method=method)
        check_radius(index, q, x, (0, 12, 64), method=method)
    assert index.num_tables == default_num_tables(64, 5000) == 5


def test_galleries_smaller_than_a_bucket_and_all_tied():
    for n in (1, 2, 3):
        x = np.full((n, 2), 7, np.uint64)  # every code identical: one bucket, all tied
        index = MIHIndex(100, num_tables=4)
        index.add(x)
        q = np.array([[7, 0], [0, 1]], np.uint64)
        check_topk(index, q, x, range(1, n + 1))
        check_radius(index, q, x, (0, 3, 100))


def test_masks_mih_path_and_scan_fallback(level):
    rng = np.random.default_rng(5)
    bits, n = 64, 6000
    x = clustered(rng, n, bits, 30, 3, dup=0.2)
    q = clustered(rng, 24, bits, 30, 4)
    index = MIHIndex(bits, num_tables=3)
    index.add(x)
    few_off = ~np.uint64(0b1011 << 20)  # 3 wildcards in one table: probed
    per_query = ~(rng.integers(0, 2**64, (24, 1), dtype=np.uint64) & np.uint64(0x0101_0000_0303))
    tables = C.MIHTables(x, bits, 3)
    for m in (few_off.reshape(1), per_query):
        assert tables.topk(q, 5, m, float("inf"))[2].all()  # MIH answered every query
        check_topk(index, q, x, (1, 5, 300), m)
        check_radius(index, q, x, (0, 4, 9), m)
    # every table loses > 10 of its ~21 bits: no table is usable, the scan answers (still exact)
    heavy = np.full(1, np.uint64(0x8888_8888_8888_8888))
    mixed = np.where(np.arange(24)[:, None] % 2 == 0, heavy, per_query)
    assert not tables.topk(q, 5, heavy, float("inf"))[2].any()
    assert tables.topk(q, 5, mixed, float("inf"))[2].tolist() == [i % 2 == 1 for i in range(24)]
    for m in (heavy, mixed, np.zeros(1, np.uint64)):
        for method in ("mih", "auto"):
            check_topk(index, q, x, (1, 50), m, method=method)
            check_radius(index, q, x, (0, 6), m, method=method)


def test_budget_aborts_to_scan_stay_exact():
    """m = 1 on 64-bit codes: one 64-bit substring, far neighbours; the budget sends every query
    to the scan, and auto gives up on the rest after 16 queries."""
    rng = np.random.default_rng(8)
    x = rng.integers(0, 2**64, (5000, 1), dtype=np.uint64)
    q = rng.integers(0, 2**64, (70, 1), dtype=np.uint64)
    tables = C.MIHTables(x, 64, 1)
    d, i, done, stats = tables.topk(q, 10, None, 5000.0 * 0.25, 0.6)
    assert not done.any() and stats["not_done"] == 70
    assert stats["probes"] < 20 * 5000 * 0.25 / C.MIH_PROBE_COST  # given up early
    index = MIHIndex(64, num_tables=1)
    index.add(x)
    check_topk(index, q, x, (1, 10))
    check_radius(index, q, x, (20,))


def test_ids_remove_and_rebuild():
    rng = np.random.default_rng(9)
    x = clustered(rng, 5000, 64, 25, 2, dup=0.4)
    ids = rng.permutation(10**6)[:5000].astype(np.int64)
    index = MIHIndex(64)
    index.add(x[:3000], ids[:3000])
    index.add(x[3000:], ids[3000:])
    q = x[::250].copy()
    check_topk(index, q, x, (1, 20), ids=ids)
    gone = ids[rng.choice(5000, 700, replace=False)]
    assert index.remove_ids(np.concatenate([gone, [10**7]])) == 700
    keep = ~np.isin(ids, gone)
    check_topk(index, q, x[keep], (1, 20, int(keep.sum())), ids=ids[keep])
    lims, d, i = index.range_search(q, 3, method="mih")
    rl, rd, ri = fasthash.hamming_radius(q, x[keep], 3)
    np.testing.assert_array_equal(lims, rl)
    np.testing.assert_array_equal(i, ids[keep][ri])
    plain = MIHIndex(64)  # without ids: positions, later codes move down
    plain.add(x)
    assert plain.remove_ids(np.arange(0, 5000, 2)) == 2500
    check_topk(plain, q, x[1::2], (1, 30))


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load(tmp_path, mmap):
    rng = np.random.default_rng(10)
    x = clustered(rng, 4000, 128, 40, 4)
    q = x[::97].copy()
    index = MIHIndex(128, num_tables=5)
    index.add(x, np.arange(4000, dtype=np.int64) * 3)
    path = tmp_path / "g.fhidx"
    index.save(path)
    back = MIHIndex.load(path, mmap=mmap)
    assert back.num_tables == 5 and len(back) == 4000 and back.has_ids
    check_topk(back, q, x, (1, 7, 4000), ids=np.arange(4000) * 3)
    back.build()
    assert back.table_bytes() >= 4000 * 5 * 20
    plain = fasthash.HammingIndex(128)  # a plain HammingIndex file: default m
    plain.add(x)
    plain.save(tmp_path / "p.fhidx")
    other = MIHIndex.load(tmp_path / "p.fhidx", mmap=mmap)
    assert other.num_tables == default_num_tables(128, 4000)
    check_topk(other, q, x, (3,))


def test_corrupted_file_is_refused_with_its_path(tmp_path):
    index = MIHIndex(64, num_tables=2)
    index.add(np.arange(100, dtype=np.uint64).reshape(100, 1))
    path = tmp_path / "g.fhidx"
    index.save(path)
    raw = bytearray(path.read_bytes())
    raw[4096 + 17] ^= 0x40  # a flipped data bit: the CRC32 catches it
    bad = tmp_path / "bad.fhidx"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.fhidx"):
        MIHIndex.load(bad)
    # a header naming 70 tables for 64-bit codes: refused by the MIH layer, path named
    inner = fasthash.HammingIndex(64)
    inner.add(np.arange(5, dtype=np.uint64).reshape(5, 1))
    inner._save(tmp_path / "t.fhidx", tables=70)
    with pytest.raises(ValueError, match="t.fhidx.*num_tables"):
        MIHIndex.load(tmp_path / "t.fhidx")


def test_bad_input():
    with pytest.raises(ValueError, match="num_tables"):
        MIHIndex(64, num_tables=0)
    with pytest.raises(ValueError, match="num_tables"):
        MIHIndex(128, num_tables=1)  # a 128-bit substring
    with pytest.raises(ValueError, match="num_tables"):
        MIHIndex(13, num_tables=14)
    with pytest.raises(TypeError, match="num_tables"):
        MIHIndex(13, num_tables=2.5)
    with pytest.raises(ValueError, match="bits"):
        MIHIndex(20000)
    index = MIHIndex(64)
    with pytest.raises(ValueError, match="empty"):
        index.search(np.zeros((1, 1), np.uint64), 1)
    index.add(np.arange(10, dtype=np.uint64).reshape(10, 1))
    with pytest.raises(ValueError, match="codes"):
        index.add(np.zeros((2, 63), np.float32))  # wrong bit length
    with pytest.raises(ValueError, match="queries"):
        index.search(np.zeros((2, 2), np.uint64), 1, method="mih")
    with pytest.raises(ValueError, match="method"):
        index.search(np.zeros((1, 1), np.uint64), 1, method="fast")
    with pytest.raises(ValueError, match="method"):
        index.range_search(np.zeros((1, 1), np.uint64), 1, method=None)
    with pytest.raises(ValueError, match="k"):
        index.search(np.zeros((1, 1), np.uint64), 11, method="mih")
    with pytest.raises(ValueError, match="mask"):
        index.search(np.zeros((3, 1), np.uint64), 1, np.zeros((2, 1), np.uint64), method="mih")
    with pytest.raises(ValueError, match="ids"):
        index.add(np.zeros((1, 1), np.uint64), ids=[1])  # mixing kinds
    with pytest.raises(ValueError, match="num_tables"):
        C.MIHTables(np.zeros((3, 1), np.uint64), 64, 65)
    with pytest.raises(ValueError, match="words"):
        C.MIHTables(np.zeros((3, 2), np.uint64), 64, 2)


def test_torch_queries_and_faiss_roundtrip():
    rng = np.random.default_rng(12)
    x = clustered(rng, 300, 64, 5, 2)
    index = MIHIndex(64, num_tables=3)
    index.add(torch.from_numpy(x.view(np.int64)))
    q = torch.from_numpy(x[:4].view(np.int64))
    d, i = index.search(q, 5, method="mih")
    assert isinstance(d, torch.Tensor)
    rd, ri = fasthash.hamming_topk(x[:4], x, 5)
    np.testing.assert_array_equal(i.numpy(), ri)
    pytest.importorskip("faiss")
    back = MIHIndex.from_faiss(index.to_faiss(), num_tables=2)
    assert back.num_tables == 2 and "MIHIndex" in repr(back)
    again = pickle.loads(pickle.dumps(back))
    assert again.num_tables == 2
    check_topk(again, x[:4], x, (2,))
    check_topk(back, x[:4], x, (5,))
    import faiss

    mh = faiss.IndexBinaryMultiHash(64, 4, 16)
    mh.add(fasthash.to_faiss_bytes(x, 64))
    from_mh = MIHIndex.from_faiss(mh)
    assert from_mh.num_tables == 4
    check_topk(from_mh, x[:4], x, (1, 300))


def test_fuzz_small_random_configs():
    """Many tiny random configurations: widths, table counts, ks, radii and masks."""
    rng = np.random.default_rng(13)
    for trial in range(40):
        bits = int(rng.integers(1, 200))
        n = int(rng.integers(1, 400))
        x = clustered(rng, n, bits, int(rng.integers(1, 6)), int(rng.integers(0, 4)), 0.3)
        q = np.concatenate([x[: int(rng.integers(0, 3))], clustered(rng, 3, bits, 2, 2)])
        m = int(rng.integers(-(-bits // 64), min(bits, 12) + 1))
        index = MIHIndex(bits, num_tables=m)
        index.add(x)
        mask = None
        if trial % 3 == 0:
            mask = ~(rng.integers(0, 2**64, (q.shape[0], (bits + 63) // 64), dtype=np.uint64)
                     & rng.integers(0, 2**64, (1,), dtype=np.uint64)
                     & rng.integers(0, 2**64, (1,), dtype=np.uint64))
        check_topk(index, q, x, sorted({1, int(rng.integers(1, n + 1)), n}), mask)
        check_radius(index, q, x, (0, int(rng.integers(0, bits + 2))), mask)



# ----------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("kind", ["identical", "two codes"])
def test_huge_buckets_abort_before_reading_them(kind):
    """Duplicate codes make one bucket of ~N entries: a query stops before reading it (its
    budget would be passed) and is finished by the scan, exactly; the engine's counters show
    no bucket entry was read."""
    rng = np.random.default_rng(14)
    n = 20000
    x = np.full((n, 1), 0x1234, np.uint64)
    if kind == "two codes":
        x[rng.integers(0, 2, n) == 1] = np.uint64(0xFFFF0000FFFF)
    q = np.concatenate([x[:5], rng.integers(0, 2**64, (6, 1), dtype=np.uint64)])
    index = MIHIndex(64)
    index.add(x)
    for method in ("auto", "mih"):
        check_topk(index, q, x, (1, 10), method=method)
        check_radius(index, q, x, (0, 3), method=method)
    words = index.words_array()
    tables = index._tables_for(words)
    for method in ("auto", "mih"):
        budget, give_up = index._budget(words, method)
        _, _, done, st = tables.topk(x[:5], 10, None, budget, give_up, 2)
        assert not done.any() and st["aborted"] == 5, st
        assert st["entries"] == 0 and st["cost"] <= 5 * C.MIH_PROBE_COST, st
    # a small batch stops too: 12 aborted queries pass 0.4 scans x 16 after 6 of them
    budget, give_up = index._budget(words, "auto")
    _, _, done, st = tables.topk(np.repeat(x[:1], 12, 0), 1, None, budget, give_up, 2)
    assert not done.any() and st["given_up"] >= 3, st


def test_truncated_map_raises_for_mih_instead_of_sigbus(tmp_path):
    import pathlib
    import subprocess
    import sys
    import textwrap

    code = """
        import os, sys
        import numpy as np
        from fasthash import MIHIndex
        path = sys.argv[1]
        x = np.random.default_rng(0).integers(0, 2**63, (200_000, 1), dtype=np.uint64)
        a = MIHIndex(64)
        a.add(x, ids=np.arange(200_000))
        a.save(path)
        b, c = MIHIndex.load(path, mmap=True), MIHIndex.load(path, mmap=True)
        c.search(x[:2], 1, method="mih")  # built before the truncation
        os.truncate(path, 4096 + 8 * 100)
        for name, call in [("mih", lambda: b.search(x[:2], 1, method="mih")),
                           ("auto", lambda: b.search(x[:2], 1, method="auto")),
                           ("build", b.build),
                           ("radius", lambda: b.range_search(x[:2], 3, method="mih")),
                           ("built", lambda: c.search(x[:2], 1, method="mih"))]:
            try:
                call()
            except OSError as e:
                assert path in str(e) and "shrank" in str(e), (name, e)
            else:
                raise SystemExit(name + " did not raise")
        print("OK")
    """
    root = pathlib.Path(fasthash.__file__).parents[1]  # the package this test imported
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "g.fhidx")],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    assert out.stdout.split()[-1] == "OK"


def test_save_records_only_a_user_table_count(tmp_path):
    rng = np.random.default_rng(15)
    x = rng.integers(0, 2**64, (5000, 1), dtype=np.uint64)
    for n in (0, 100):
        index = MIHIndex(64)
        index.add(x[:n])
        index.save(tmp_path / "d.fhidx")
        back = MIHIndex.load(tmp_path / "d.fhidx", mmap=False)
        back.add(x[n:])
        assert back.num_tables == default_num_tables(64, 5000) == 5  # chosen for the new N
        check_topk(back, x[:3], x, (2,))
    fixed = MIHIndex(64, num_tables=7)
    fixed.save(tmp_path / "f.fhidx")
    back = MIHIndex.load(tmp_path / "f.fhidx", mmap=False)
    back.add(x)
    assert back.num_tables == 7


def test_build_refused_without_memory(monkeypatch):
    import fasthash.mih as mih

    x = np.random.default_rng(16).integers(0, 2**64, (5000, 1), dtype=np.uint64)
    index = MIHIndex(64)
    index.add(x)
    monkeypatch.setattr(mih, "_available_memory", lambda: 10**5)
    need = 5 * 5000 * 12
    for call in (index.build, lambda: index.search(x[:2], 1, method="mih")):
        with pytest.raises(MemoryError, match=f"num_tables = 5 .*{need} bytes"):
            call()
    check_topk(index, x[:3], x, (4,), method="auto")  # auto scans instead
    check_topk(index, x[:3], x, (4,), method="scan")
    assert index.table_bytes() == 0
    monkeypatch.setattr(mih, "_available_memory", lambda: need)
    index.build()
    assert index.table_bytes() > 0


@pytest.mark.skipif("libasan" in __import__("os").environ.get("LD_PRELOAD", ""),
                    reason="ASan reserves the address space that RLIMIT_AS limits")
def test_bad_alloc_in_the_build_is_a_memory_error():
    import pathlib
    import subprocess
    import sys
    import textwrap

    code = """
        import resource
        import numpy as np
        import fasthash._C as C
        x = np.zeros((4_000_000, 1), np.uint64)
        C.MIHTables(x[:10], 64, 2)  # the pool's threads start before the limit
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (150 << 20), hard))
        try:
            C.MIHTables(x, 64, 16, 2)  # 16 x 4e6 x 12 bytes of entries
        except MemoryError:
            print("OK")
    """
    root = pathlib.Path(fasthash.__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["OK"], (out.stdout, out.stderr)


def test_rebuild_drops_old_tables_and_keeps_the_newest(monkeypatch):
    import fasthash.mih as mih

    x = np.random.default_rng(17).integers(0, 2**64, (6000, 1), dtype=np.uint64)
    index = MIHIndex(64)
    index.add(x[:3000])
    index.build()
    old = index._index._snapshot()
    index.add(x[3000:])
    seen, real = [], mih._C.MIHTables
    monkeypatch.setattr(mih._C, "MIHTables", lambda *a: seen.append(index._built) or real(*a))
    index.build()
    assert seen == [None]  # the old tables were released before the new build
    newest = index._built
    assert newest[0].shape[0] == 6000
    stale = index._tables_for(old[0], old[2])  # a search that took its snapshot before the add
    assert stale.n == 3000 and index._built is newest
    check_topk(index, x[:3], x, (5,))


def test_faiss_multihash_with_few_tables():
    faiss = pytest.importorskip("faiss")
    x = np.random.default_rng(18).integers(0, 2**64, (500, 2), dtype=np.uint64)
    mh = faiss.IndexBinaryMultiHash(128, 1, 16)  # nhash = 1 < ceil(128 / 64): default m
    mh.add(fasthash.to_faiss_bytes(x, 128))
    back = MIHIndex.from_faiss(mh)
    assert back.num_tables == default_num_tables(128, 500)
    check_topk(back, x[:4], x, (1, 9))


def test_engine_default_budget_is_finite():
    """The binding's default budget is 4 scans: a radius no probe order can reach quickly
    (m = 2 tables of 50 bits, r = 60) stops and is left to the scan."""
    x = np.random.default_rng(19).integers(0, 2**36, (3000, 2), dtype=np.uint64)
    tables = C.MIHTables(x, 100, 2)
    lims, d, i, done, st = tables.radius(x[:3], 60)
    assert not done.any() and st["aborted"] == 3 and lims[-1] == 0
    assert st["cost"] <= 3 * (4 * 3000 * 2 + C.MIH_PROBE_COST)
    with pytest.raises(ValueError, match="budget"):
        tables.topk(x[:1], 1, None, 0.0)
    _, _, done, st = tables.topk(x[:2], 1, None, float("inf"))  # unlimited
    assert done.all() and st["aborted"] == 0
