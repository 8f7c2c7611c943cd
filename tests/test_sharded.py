"""ShardedHammingIndex on a real local Ray cluster equals hamming_topk / hamming_radius on the
concatenated shards, bit for bit (ties across shard boundaries included), survives a killed
actor, fails clearly when a shard is lost, and refuses bad shard files at from_files."""

import os
import shutil
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fasthash[ray]')")

import fasthash  # noqa: E402
from fasthash import HammingIndex, hamming_radius, hamming_topk, pack_codes  # noqa: E402
from fasthash.sharded import ShardedHammingIndex, ShardError  # noqa: E402

FRACTION = 0.2  # CPUs per shard actor: the long-lived actors share the 2-CPU cluster


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the whole module (Ray start-up costs seconds)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _codes(rng, n: int, bits: int, runs: list[tuple[int, int]]) -> np.ndarray:
    """Random ±1 codes with rows [lo, hi) of each run set to one repeated code (ties)."""
    x = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, bits))
    for lo, hi in runs:
        x[lo:hi] = x[lo]
    return x


@pytest.fixture(scope="module")
def tmp_mod(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


def _from_parts(x: np.ndarray, sizes: list[int], folder) -> ShardedHammingIndex:
    """Save consecutive rows of x as files of the given sizes and open them as shards."""
    paths, lo = [], 0
    folder.mkdir(exist_ok=True)
    for j, size in enumerate(sizes):
        part = HammingIndex(x.shape[1])
        part.add(x[lo : lo + size])
        paths.append(str(folder / f"shard-{j}.fhidx"))
        part.save(paths[-1])
        lo += size
    return ShardedHammingIndex.from_files(paths, num_cpus=FRACTION)


def _open_64(folder):
    """64 bits, 3 shards of 200: duplicated runs straddle both shard boundaries."""
    x = _codes(np.random.default_rng(64), 600, 64, [(190, 215), (385, 410), (598, 600)])
    return ShardedHammingIndex.build(x, 3, folder / "b64", num_cpus=FRACTION), x


def _open_100(folder):
    """100 bits with ids, built from a HammingIndex: 2 shards, a duplicated run across the
    boundary (ties between ids decided by position, as in the one-node index)."""
    x = _codes(np.random.default_rng(100), 200, 100, [(90, 115)])
    source = HammingIndex(100)
    source.add(x, ids=np.random.default_rng(1).permutation(200) * 7 + 10**12)
    return ShardedHammingIndex.build(source, 2, folder / "b100", num_cpus=FRACTION), x, source


def _open_13(folder):
    """13 bits (8192 possible codes: ties everywhere): a shard of one code (fewer than k) whose
    code repeats in the next shard."""
    x = _codes(np.random.default_rng(13), 501, 13, [(0, 9)])
    return _from_parts(x, [1, 500], folder / "u13"), x


@pytest.fixture(scope="module")
def idx64(cluster, tmp_mod):
    index, x = _open_64(tmp_mod)
    yield index, x
    index.close()


@pytest.fixture(scope="module")
def idx100(cluster, tmp_mod):
    index, x, source = _open_100(tmp_mod)
    yield index, x, source
    index.close()


@pytest.fixture(scope="module")
def idx13(cluster, tmp_mod):
    index, x = _open_13(tmp_mod)
    yield index, x
    index.close()


def _queries(rng, x: np.ndarray, q: int) -> np.ndarray:
    """Gallery rows (exact hits on the duplicated runs) and random codes."""
    picks = x[rng.integers(0, x.shape[0], q // 2)]
    rand = rng.choice(np.array([-1.0, 1.0], np.float32), size=(q - q // 2, x.shape[1]))
    return np.concatenate([x[[0, 200 if x.shape[0] > 200 else 1]], picks, rand])


def _check_topk(index, x, q, k, mask=None):
    d, i = index.search(q, k, mask)
    d0, i0 = hamming_topk(pack_codes(q), pack_codes(x), k, mask)
    assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == (q.shape[0], k)
    np.testing.assert_array_equal(d, d0)
    np.testing.assert_array_equal(i, i0)


def _check_radius(index, x, q, r, mask=None):
    got = index.range_search(q, r, mask)
    want = hamming_radius(pack_codes(q), pack_codes(x), r, mask)
    assert [a.dtype for a in got] == [np.int64, np.int32, np.int64]
    assert got[0][-1] > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("k", [1, 7, 25, 199, 600], ids=lambda k: f"k{k}")
def test_topk_64_bits_ties_across_boundaries(idx64, k):
    index, x = idx64
    assert len(index) == 600 and index.bits == 64 and index.num_shards == 3
    _check_topk(index, x, _queries(np.random.default_rng(k), x, 21), k)


@pytest.mark.parametrize("k", [1, 10, 99, 200], ids=lambda k: f"k{k}")
def test_topk_100_bits_with_ids(idx100, k):
    """Shards whose files carry ids return those ids, exactly as the one-node index does."""
    index, x, source = idx100
    assert [(s["count"], s["offset"], s["has_ids"]) for s in index.shards] == [
        (100, 0, True), (100, 100, True)]
    q = _queries(np.random.default_rng(k), x, 9)
    d, i = index.search(q, k)
    d0, i0 = source.search(q, k)
    np.testing.assert_array_equal(d, d0)
    np.testing.assert_array_equal(i, i0)
    assert i.min() >= 10**12  # ids, not positions
    for got, want in zip(index.range_search(q, 44), source.range_search(q, 44), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k", [1, 2, 4, 40, 501], ids=lambda k: f"k{k}")
def test_topk_13_bits_tiny_shards(idx13, k):
    index, x = idx13
    assert [(s["count"], s["offset"]) for s in index.shards] == [(1, 0), (500, 1)]
    _check_topk(index, x, _queries(np.random.default_rng(k), x, 33), k)


def test_small_batches_and_window(idx64):
    """Many batches in flight (a batch of 4 queries, window 2) give the same answer."""
    index, x = idx64
    index._batch, index._window = 4, 2
    try:
        _check_topk(index, x, _queries(np.random.default_rng(5), x, 31), 30)
        _check_radius(index, x, _queries(np.random.default_rng(6), x, 31), 27)
    finally:
        index._batch, index._window = 1024, 3


def test_masks_global_and_per_query(idx64, idx13):
    rng = np.random.default_rng(3)
    for index, x in (idx64, idx13):
        q = _queries(rng, x, 12)
        w = fasthash.codes.num_words(x.shape[1])
        one = rng.integers(0, 2**63, size=w, dtype=np.uint64)
        per = rng.integers(0, 2**63, size=(q.shape[0], w), dtype=np.uint64)
        per[3] = 0  # an all-zero mask: distance 0 to everything, ties broken by global index
        for mask in (one, per):
            _check_topk(index, x, q, 12, mask)
            _check_radius(index, x, q, 20 if x.shape[1] > 13 else 3, mask)


def test_masks_with_ids(idx100):
    index, x, source = idx100
    rng = np.random.default_rng(4)
    q = _queries(rng, x, 6)
    per = rng.integers(0, 2**63, size=(q.shape[0], 2), dtype=np.uint64)
    per[:, 1] &= np.uint64((1 << 36) - 1)
    for got, want in zip(index.search(q, 15, per), source.search(q, 15, per), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("r", [0, 24, 64])
def test_radius_64_bits(idx64, r):
    index, x = idx64
    _check_radius(index, x, _queries(np.random.default_rng(r), x, 14), r)


@pytest.mark.parametrize("r", [0, 3, 13])
def test_radius_13_bits(idx13, r):
    index, x = idx13
    _check_radius(index, x, _queries(np.random.default_rng(r), x, 10), r)


def test_query_forms_and_empty_batch(idx64):
    """Codes, packed words and torch tensors are accepted like HammingIndex.search; Q = 0."""
    index, x = idx64
    q = _queries(np.random.default_rng(8), x, 6)
    d0, i0 = index.search(q, 5)
    d1, i1 = index.search(pack_codes(q), 5)
    d2, i2 = index.search(torch.from_numpy(q), 5)
    assert isinstance(d2, torch.Tensor) and d2.dtype == torch.int32 and i2.dtype == torch.int64
    for a, b in ((d0, d1), (i0, i1), (d0, d2.numpy()), (i0, i2.numpy())):
        np.testing.assert_array_equal(a, b)
    lims, d, i = index.range_search(torch.from_numpy(q), 30)
    assert isinstance(lims, torch.Tensor) and lims.shape == (q.shape[0] + 1,)
    d, i = index.search(np.zeros((0, 1), np.uint64), 4)
    assert d.shape == i.shape == (0, 4)
    assert index.range_search(np.zeros((0, 1), np.uint64), 4)[0].tolist() == [0]


def test_argument_errors(idx64, tmp_mod):
    index, x = idx64
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 600, got 601"):
        index.search(x[:2], 601)
    with pytest.raises(ValueError, match="k must satisfy"):
        index.search(x[:2], 0)
    with pytest.raises(ValueError, match=r"queries must be codes \[N, 64\]"):
        index.search(x[:2, :10], 3)
    with pytest.raises(ValueError, match="mask must be one mask"):
        index.search(x[:2], 3, np.zeros((3, 1), np.uint64))
    with pytest.raises(ValueError, match="r must satisfy"):
        index.range_search(x[:2], -1)
    with pytest.raises(ValueError, match="num_shards must satisfy 1 <= num_shards <= 2"):
        ShardedHammingIndex.build(x[:2], 3, tmp_mod / "never")
    with pytest.raises(ValueError, match="bits is required"):
        ShardedHammingIndex.build(pack_codes(x[:2]), 1, tmp_mod / "never")
    with pytest.raises(ValueError, match="at least one index file"):
        ShardedHammingIndex.from_files([])
    with pytest.raises(TypeError, match="not one path"):
        ShardedHammingIndex.from_files(str(tmp_mod / "b64"))


# ----------------------------------------------------------------------------- refusals


def test_from_files_refuses_missing_file(cluster, tmp_mod):
    missing = str(tmp_mod / "no-such.fhidx")
    with pytest.raises(FileNotFoundError, match="shard 0: .*no-such.fhidx"):
        ShardedHammingIndex.from_files([missing], num_cpus=FRACTION)


def test_from_files_refuses_corrupted_file(idx13, tmp_mod):
    bad = str(tmp_mod / "corrupt.fhidx")
    shutil.copy(idx13[0].paths[1], bad)
    with open(bad, "r+b") as f:  # one flipped bit in the codes: the CRC32 no longer matches
        f.seek(4096 + 17)
        byte = f.read(1)[0]
        f.seek(4096 + 17)
        f.write(bytes([byte ^ 4]))
    with pytest.raises(ValueError, match="shard 0: .*corrupt.fhidx"):
        ShardedHammingIndex.from_files([bad], num_cpus=FRACTION)


def test_from_files_refuses_other_bit_length(idx64, idx13):
    good, other = idx64[0].paths[0], idx13[0].paths[0]
    with pytest.raises(ValueError, match=r"shard 1: .*u13.* holds 13-bit codes, but the first"):
        ShardedHammingIndex.from_files([good, other], num_cpus=FRACTION)


# ----------------------------------------------------------------------------- faults


def _pid_after_kill(actor, old_pid: int) -> int | None:
    """The actor's pid once ``ray.kill`` (asynchronous) took effect: a new pid after a restart,
    None when it is dead for good."""
    for _ in range(300):
        try:  # a restart imports torch again: minutes on a saturated 2-core machine
            pid = ray.get(actor.pid.remote(), timeout=300)
        except ray.exceptions.RayActorError:
            return None
        if pid != old_pid:
            return pid
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers from its old process")


def test_killed_actor_restarts_and_search_is_retried(idx64):
    """Shard 1 is killed right after the first batch went out: Ray restarts it from its file,
    the calls are retried and the result is exact."""
    index, x = idx64
    actor = index._shards[1].actor
    pid = ray.get(actor.pid.remote())
    index._batch = 8

    def kill(batch: int) -> None:
        if batch == 0:
            ray.kill(actor, no_restart=False)

    index._after_submit = kill
    try:
        _check_topk(index, x, _queries(np.random.default_rng(11), x, 40), 9)
    finally:
        index._after_submit, index._batch = None, 1024
    assert _pid_after_kill(actor, pid) is not None  # restarted, in a new process
    _check_topk(index, x, _queries(np.random.default_rng(12), x, 7), 600)


def test_restart_on_a_replaced_file_fails_clearly(idx13):
    """A shard restarted on a file replaced since from_files refuses to answer: the search
    raises a ShardError naming the shard and its file, never a result from other codes."""
    index, x = idx13
    other = HammingIndex(13)
    other.add(x[:0:-1].copy())  # as many codes as before, in another order
    other.save(index.paths[1])
    actor = index._shards[1].actor
    pid = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=False)
    assert _pid_after_kill(actor, pid) is not None  # restarted on the new file
    with pytest.raises(ShardError, match=r"shard 1 \(.*u13/shard-1.fhidx\): .*replaced"):
        index.search(x[:3], 4)


def test_dead_shard_fails_clearly_and_close(idx13):
    index, x = idx13
    actor = index._shards[0].actor
    pid = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=True)
    assert _pid_after_kill(actor, pid) is None
    with pytest.raises(ShardError, match=r"shard 0 \(.*u13/shard-0.fhidx\): .*died") as e:
        index.range_search(x[:3], 2)
    assert e.value.shard == 0 and e.value.path == index.paths[0]
    with index:
        pass  # the context manager closes it
    with pytest.raises(ValueError, match="closed"):
        index.search(x[:1], 1)
    assert ray.is_initialized()  # a cluster the caller started is left running
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(index._shards[1].actor.pid.remote(), timeout=30)


def test_local_cluster_started_and_shut_down(monkeypatch):
    """Without a joined cluster the index starts a local one and shuts it down with its last
    user (ray.init / shutdown are stubbed: the module's real cluster stays up)."""
    from fasthash import _sharded_support as sharded

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls) and calls[-1] == "init")
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    assert sharded._acquire_cluster() and sharded._acquire_cluster()
    sharded._release_cluster(True)
    assert calls == ["init"]
    sharded._release_cluster(True)
    assert calls == ["init", "shutdown"]
    calls.append("init")  # a cluster the caller joined: used, never shut down
    assert not sharded._acquire_cluster()
    sharded._release_cluster(False)
    assert calls == ["init", "shutdown", "init"]


def test_a_shard_that_does_not_answer_in_time_is_named():
    """A call past call_timeout (a lost node whose actor cannot be placed again) raises a
    ShardError naming that shard and its file instead of waiting forever."""
    from fasthash._sharded_support import _collect, _Shard

    calls = []

    class StuckSecondShard:
        exceptions = ray.exceptions

        @staticmethod
        def get(ref, timeout=None):
            calls.append(timeout)
            if ref == "second":
                raise ray.exceptions.GetTimeoutError("timed out")
            return ref

    shards = [_Shard(0, "a.fhidx", None), _Shard(1, "b.fhidx", None)]
    msg = r"shard 1 \(b\.fhidx\): no answer within call_timeout=2 s"
    with pytest.raises(ShardError, match=msg):
        _collect(StuckSecondShard, shards, ["first", "second"], 2.0)
    assert calls == [2.0, 2.0]
    assert _collect(StuckSecondShard, shards[:1], ["first"], 2.0) == ["first"]
