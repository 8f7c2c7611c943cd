"""HammingIndex under faults: concurrent adds and searches lose nothing, truncated maps raise
instead of SIGBUS, special / sparse / damaged files are refused, and a killed save leaves the old
file intact and no temporary behind."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import pytest

from fasthash import _indexfile as F
from fasthash.index import HammingIndex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BITS, BATCH = 32, 8  # codes are their own ids: 32-bit words 0, 1, 2, ...


def _python(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120, **kw,
    )


def _ids(lo: int, n: int) -> np.ndarray:
    return np.arange(lo, lo + n, dtype=np.uint64).reshape(n, 1)


def _write_raw(path, bits: int, words: np.ndarray, count: int | None = None) -> None:
    """An index file with a valid header and CRC around arbitrary words."""
    raw = np.ascontiguousarray(words, dtype="<u8").tobytes()
    n = words.shape[0] if count is None else count
    with open(path, "wb") as f:
        f.write(F.pack_header(bits, n, words.shape[1], zlib.crc32(raw)))
        f.write(raw)


# ----------------------------------------------------------------------------- threads


def _hammer(index: HammingIndex, n0: int, adds: int) -> int:
    """2 threads add batches of new ids while 2 threads search; returns the codes added.

    Every search must see a whole number of batches (all or none of an add), never fewer codes
    than before, and exactly the ids 0 .. n - 1 (checked by the caller at the end).
    """
    added, errors, done = [0, 0], [], threading.Event()
    next_id = [n0]
    id_lock = threading.Lock()
    q = np.zeros((1, 1), np.uint64)

    def adder(slot: int) -> None:
        for _ in range(adds):
            with id_lock:
                lo, next_id[0] = next_id[0], next_id[0] + BATCH
            index.add(_ids(lo, BATCH))
            added[slot] += BATCH

    def searcher() -> None:
        seen = n0
        while not done.is_set():
            lims, _, i = index.range_search(q, BITS)
            n = int(lims[-1])
            if n < seen or (n - n0) % BATCH or not np.array_equal(np.sort(i), np.arange(n)):
                raise AssertionError(f"a search saw {n} codes after {seen}")
            d, _ = index.search(q, 1)  # never "empty", never a k error
            assert d.shape == (1, 1)
            seen = n

    def run(f, *a):
        try:
            f(*a)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    searchers = [threading.Thread(target=run, args=(searcher,)) for _ in range(2)]
    adders = [threading.Thread(target=run, args=(adder, j)) for j in range(2)]
    for t in searchers + adders:
        t.start()
    for t in adders:
        t.join()
    done.set()
    for t in searchers:
        t.join()
    assert not errors, errors[0]
    return sum(added)


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every 10 us (default 5 ms) so that interleavings show within seconds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.mark.usefixtures("frequent_thread_switches")
@pytest.mark.parametrize("where", ["ram", "mmap"])
def test_concurrent_adds_and_searches_lose_nothing(tmp_path, where):
    n0 = 64
    start = HammingIndex(BITS)
    start.add(_ids(0, n0))
    start.save(tmp_path / "g")
    stop = time.monotonic() + 3.0
    for _ in range(40):  # fresh indexes until ~3 s are spent
        if where == "ram":
            index = HammingIndex(BITS)
            index.add(_ids(0, n0))
        else:
            index = HammingIndex.load(tmp_path / "g", mmap=True)
        total = _hammer(index, n0, adds=300)
        assert len(index) == n0 + total == n0 + 2 * 300 * BATCH
        np.testing.assert_array_equal(np.sort(index.words_array()[:, 0]), np.arange(n0 + total))
        lims, _, i = index.range_search(np.zeros((1, 1), np.uint64), BITS)
        assert lims[-1] == n0 + total and np.array_equal(np.sort(i), np.arange(n0 + total))
        if time.monotonic() > stop:
            break


@pytest.mark.usefixtures("frequent_thread_switches")
def test_first_add_to_a_mapped_index_races_no_search(tmp_path):
    """The add that copies a map into RAM, while 2 threads search: never "empty", nothing lost."""
    base = HammingIndex(BITS)
    base.add(_ids(0, 4000))
    base.save(tmp_path / "g")
    q = np.zeros((4, 1), np.uint64)
    for _ in range(40):
        index = HammingIndex.load(tmp_path / "g", mmap=True)
        errors, done = [], threading.Event()

        def search(index=index, errors=errors, done=done):
            try:
                while not done.is_set():
                    index.search(q, 3)
                    assert index.range_search(q, 0)[0][-1] == 1 * 4  # code 0, once per query
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=search) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.002)
        index.add(_ids(4000, BATCH))
        done.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert len(index) == 4000 + BATCH


# ----------------------------------------------------------------------------- truncation


def test_truncated_mapped_file_raises_instead_of_sigbus(tmp_path):
    path = str(tmp_path / "g.fhidx")
    code = """
        import os, sys
        import numpy as np
        from fasthash.index import HammingIndex
        path = sys.argv[1]
        idx = HammingIndex(64)
        idx.add(np.arange(200_000, dtype=np.uint64).reshape(-1, 1))
        idx.save(path)
        m = HammingIndex.load(path, mmap=True)
        with_ids = HammingIndex(64)
        with_ids.add(idx.words_array(), ids=np.arange(200_000))
        with_ids.save(path + ".ids")
        w = HammingIndex.load(path + ".ids", mmap=True)
        q = np.zeros((2, 1), np.uint64)
        m.search(q, 3)
        os.truncate(path, 4096 + 8 * 100)  # another writer truncates the mapped files
        os.truncate(path + ".ids", 4096 + 8 * 100)
        for name, call in [("search", lambda: m.search(q, 3)),
                           ("range_search", lambda: m.range_search(q, 2)),
                           ("save", lambda: m.save(path + ".copy")),
                           ("add", lambda: m.add(q)),
                           ("remove_ids", lambda: m.remove_ids([5])),
                           ("remove_ids with ids", lambda: w.remove_ids([5])),
                           ("search with ids", lambda: w.search(q, 3))]:
            try:
                call()
            except OSError as e:
                assert path in str(e) and "shrank" in str(e), (name, e)
                print(name, "raised")
            else:
                raise SystemExit(name + " did not raise")
        print("OK")
    """
    out = _python(code, path)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    assert out.stdout.split()[-1] == "OK" and not os.path.exists(path + ".copy")


# ----------------------------------------------------------------------------- special files


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    result = []

    def load():
        try:
            HammingIndex.load(fifo)
        except Exception as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("HammingIndex.load blocked on a FIFO")
    assert isinstance(result[0], ValueError), result
    assert "is not a regular file (a FIFO)" in str(result[0]) and fifo in str(result[0])


@pytest.mark.parametrize("where", ["dir", "/dev/null"])
def test_directories_and_devices_are_refused(tmp_path, where):
    path = str(tmp_path) if where == "dir" else where
    with pytest.raises(ValueError, match="is not a regular file"):
        HammingIndex.load(path)


@pytest.mark.parametrize("mmap", [True, False])
def test_sparse_file_declaring_2_33_codes_is_refused_at_once(tmp_path, mmap):
    path = tmp_path / "sparse"
    count = 1 << 33  # 64 GiB of declared codes
    with open(path, "wb") as f:
        f.write(F.pack_header(64, count, 1, 0))
        f.truncate(F.HEADER_SIZE + 8 * count)
    if os.stat(path).st_blocks * 512 >= os.stat(path).st_size:
        pytest.skip("this file system does not keep sparse files")
    t0 = time.monotonic()
    try:
        with pytest.raises(ValueError, match="sparse file .* 8589934592 declared codes"):
            HammingIndex.load(path, mmap=mmap)
        assert time.monotonic() - t0 < 5
    finally:
        path.unlink()


@pytest.mark.parametrize("mmap", [True, False])
def test_bits_beyond_bits_are_refused_on_load(tmp_path, mmap):
    words = np.zeros((500, 2), np.uint64)
    words[321, 1] = np.uint64(1 << 63)  # bit 127 of a 100-bit code
    _write_raw(tmp_path / "t", 100, words)
    with pytest.raises(ValueError, match="bits set beyond bits=100"):
        HammingIndex.load(tmp_path / "t", mmap=mmap)
    with pytest.raises(ValueError, match="beyond bits=100"):
        HammingIndex(100).add(words)  # the same codes, as add sees them


def test_random_byte_flips_are_always_refused(tmp_path):
    rng = np.random.default_rng(7)
    idx = HammingIndex(100)
    idx.add(rng.integers(0, 2, (300, 100)))
    path = tmp_path / "c.fhidx"
    idx.save(path)
    good = path.read_bytes()
    offsets = rng.integers(0, len(good), 50)
    offsets[:4] = [40, 2000, 4095, 4096]  # header padding and the first data byte
    known = ("not a fasthash index|corrupted header|corrupted data|unsupported index version"
             "|inconsistent header|truncated or padded")
    for off in offsets:
        bad = bytearray(good)
        bad[off] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(bad))
        for mmap in (True, False):
            with pytest.raises(ValueError, match=known):
                HammingIndex.load(path, mmap=mmap)


# ----------------------------------------------------------------------------- saving


def test_save_keeps_the_mode_of_an_existing_file(tmp_path):
    idx = HammingIndex(8)
    idx.add(np.ones((3, 8), np.float32))
    old = tmp_path / "old"
    old.write_bytes(b"x")
    for mode in (0o644, 0o640):
        os.chmod(old, mode)
        idx.save(old)
        assert stat.S_IMODE(os.stat(old).st_mode) == mode
    umask = os.umask(0o022)
    os.umask(umask)
    idx.save(tmp_path / "new")  # like open(): 0666 less the umask
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["new", "old"]


@pytest.mark.parametrize("then", ["load", "save"])
def test_killed_save_keeps_the_old_file_and_its_temporary_is_removed(tmp_path, then):
    path = str(tmp_path / "g.fhidx")
    old = HammingIndex(128)
    old.add(np.arange(64, dtype=np.uint64).reshape(-1, 2))
    old.save(path)
    good = open(path, "rb").read()
    code = """
        import os, sys, time
        import numpy as np
        from fasthash.index import HammingIndex
        big = HammingIndex(128)
        big.add(np.ones((1 << 20, 2), np.uint64))  # 16 MiB
        def stall(fd):  # the whole temporary is written: hold here until killed
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stall
        big.save(sys.argv[1])
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), path], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = [n for n in os.listdir(tmp_path) if n != "g.fhidx"]
    assert len(left) == 1 and os.path.getsize(tmp_path / left[0]) > 16 << 20
    assert open(path, "rb").read() == good  # the old file is untouched
    live = tmp_path / ".g.fhidx.tmp1.0123abcd"  # pid 1 is alive: its temporary stays
    live.write_bytes(b"")
    if then == "load":
        back = HammingIndex.load(path, mmap=False)
        np.testing.assert_array_equal(back.words_array(), old.words_array())
    else:
        old.save(path)
    assert sorted(os.listdir(tmp_path)) == [live.name, "g.fhidx"]
