"""The parts of :mod:`fasthash.sharded` around the index class: the Ray cluster it uses, the
merges of the shards' answers, and opening / collecting from / ending the shard actors."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ._sharded_actor import KEY_SHIFT
from .index import HammingIndex
from .search import merge_radius, merge_topk


class ShardError(RuntimeError):
    """A shard failed for good (its actor died past its restarts, or its file went bad).

    Attributes:
        shard: the shard's number (its position in the file list).
        path: its file.
    """

    def __init__(self, shard: int, path: str, message: str):
        super().__init__(f"shard {shard} ({path}): {message}")
        self.shard, self.path = shard, path


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "fasthash.sharded needs Ray: pip install 'fasthash[ray]' (or 'ray>=2.60')"
        ) from e
    return ray


# ----------------------------------------------------------------------------- the cluster

_cluster_lock = threading.Lock()
_cluster_users = 0  # open indices on the local cluster this module started (0: none started)


def _acquire_cluster() -> bool:
    """Use the cluster the caller joined (``ray.init``), else start a local one.

    Returns:
        True when the index uses a cluster this module started (released by
        :func:`_release_cluster`), False for the caller's.
    """
    global _cluster_users
    ray = _ray()
    with _cluster_lock:
        if _cluster_users and ray.is_initialized():
            _cluster_users += 1
            return True
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network call at start-up
        ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        _cluster_users = 1
        return True


def _release_cluster(started: bool) -> None:
    """Shut the local cluster down when the last index that started it closes."""
    global _cluster_users
    if not started:
        return
    ray = _ray()
    with _cluster_lock:
        _cluster_users = max(0, _cluster_users - 1)
        if not _cluster_users and ray.is_initialized():
            ray.shutdown()


# ----------------------------------------------------------------------------- merging


def _merge_topk_ids(parts: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(distances, None, ids)`` parts: each row of a part is ordered by (distance,
    local position) and the parts come in shard order, so a *stable* sort of the concatenated
    distances orders equal distances by global position, as one search would."""
    d = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[2] for p in parts], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)


def _merge_radius_ids(parts: list, nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge ``(lims, distances, None, ids)`` parts by (query, distance), stably: ties keep
    shard order and, within a shard, position order (see :func:`_merge_topk_ids`)."""
    counts = [np.diff(p[0]) for p in parts]
    lims = np.zeros(nq + 1, dtype=np.int64)
    lims[1:] = np.cumsum(np.sum(counts, axis=0))
    query = np.concatenate([np.repeat(np.arange(nq), c) for c in counts])
    d = np.concatenate([p[1] for p in parts])
    order = np.lexsort((d, query))  # lexsort is stable
    return lims, d[order], np.concatenate([p[3] for p in parts])[order]


def _unkey(part: tuple) -> tuple:
    """A shard's top-k as ``(distances, positions, ids)`` (decoding packed keys)."""
    if part[0] is not None:
        return part
    key = part[1]
    return (key >> KEY_SHIFT).astype(np.int32), key & ((1 << KEY_SHIFT) - 1), None


def _merge_topk_batch(parts: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the shards' answers to one batch: (int32 distances, int64 indices/ids)."""
    if all(p[0] is None for p in parts):
        # Packed keys arrive from the shards as sorted runs: the same stable sort as
        # merge_topk's, without unpacking them into (distance, index) pairs first.
        key = parts[0][1]
        if len(parts) > 1:
            key = np.sort(np.concatenate([p[1] for p in parts], axis=1), axis=1, kind="stable")
        return _unkey((None, key[:, :k]))[:2]
    parts = [_unkey(p) for p in parts]
    if len(parts) == 1:
        p = parts[0]
        return p[0], p[1] if p[2] is None else p[2]
    if parts[0][2] is not None:
        return _merge_topk_ids(parts, k)
    return merge_topk([p[:2] for p in parts], k)


def _merge_radius_batch(parts: list, nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All the shards' radius results for one batch: (lims, distances, indices/ids)."""
    if len(parts) == 1:
        p = parts[0]
        return p[0], p[1], p[2] if p[3] is None else p[3]
    if parts[0][3] is not None:
        return _merge_radius_ids(parts, nq)
    return merge_radius([p[:3] for p in parts], nq)


# ----------------------------------------------------------------------------- shards


@dataclass
class _Shard:
    number: int
    path: str
    actor: object
    count: int = 0
    offset: int = 0
    fingerprint: int = 0
    info: dict | None = None

    @property
    def expect(self) -> tuple[int, int]:
        """What every call tells the actor: the file's fingerprint and the shard's offset."""
        return self.fingerprint, self.offset


def _shard_paths(paths) -> list[str]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("paths must be a sequence of index files, not one path")
    out = [os.path.abspath(os.fspath(p)) for p in paths]
    if not out:
        raise ValueError("paths must name at least one index file")
    return out


def _reraise_open_error(shard: _Shard, err: BaseException) -> None:
    """Raise a shard's open error as its own type (ValueError / OSError) with the path."""
    msg = str(err) if shard.path in str(err) else f"{shard.path}: {err}"
    try:
        new = type(err)(f"shard {shard.number}: {msg}")
    except Exception:  # an exception type with another signature: raise it as it came
        new = err
    raise new from None


def _as_index(codes_or_index, bits: int | None) -> HammingIndex:
    if isinstance(codes_or_index, HammingIndex):
        return codes_or_index
    codes = codes_or_index
    if not isinstance(codes, (np.ndarray, torch.Tensor)) or codes.ndim != 2:
        raise TypeError(
            "codes_or_index must be a HammingIndex or a 2-D numpy array / torch tensor of codes"
        )
    packed = codes.dtype in (np.uint64, np.int64, torch.int64, torch.uint64)
    if bits is None:
        if packed:
            raise ValueError("bits is required when codes_or_index holds packed words")
        bits = codes.shape[1]
    index = HammingIndex(bits)
    index.add(codes)
    return index


def _open_shards(ray, shards: list[_Shard], timeout: float) -> int:
    """Wait for every actor to open its file; check the files agree; set counts and offsets.

    Returns:
        the bit length.
    """
    refs = [s.actor.info.remote() for s in shards]
    _, late = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if late:
        s = shards[refs.index(late[0])]
        raise ShardError(
            s.number, s.path,
            f"its actor did not start within {timeout:g} s (the cluster may lack the resources "
            f"it asks for; free now: {ray.available_resources()})",
        )
    infos = [_collect(ray, [s], [ref])[0] for s, ref in zip(shards, refs, strict=True)]
    for s, info in zip(shards, infos, strict=True):
        if isinstance(info, BaseException):
            _reraise_open_error(s, info)
    first = shards[0]
    for s, info in zip(shards, infos, strict=True):
        if info["bits"] != infos[0]["bits"]:
            raise ValueError(
                f"shard {s.number}: {s.path} holds {info['bits']}-bit codes, but the first "
                f"shard {first.path} holds {infos[0]['bits']}-bit codes"
            )
        if info["has_ids"] != infos[0]["has_ids"]:
            raise ValueError(
                f"shard {s.number}: {s.path} {'has' if info['has_ids'] else 'has no'} ids, "
                f"unlike the first shard {first.path}: shards must all have ids or none"
            )
    offset = 0
    for s, info in zip(shards, infos, strict=True):
        s.count, s.offset, s.fingerprint, s.info = info["count"], offset, info["fingerprint"], info
        offset += s.count
    return int(infos[0]["bits"])


def _collect(ray, shards: list[_Shard], refs: list, timeout: float | None = None) -> list:
    """``ray.get`` of one call per shard (each within ``timeout`` seconds); a failure or a
    timeout becomes a :class:`ShardError` naming the shard."""
    out = []
    for s, ref in zip(shards, refs, strict=True):
        try:
            out.append(ray.get(ref, timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            raise ShardError(
                s.number, s.path, f"no answer within call_timeout={timeout:g} s (its node may be "
                "lost and the actor not placeable again, or its file system stalled)"
            ) from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            raise ShardError(s.number, s.path, f"{type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayActorError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShardError(
                s.number, s.path, f"its actor died and could not be restarted ({first})"
            ) from None
        except ray.exceptions.RayError as e:
            raise ShardError(s.number, s.path, f"{type(e).__name__}: {e}") from None
    return out


def _kill(ray, shards: list[_Shard]) -> None:
    if not ray.is_initialized():
        return
    for s in shards:
        try:
            ray.kill(s.actor, no_restart=True)
        except Exception:  # already dead or the cluster is gone: nothing left to end
            pass
