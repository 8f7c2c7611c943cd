"""Speed measurements of a trained pair: encode time (teacher vs student forward pass) and exact
top-k search time (fasthash vs FAISS ``IndexBinaryFlat`` when installed), same run, same data."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..models import HashModel, count_parameters, create_model

__all__ = ["time_call", "encode_speed", "search_speed", "speed_report"]


def time_call(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.no_grad()
def encode_speed(teacher: HashModel, student: HashModel, *, t_size: int, s_size: int,
                 batches: list[int]) -> dict[str, Any]:
    """ms per batch and images/s of the forward pass (fp32, eval mode, channels-last inputs).

    Each figure is the median of a few timed calls after a warm-up call; fewer calls for big
    batches (at least ~1,000 images per figure where that is cheap).

    Returns:
        ``{"<teacher|student>_bs<B>": {"ms_per_batch", "images_per_s"}, "speedup_bs<B>": x}``
        plus ``threads``, ``dtype`` and ``batches``.
    """
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "dtype": "float32",
                           "batches": batches}
    for name, model, size in (("teacher", teacher, t_size), ("student", student, s_size)):
        model.eval()
        for bs in batches:
            x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
            reps = max(1, min(10, 512 // bs))
            sec = time_call(lambda m=model, x=x: m(x), reps)
            out[f"{name}_bs{bs}"] = {"ms_per_batch": round(sec * 1e3, 2),
                                     "images_per_s": round(bs / sec, 1)}
    for bs in batches:
        out[f"speedup_bs{bs}"] = round(out[f"student_bs{bs}"]["images_per_s"]
                                       / out[f"teacher_bs{bs}"]["images_per_s"], 1)
    return out


def _faiss(use_faiss: bool, log: Callable[[str], None]):
    if not use_faiss:
        return None
    try:
        import faiss
    except ImportError:
        log("FAISS is not installed: search speed of fasthash only")
        return None
    return faiss


def search_speed(db_words: np.ndarray, q_words: np.ndarray, *, bits: int, topk: int,
                 gallery: int, use_faiss: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Queries per second of exact top-k: the given database at k = ``topk`` and 10, and a
    random ``gallery``-code one at k = 10 (skipped when ``gallery`` is 0).

    Returns:
        ``{"engine", "bits", "cases": [{gallery, n, queries, k, fasthash_qps[, faiss_qps,
        speedup_vs_faiss]}]}``.
    """
    from fasthash import to_faiss_bytes

    from ..retrieval.index import engine
    from ..retrieval.index import topk as fh_topk

    faiss = _faiss(use_faiss, log)
    cases = [("demo database", db_words, topk), ("demo database", db_words, 10)]
    if gallery > 0:
        big = np.random.default_rng(0).integers(0, 2**63, size=(gallery, db_words.shape[1]),
                                                dtype=np.uint64)
        if bits % 64:
            big &= np.uint64((1 << (bits % 64)) - 1)
        cases.append((f"synthetic {gallery:,}", big, 10))
    out: dict[str, Any] = {"engine": engine(), "bits": bits, "cases": []}
    for name, g, k in cases:
        k = min(k, len(g))
        rec: dict[str, Any] = {"gallery": name, "n": int(len(g)), "queries": int(len(q_words)),
                               "k": k}
        sec = time_call(lambda g=g, k=k: fh_topk(q_words, g, k), 2)
        rec["fasthash_qps"] = round(len(q_words) / sec, 1)
        if faiss is not None:
            index = faiss.IndexBinaryFlat(8 * ((bits + 7) // 8))
            index.add(to_faiss_bytes(g, bits))
            qb = to_faiss_bytes(q_words, bits)
            sec_f = time_call(lambda index=index, qb=qb, k=k: index.search(qb, k), 2)
            rec["faiss_qps"] = round(len(q_words) / sec_f, 1)
            rec["speedup_vs_faiss"] = round(rec["fasthash_qps"] / rec["faiss_qps"], 2)
        out["cases"].append(rec)
        log(f"   search {name} k={k}: fasthash {rec['fasthash_qps']:,.0f} QPS"
            + (f", FAISS {rec['faiss_qps']:,.0f} QPS" if "faiss_qps" in rec else ""))
    return out


def speed_report(teacher: str | Path, student: ModelConfig, teacher_codes: dict[str, torch.Tensor],
                 *, batches: list[int], topk: int, gallery: int, use_faiss: bool,
                 log: Callable[[str], None], encode: dict[str, Any] | None = None
                 ) -> tuple[dict[str, Any], int, int]:
    """Encode speed of a teacher checkpoint against a fresh ``student`` model of the same code
    length, and search speed on the teacher's ``query`` / ``database`` codes.

    Args:
        encode: an :func:`encode_speed` result of this teacher and student measured already
            (e.g. by :func:`brcd.stages.suite.student_speed`): reported, not timed again.

    Returns:
        ``({"encode": ..., "search": ...}, student parameters, teacher parameters)``.
    """
    from ..retrieval import as_packed
    from .encode import load_model

    tmodel, spec = load_model(teacher)
    smodel = create_model(student.name, spec["bits"], head=student.head, hidden=student.hidden)
    enc = encode
    if enc is None:
        enc = encode_speed(tmodel.to(memory_format=torch.channels_last),
                           smodel.to(memory_format=torch.channels_last),
                           t_size=spec["image_size"], s_size=student.image_size, batches=batches)
        log("encode: student speed-up over teacher " + ", ".join(
            f"{enc[f'speedup_bs{bs}']}x at batch {bs}" for bs in batches))
    search = search_speed(as_packed(teacher_codes["database"])[0],
                          as_packed(teacher_codes["query"])[0], bits=spec["bits"], topk=topk,
                          gallery=gallery, use_faiss=use_faiss, log=log)
    return ({"encode": enc, "search": search}, count_parameters(smodel),
            count_parameters(tmodel))
