"""Training views: the frozen-backbone view cache and the per-epoch batch schedules.

* A *view bank* holds V augmented uint8 views per training image plus its deterministic view,
  all at ``data.view_size`` (BRCD_SPEC §7 augmentation, seeded per (image, view)). The frozen
  teacher backbone encodes every bank view once; the features (float16) and the bank are kept
  in ``<cache_dir>/views_<key>.pt`` under a key of everything that determines them, so teacher
  training, mask building and distillation extract them only once. The extraction runs under
  the teacher stage's ``train.autocast`` with its ``train.channels_last`` inputs; the key leaves
  both out, so a cache extracted under bf16 serves float32 runs too.
* :func:`index_batches` draws, per epoch, a permutation of the images and two distinct bank view
  numbers per image; :func:`fresh_batches` makes two on-the-fly views per image instead, keyed
  by (seed, epoch, image, view) (:func:`brcd.augment.view_keys`). In a torchrun job each rank
  takes its share of every global batch (:meth:`brcd.dist.Dist.share`) and makes only its rows'
  views, the same ones a single process makes for those rows.
* In a torchrun job rank 0 alone builds and writes the cache while the other ranks wait, then
  they load it (the cache folder must be shared by the nodes of a multi-node job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import augment as A
from .. import data as D
from ..config import ModelConfig, TrainConfig
from ..dist import Dist
from ..files import load_file, save_file
from ..models import HashModel
from .context import Context
from .encode import FEATURE_BATCH, map_batches

__all__ = ["ViewCache", "view_cache", "cache_path", "FeatureBank", "student_feature_bank",
           "pair_views", "index_batches", "fresh_batches"]


@dataclass
class ViewCache:
    """Bank views and frozen-backbone features of the training split (see module docstring)."""

    views: torch.Tensor  # uint8 [N, V, 3, S, S]
    det: torch.Tensor  # uint8 [N, 3, S, S]
    feats: torch.Tensor  # float16 [N, V, D]
    det_feats: torch.Tensor  # float16 [N, D]


def cache_path(ctx: Context, mc: ModelConfig, n_views: int) -> Path:
    """``<cache_dir>/views_<key>.pt``: the key covers the data section, the seed, the
    backbone (name, weights, input size), the number of views and the training split."""
    blob = json.dumps({
        "data": dataclasses.asdict(ctx.data) | {"num_workers": 0}, "seed": ctx.seed,
        "model": mc.name, "weights": str(mc.weights), "pretrained": mc.pretrained,
        "size": mc.image_size, "views": n_views,
        "train": hashlib.sha1(np.ascontiguousarray(ctx.splits.train_indices).tobytes()).hexdigest(),
    }, sort_keys=True)
    return ctx.cache_dir / f"views_{hashlib.sha1(blob.encode()).hexdigest()[:16]}.pt"


def _load(path: Path, ctx: Context) -> ViewCache:
    ctx.log(f"view cache: loading {path}")
    d = load_file(path, "view cache", memo=True)
    fields = [f.name for f in dataclasses.fields(ViewCache)]
    if not isinstance(d, dict) or sorted(d) != sorted(fields) or not all(
            isinstance(d[k], torch.Tensor) for k in fields):
        raise ValueError(f"view cache {str(path)!r} is malformed (expected tensors {fields})")
    return ViewCache(**d)


@torch.no_grad()
def _features(model: HashModel, x: torch.Tensor, *, size: int, ctx: Context,
              channels_last: bool, bar) -> torch.Tensor:
    def fwd(xb):
        f = model.features(D.prepare_batch(xb, size, ctx.device, channels_last))
        bar.update(len(xb))
        return f.to(torch.float16).cpu()
    return torch.cat(map_batches(fwd, (x[i:i + FEATURE_BATCH] for i in range(
        0, len(x), FEATURE_BATCH)), ctx.device))


def view_cache(ctx: Context, *, model: HashModel | None, model_cfg: ModelConfig, n_views: int,
               extract: TrainConfig) -> ViewCache:
    """Load the view cache, or make the bank and extract its features with ``model``.

    Args:
        ctx: the run context. model: the teacher whose (frozen) backbone extracts the features;
            None only when the cache file must already exist. model_cfg: the teacher backbone's
            config (keys the cache). n_views: views per image (>= 2). extract: the teacher
            stage's ``train`` section (``autocast`` and ``channels_last`` of the extraction).

    Shape:
        views ``[N, V, 3, S, S]`` uint8, det ``[N, 3, S, S]`` uint8, feats ``[N, V, D]``
        float16, det_feats ``[N, D]`` float16 (S = ``data.view_size``, N training images).

    Returns:
        the :class:`ViewCache` (on the CPU).
    """
    path = cache_path(ctx, model_cfg, n_views)
    d = ctx.dist
    if d.enabled:  # rank 0 loads or builds (and writes) it first; then the others load it
        with d.solo() as mine:
            cache = _load_or_build(path, ctx, model, model_cfg, n_views, extract) if mine \
                else None
        if cache is None:
            if not path.is_file():
                raise ValueError(f"view cache {str(path)!r}, written by rank 0, is not visible "
                                 f"on rank {d.rank}: a multi-node job needs out_dir / cache_dir "
                                 f"on a folder every node shares")
            cache = _load(path, ctx)
        return cache
    return _load_or_build(path, ctx, model, model_cfg, n_views, extract)


def _load_or_build(path: Path, ctx: Context, model: HashModel | None, model_cfg: ModelConfig,
                   n_views: int, extract: TrainConfig) -> ViewCache:
    if path.is_file():
        try:
            return _load(path, ctx)
        except ValueError as err:  # a damaged cache is rebuilt when there is a model to do it
            if model is None:
                raise ValueError(f"{err} (delete it to rebuild it)") from err
            ctx.log(f"view cache: {err}; rebuilding it")
    if model is None:
        raise ValueError(f"no view cache at {path} and no teacher to build it")
    t0 = time.perf_counter()
    views, det = A.make_views(ctx.splits.train, ctx.data.view_size, n_views, seed=ctx.seed,
                              num_workers=ctx.data.num_workers, mode=ctx.data.augment)
    t1 = time.perf_counter()
    n, v = views.shape[:2]
    flat = views.reshape(n * v, *views.shape[2:])
    was_training, was_autocast = model.training, model.autocast
    model.eval().set_autocast(extract.autocast)
    size, cl = model_cfg.image_size, extract.channels_last
    try:
        with tqdm(total=len(flat) + len(det), desc="backbone features", unit="img",
                  disable=not ctx.progress or ctx.logger not in (None, print),
                  leave=False, dynamic_ncols=True) as bar:
            opts = dict(size=size, ctx=ctx, channels_last=cl, bar=bar)
            feats = _features(model, flat, **opts).reshape(n, v, -1)
            det_feats = _features(model, det, **opts)
    finally:  # the model may be a loaded teacher that the caller keeps using as it was
        model.train(was_training).set_autocast(was_autocast)
    ctx.log(f"view cache: {n} images x {v} views made in {t1 - t0:.1f}s, features "
            f"{tuple(feats.shape)} extracted in {time.perf_counter() - t1:.1f}s")
    cache = ViewCache(views, det, feats, det_feats)
    save_file(cache.__dict__, path)
    return cache


@dataclass
class FeatureBank:
    """A frozen student backbone's features of the view bank (the same uint8 views the teacher
    saw, :class:`ViewCache`) and of the validation queries' deterministic views, so that a
    student with a frozen backbone trains and validates its head only."""

    feats: torch.Tensor  # float16 [N, V, D]
    det_feats: torch.Tensor  # float16 [N, D]
    val_feats: torch.Tensor  # float16 [N_val, D]


def _feature_bank_path(ctx: Context, bank: Path, mc: ModelConfig) -> Path:
    blob = json.dumps({
        "bank": bank.name, "model": mc.name, "weights": str(mc.weights),
        "pretrained": mc.pretrained, "size": mc.image_size,
        "val": hashlib.sha1(np.ascontiguousarray(ctx.splits.val.labels).tobytes()
                            + str(len(ctx.splits.val)).encode()).hexdigest(),
    }, sort_keys=True)
    return ctx.cache_dir / f"feats_{hashlib.sha1(blob.encode()).hexdigest()[:16]}.pt"


def student_feature_bank(ctx: Context, cache: ViewCache, bank: Path, *, model: HashModel,
                         model_cfg: ModelConfig, extract: TrainConfig) -> FeatureBank:
    """Load, or extract once, a frozen student backbone's features of the view bank.

    Args:
        ctx: the run context. cache: the teacher's view cache (its uint8 views are encoded).
        bank: the view cache's file (:func:`cache_path`; keys the features with the student
            backbone's name, weights and input size). model: the student, backbone frozen.
        model_cfg: the student's model config. extract: the student's ``train`` section
            (``autocast`` and ``channels_last`` of the extraction).

    Shape:
        feats ``[N, V, D]``, det_feats ``[N, D]``, val_feats ``[N_val, D]``, float16.

    Returns:
        the :class:`FeatureBank` (on the CPU); in a torchrun job rank 0 extracts and writes it.
    """
    if not model.freeze_backbone:
        raise ValueError("student_feature_bank needs a frozen student backbone "
                         "(student.model.freeze_backbone: true)")
    path = _feature_bank_path(ctx, bank, model_cfg)
    fields = [f.name for f in dataclasses.fields(FeatureBank)]

    def load() -> FeatureBank:
        d = load_file(path, "student feature bank", memo=True)
        if not isinstance(d, dict) or sorted(d) != sorted(fields):
            raise ValueError(f"student feature bank {str(path)!r} is malformed (expected "
                             f"{fields}); delete it to rebuild it")
        return FeatureBank(**d)

    def build() -> FeatureBank:
        if path.is_file():
            return load()
        t0 = time.perf_counter()
        val = torch.cat([x for x in D.eval_views(ctx.splits.val, ctx.data.view_size, 512)]) \
            if len(ctx.splits.val) else cache.det[:0]
        n, v = cache.views.shape[:2]
        was_training, was_autocast = model.training, model.autocast
        model.eval().set_autocast(extract.autocast)
        try:
            with tqdm(total=n * v + n + len(val), desc="student backbone features", unit="img",
                      disable=not ctx.progress or ctx.logger not in (None, print),
                      leave=False, dynamic_ncols=True) as bar:
                opts = dict(size=model_cfg.image_size, ctx=ctx,
                            channels_last=extract.channels_last, bar=bar)
                fb = FeatureBank(_features(model, cache.views.flatten(0, 1), **opts)
                                 .reshape(n, v, -1), _features(model, cache.det, **opts),
                                 _features(model, val, **opts))
        finally:
            model.train(was_training).set_autocast(was_autocast)
        ctx.log(f"student feature bank: {model_cfg.name} at {model_cfg.image_size} px, "
                f"{tuple(fb.feats.shape)} in {time.perf_counter() - t0:.1f}s")
        save_file(fb.__dict__, path)
        return fb

    d = ctx.dist
    if not d.enabled:
        return build()
    with d.solo() as mine:
        fb = build() if mine else None
    return fb if fb is not None else load()


def pair_views(n_views: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct view numbers per image, uniform over ordered pairs."""
    v1 = torch.randint(n_views, (size,), generator=gen)
    v2 = (v1 + torch.randint(1, n_views, (size,), generator=gen)) % n_views
    return v1, v2


def index_batches(n: int, *, batch_size: int, epoch: int, seed: int, n_views: int,
                  steps: int | None, dist: Dist | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step: image indices and their two view numbers (a function of seed and epoch);
    with ``dist``, this rank's share of each global batch of ``batch_size`` rows."""
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=gen)
    v1, v2 = pair_views(n_views, n, gen)
    n_steps = n // batch_size if steps is None else steps
    for s in range(n_steps):
        j = torch.arange(s * batch_size, (s + 1) * batch_size) % n
        if dist is not None:
            j = dist.share(j)
        yield perm[j], v1[perm[j]], v2[perm[j]]


def fresh_batches(base: torch.Tensor, *, batch_size: int, epoch: int, steps: int | None,
                  seed: int, mode: str, dist: Dist | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """On-the-fly two views per image, keyed by (seed, epoch, index, view 0/1); with ``dist``,
    of this rank's share of each global batch only."""
    for idx, _, _ in index_batches(len(base), batch_size=batch_size, epoch=epoch, seed=seed,
                                   n_views=2, steps=steps, dist=dist):
        keys = idx.numpy()
        yield (A.augment(base[idx], A.view_keys(seed, epoch, keys, 0), mode),
               A.augment(base[idx], A.view_keys(seed, epoch, keys, 1), mode),
               idx)


def steps_per_epoch(n: int, batch_size: int, steps: int | None) -> int:
    """Optimiser steps per epoch: ``steps`` or one pass over the ``n`` training images."""
    return steps if steps is not None else max(1, n // batch_size)
