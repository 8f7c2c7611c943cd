"""The BRCD pipeline as Python functions: teacher → clusters/masks → student → evaluation.

Design of the frozen-backbone view cache (``<stage>.train.cache_views = V``):

* A *view bank* holds V augmented uint8 views per training image plus its deterministic view,
  all at ``data.view_size`` (BRCD_SPEC §7 augmentation, seeded per (image, view)). The frozen
  teacher backbone encodes every bank view once; the features (float16) and the bank are kept in
  ``<out_dir>/cache/`` under a key of everything that determines them, so teacher training,
  mask building and distillation extract them only once.
  The extraction (:func:`view_cache`) runs under ``teacher.train.autocast`` (``"bf16"``: CPU
  bf16 autocast, float32 features out) with ``teacher.train.channels_last`` inputs; the key
  leaves both out, so a cache extracted under bf16 serves float32 runs too.
* Teacher training with a cache trains the head only: each step takes two distinct random bank
  views per image.
* Distillation with a cache precomputes the (fully frozen) teacher's codes of every bank view.
  A student step samples two distinct view numbers per image, feeds the student the SAME bank
  images (resized to the student's input size) and uses the teacher codes of exactly those
  views. The student therefore sees V views per image instead of fresh ones each epoch; the
  teacher codes are always codes of the views the student sees.
* Without a cache, both networks get fresh on-the-fly views (keyed by seed, epoch, image and
  view, :func:`brcd.data.view_keys`), and the teacher encodes the student's views in the same
  step.

Checkpoints (``<out_dir>``): ``teacher_{last,best_teacher}.pt``; ``teacher_masks.pt`` (teacher +
clusters + masks, written by :func:`build_masks`); ``student_{last,best_sshp,best_ashp}.pt``
(student + masks + the teacher checkpoint path). Validation: val queries against the training
split (teacher/teacher, SSHP, ASHP); test evaluation: query split against the database split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as D
from .config import Config, ModelConfig, config_to_dict
from .losses import (
    KD_DEFAULT_WEIGHTS,
    brcd_distill_loss,
    cibhash_loss,
    kd_codes_loss,
    rkd_distance_loss,
    sp_loss,
)
from .masks import ClusterMasks, assign_clusters, compute_cluster_masks
from .models import HashModel, create_model
from .trainer import Trainer, load_checkpoint, save_checkpoint, seed_everything

__all__ = [
    "train_teacher",
    "build_masks",
    "distill",
    "evaluate",
    "encode",
    "encode_images",
    "load_model",
    "resolve_device",
    "retrieval_map",
    "view_cache",
    "teacher_model_config",
    "ViewCache",
]


def _setup(cfg: Config) -> torch.device:
    """Validate, apply ``cfg.threads`` and return the device."""
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _model_spec(mc: ModelConfig, bits: int) -> dict[str, Any]:
    return {"name": mc.name, "bits": bits, "head": mc.head, "hidden": mc.hidden,
            "freeze_backbone": mc.freeze_backbone, "image_size": mc.image_size}


def _build(mc: ModelConfig, bits: int, autocast: str = "none") -> HashModel:
    """A fresh model of ``mc``; ``autocast`` is the stage's ``train.autocast``."""
    model = create_model(mc.name, bits, pretrained=mc.pretrained, weights=mc.weights,
                         freeze_backbone=mc.freeze_backbone, head=mc.head, hidden=mc.hidden)
    return model.set_autocast(autocast)


def load_model(ckpt: str | Path | dict, bits: int | None = None) -> tuple[HashModel, dict]:
    """Rebuild a hashing model from a brcd checkpoint (no weight files needed).

    Args:
        ckpt: checkpoint path or loaded dict. bits: if given, the expected code length.

    Returns:
        ``(model in eval mode, spec dict)``.
    """
    c = load_checkpoint(ckpt) if not isinstance(ckpt, dict) else ckpt
    spec = c["spec"]
    if bits is not None and spec["bits"] != bits:
        raise ValueError(f"checkpoint has {spec['bits']}-bit codes but bits={bits} was requested")
    model = create_model(spec["name"], spec["bits"], freeze_backbone=spec["freeze_backbone"],
                         head=spec["head"], hidden=spec["hidden"])
    model.load_state_dict(c["model"])
    return model.eval(), spec


def retrieval_map(query_codes, db_codes, query_labels, db_labels, topk: int) -> float:
    """mAP@topk through ``brcd.retrieval.evaluate`` (imported lazily)."""
    try:
        from .retrieval import evaluate as _evaluate
    except ImportError as exc:  # pragma: no cover - until brcd.retrieval lands
        raise RuntimeError("brcd.retrieval.evaluate is not available yet; set "
                           "<stage>.train.eval_every: 0 to train without validation") from exc
    k = min(int(topk), len(db_codes))
    q = query_codes.numpy() if isinstance(query_codes, torch.Tensor) else query_codes
    db = db_codes.numpy() if isinstance(db_codes, torch.Tensor) else db_codes
    res = _evaluate(q, db, query_labels, db_labels, topk=k, map_all=False)
    return float(res.map_at_k if hasattr(res, "map_at_k") else res["map"])


# ------------------------------------------------------------------------------ encoding
@torch.no_grad()
def encode_images(model: HashModel, images: D.ImageSet, view_size: int, image_size: int,
                  device: torch.device, batch_size: int = 256, num_workers: int = 0,
                  features: bool = False) -> torch.Tensor:
    """±1 codes (or backbone features) of the deterministic views, float32 on the CPU.

    Shape:
        -> ``[N, L]`` codes, or ``[N, D]`` features with ``features=True``.
    """
    was = model.training
    model.eval()
    out = []
    for x in D.eval_views(images, view_size, batch_size, num_workers):
        x = D.prepare_batch(x, image_size, device)
        out.append((model.features(x) if features else model(x).codes).float().cpu())
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def _head_codes(model: HashModel, feats: torch.Tensor, device, batch: int = 4096) -> torch.Tensor:
    was = model.training
    model.eval()
    out = [model.head_forward(feats[i:i + batch].to(device).float()).codes.cpu()
           for i in range(0, len(feats), batch)]
    model.train(was)
    return torch.cat(out)


@dataclass
class ViewCache:
    """Bank views and frozen-backbone features of the training split (see module docstring)."""

    views: torch.Tensor  # uint8 [N, V, 3, S, S]
    det: torch.Tensor  # uint8 [N, 3, S, S]
    feats: torch.Tensor  # float16 [N, V, D]
    det_feats: torch.Tensor  # float16 [N, D]


def _cache_key(cfg: Config, mc: ModelConfig, n_views: int, train_idx: np.ndarray) -> str:
    # The key leaves out teacher.train.autocast / channels_last on purpose: the cache stores
    # float16 features either way, and a cache extracted under bf16 (the demo's prebuild) is
    # the one the float32 runs that follow must find.
    blob = json.dumps({
        "data": config_to_dict(cfg)["data"] | {"num_workers": 0}, "seed": cfg.seed,
        "model": mc.name, "weights": str(mc.weights), "pretrained": mc.pretrained,
        "size": mc.image_size, "views": n_views,
        "train": hashlib.sha1(np.ascontiguousarray(train_idx).tobytes()).hexdigest(),
    }, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _cache_path(cfg: Config, mc: ModelConfig, n_views: int, splits: D.Splits) -> Path:
    key = _cache_key(cfg, mc, n_views, splits.train_indices)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"
    return cache_dir / f"views_{key}.pt"


def _load_cache(path: Path, log) -> ViewCache:
    log(f"view cache: loading {path}")
    return ViewCache(**torch.load(path, map_location="cpu", weights_only=True))


@torch.no_grad()
def _view_cache(cfg: Config, model: HashModel, mc: ModelConfig, n_views: int,
                splits: D.Splits, device: torch.device, log) -> ViewCache:
    """Load the cache, or make the bank and extract its features with ``model`` (the teacher
    backbone) under ``cfg.teacher.train``'s ``autocast`` and ``channels_last`` inputs."""
    path = _cache_path(cfg, mc, n_views, splits)
    if path.is_file():
        return _load_cache(path, log)
    import time

    t0 = time.perf_counter()
    views, det = D.make_views(splits.train, cfg.data.view_size, n_views, cfg.seed,
                              cfg.data.num_workers, cfg.data.augment)
    t1 = time.perf_counter()
    n, v = views.shape[:2]
    flat = views.reshape(n * v, *views.shape[2:])
    tc = cfg.teacher.train
    was_training, was_autocast = model.training, model.autocast
    model.eval().set_autocast(tc.autocast)

    def feats_of(x: torch.Tensor, bar) -> torch.Tensor:
        out = []
        for i in range(0, len(x), 256):
            xb = D.prepare_batch(x[i:i + 256], mc.image_size, device, tc.channels_last)
            out.append(model.features(xb).to(torch.float16).cpu())
            bar.update(len(xb))
        return torch.cat(out)

    try:
        with tqdm(total=len(flat) + len(det), desc="backbone features", unit="img",
                  disable=log is not print, leave=False, dynamic_ncols=True) as bar:
            feats = feats_of(flat, bar).reshape(n, v, -1)
            det_feats = feats_of(det, bar)
    finally:  # the model may be a loaded teacher that the caller keeps using as it was
        model.train(was_training).set_autocast(was_autocast)
    log(f"view cache: {n} images x {v} views made in {t1 - t0:.1f}s, features "
        f"{tuple(feats.shape)} extracted in {time.perf_counter() - t1:.1f}s")
    cache = ViewCache(views, det, feats, det_feats)
    save_checkpoint(cache.__dict__, path)
    return cache


def view_cache(cfg: Config, splits: D.Splits | None = None, log=print,
               teacher: str | Path | dict | None = None) -> ViewCache:
    """Load or build the frozen-teacher-backbone view cache of ``cfg`` (see module docstring).

    Builds nothing when ``<cache_dir or out_dir/cache>/views_<key>.pt`` exists. Otherwise makes
    ``cfg.teacher.train.cache_views`` augmented views per training image and extracts their
    features with the teacher backbone under ``teacher.train.autocast`` and
    ``teacher.train.channels_last``. :func:`train_teacher`, :func:`build_masks` and
    :func:`distill` of the same data/seed/teacher backbone then reuse it.

    Args:
        cfg: run config; needs ``teacher.model.freeze_backbone`` and
            ``teacher.train.cache_views >= 2``.
        splits: ``brcd.data.make_splits(cfg.data, cfg.seed)`` when None.
        log: progress printer (``print`` also shows a tqdm bar).
        teacher: a teacher checkpoint (path or loaded dict) whose backbone to use; default a
            fresh ``cfg.teacher.model`` backbone (its pretrained weights).

    Shape:
        views ``[N, V, 3, S, S]`` uint8, det ``[N, 3, S, S]`` uint8, feats ``[N, V, D]`` float16,
        det_feats ``[N, D]`` float16 (S = ``data.view_size``, N training images).

    Returns:
        the :class:`ViewCache` (on the CPU).

    Example:
        >>> cfg = load_config("fashion-mnist", {"out_dir": "runs/x"})  # doctest: +SKIP
        >>> cache = view_cache(cfg)  # doctest: +SKIP
        >>> cache.feats.shape  # doctest: +SKIP
        torch.Size([5000, 8, 1280])
    """
    device = _setup(cfg)
    nv = cfg.teacher.train.cache_views
    if nv < 2:
        raise ValueError(f"view_cache needs teacher.train.cache_views >= 2, got {nv}")
    if splits is None:
        splits = D.make_splits(cfg.data, cfg.seed)
    ckpt = None
    if teacher is not None:
        ckpt = load_checkpoint(teacher) if not isinstance(teacher, dict) else teacher
        if not ckpt["spec"]["freeze_backbone"]:
            raise ValueError("teacher: the view cache needs a teacher with a frozen backbone")
        mc = teacher_model_config(cfg, ckpt["spec"])
    else:
        if not cfg.teacher.model.freeze_backbone:
            raise ValueError("view_cache needs teacher.model.freeze_backbone: true")
        mc = cfg.teacher.model
    path = _cache_path(cfg, mc, nv, splits)
    if path.is_file():  # no backbone to build
        return _load_cache(path, log)
    model = (load_model(ckpt, cfg.bits)[0] if ckpt is not None
             else _build(mc, cfg.bits, cfg.teacher.train.autocast))
    return _view_cache(cfg, model.to(device), mc, nv, splits, device, log)


def _pair_views(n_views: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct view numbers per image, uniform over ordered pairs."""
    v1 = torch.randint(n_views, (size,), generator=gen)
    v2 = (v1 + torch.randint(1, n_views, (size,), generator=gen)) % n_views
    return v1, v2


def _index_batches(n: int, batch_size: int, epoch: int, seed: int, n_views: int,
                   steps: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=gen)
    v1, v2 = _pair_views(n_views, n, gen)
    n_steps = n // batch_size if steps is None else steps
    for s in range(n_steps):
        j = torch.arange(s * batch_size, (s + 1) * batch_size) % n
        yield perm[j], v1[perm[j]], v2[perm[j]]


def _fresh_batches(base: torch.Tensor, cfg: Config, batch_size: int, epoch: int,
                   steps: int | None, seed: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """On-the-fly two views per image, keyed by (seed, epoch, index, view 0/1)."""
    seed = cfg.seed if seed is None else seed
    for idx, _, _ in _index_batches(len(base), batch_size, epoch, seed, 2, steps):
        keys = idx.numpy()
        yield (D.augment(base[idx], D.view_keys(seed, epoch, keys, 0), cfg.data.augment),
               D.augment(base[idx], D.view_keys(seed, epoch, keys, 1), cfg.data.augment),
               idx)


def _steps(n: int, batch_size: int, steps: int | None) -> int:
    return steps if steps is not None else max(1, n // batch_size)


def _log(progress: bool):
    return print if progress else (lambda *a, **k: None)


def _check_bs(n: int, batch_size: int, stage: str) -> None:
    if n < batch_size:
        raise ValueError(f"{stage}.train.batch_size={batch_size} exceeds the {n} training images")


# ------------------------------------------------------------------------------ teacher
def train_teacher(cfg: Config, resume: str | Path | None = None, progress: bool = True) -> Path:
    """Train the teacher hashing model with the CIBHash-style loss (no labels).

    Returns:
        path of the checkpoint to use next: ``teacher_best_teacher.pt`` when validation ran,
        else ``teacher_last.pt``.
    """
    device = _setup(cfg)
    log = _log(progress)
    seed_everything(cfg.seed)
    st = cfg.teacher
    splits = D.make_splits(cfg.data, cfg.seed)
    log(splits.summary())
    model = _build(st.model, cfg.bits, st.train.autocast).to(device)
    n, bs, nv = len(splits.train), st.train.batch_size, st.train.cache_views
    _check_bs(n, bs, "teacher")
    size = st.model.image_size
    cl = st.train.channels_last
    if cl:
        model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if st.train.compile else model

    if nv:
        cache = _view_cache(cfg, model, st.model, nv, splits, device, log)

        def batches(epoch):
            for idx, v1, v2 in _index_batches(n, bs, epoch, cfg.seed, nv, st.train.steps_per_epoch):
                yield cache.feats[idx, v1], cache.feats[idx, v2]

        def step(batch):
            f1, f2 = (b.to(device).float() for b in batch)
            return cibhash_loss(model.head_forward(f1), model.head_forward(f2), cfg.temperature,
                                cfg.kl_weight)
    else:
        base = D.base_images(splits.train, cfg.data.view_size, cfg.data.num_workers)

        def batches(epoch):
            return _fresh_batches(base, cfg, bs, epoch, st.train.steps_per_epoch)

        def step(batch):
            x1, x2 = (D.prepare_batch(b, size, device, cl) for b in batch[:2])
            return cibhash_loss(fwd(x1), fwd(x2), cfg.temperature, cfg.kl_weight)

    def validate():
        db = (_head_codes(model, cache.det_feats, device) if nv else
              encode_images(model, splits.train, cfg.data.view_size, size, device))
        q = encode_images(model, splits.val, cfg.data.view_size, size, device)
        return {"teacher": retrieval_map(q, db, splits.val.labels, splits.train.labels, cfg.topk)}

    extra = {"kind": "teacher", "bits": cfg.bits, "spec": _model_spec(st.model, cfg.bits),
             "config": config_to_dict(cfg)}
    trainer = Trainer(model, st.train, device, Path(cfg.out_dir), "teacher", step, batches,
                      _steps(n, bs, st.train.steps_per_epoch), bs * 2,
                      validate if len(splits.val) else None, extra, progress)
    if resume:
        trainer.resume(resume)
    trainer.fit()
    best = trainer.path("best_teacher")
    return best if best.is_file() else trainer.path("last")


# ------------------------------------------------------------------------------ masks
def build_masks(cfg: Config, teacher: str | Path | None = None, progress: bool = True) -> Path:
    """Cluster the teacher's codes of the training split and store masks WITH the teacher.

    Args:
        cfg: the run config (data split, masks section, bits).
        teacher: teacher checkpoint; default ``<out_dir>/teacher_best_teacher.pt`` or
            ``teacher_last.pt``.

    Returns:
        path of ``<out_dir>/teacher_masks.pt`` (the teacher checkpoint + ``"masks"``).
    """
    device = _setup(cfg)
    log = _log(progress)
    out = Path(cfg.out_dir)
    tpath = Path(teacher) if teacher else _default_teacher(out)
    ckpt = load_checkpoint(tpath)
    if ckpt["kind"] != "teacher":
        raise ValueError(f"{tpath}: expected a teacher checkpoint, got {ckpt['kind']}")
    model, spec = load_model(ckpt, cfg.bits)
    model.to(device)
    splits = D.make_splits(cfg.data, cfg.seed)
    codes = _teacher_train_codes(cfg, model, spec, splits, device, log)
    mc = cfg.masks
    masks = compute_cluster_masks(codes, splits.train_indices, mc.n_clusters, delta=mc.delta,
                                  convention=mc.convention, n_init=mc.n_init, seed=cfg.seed,
                                  choose_from=mc.choose_from)
    log(masks.report())
    ckpt = {**ckpt, "masks": masks.to_dict(), "teacher_source": str(tpath)}
    return save_checkpoint(ckpt, out / "teacher_masks.pt")


def _default_teacher(out: Path) -> Path:
    for name in ("teacher_best_teacher.pt", "teacher_last.pt"):
        if (out / name).is_file():
            return out / name
    raise ValueError(f"no teacher checkpoint in {str(out)!r}; run train-teacher first or pass "
                     f"--teacher PATH")


def teacher_model_config(cfg: Config, spec: dict) -> ModelConfig:
    """The teacher :class:`ModelConfig` of a trained teacher: ``cfg.teacher.model`` with the
    checkpoint's backbone name and input size (what keys its view cache).

    Args:
        cfg: run config. spec: the checkpoint's ``"spec"`` (from :func:`load_model`).

    Returns:
        a new :class:`ModelConfig`.

    Example:
        >>> _, spec = load_model("runs/brcd/teacher_masks.pt")  # doctest: +SKIP
        >>> teacher_model_config(cfg, spec).image_size  # doctest: +SKIP
        64
    """
    return ModelConfig(**{**cfg.teacher.model.__dict__, "name": spec["name"],
                          "image_size": spec["image_size"]})


def _teacher_train_codes(cfg, model, spec, splits, device, log) -> torch.Tensor:
    nv = cfg.teacher.train.cache_views
    if nv and spec["freeze_backbone"]:
        cache = _view_cache(cfg, model, teacher_model_config(cfg, spec), nv, splits, device, log)
        return _head_codes(model, cache.det_feats, device)
    return encode_images(model, splits.train, cfg.data.view_size, spec["image_size"], device)


# ------------------------------------------------------------------------------ student
def distill(cfg: Config, teacher: str | Path | None = None, resume: str | Path | None = None,
            progress: bool = True) -> Path:
    """Train the student with ``cfg.distill.method`` (brcd / none / kd-codes / sp / rkd).

    Args:
        cfg: run config. teacher: teacher checkpoint with masks (default
            ``<out_dir>/teacher_masks.pt``; for ``brcd`` it must hold masks; ``none`` runs
            without a teacher when none exists). resume: a ``student_last.pt`` to continue.

    Returns:
        path of ``student_best_ashp.pt`` (or ``_sshp`` / ``_last`` when that is all there is).
    """
    device = _setup(cfg)
    log = _log(progress)
    seed_everything(cfg.seed)
    dc, st = cfg.distill, cfg.student
    out = Path(cfg.out_dir)
    splits = D.make_splits(cfg.data, cfg.seed)
    log(splits.summary())

    tpath = Path(teacher) if teacher else out / "teacher_masks.pt"
    tckpt, tmodel, tspec, masks = None, None, None, None
    if dc.method != "none" or tpath.is_file():
        tckpt = load_checkpoint(tpath)
        if tckpt["kind"] != "teacher":
            raise ValueError(f"{tpath}: expected a teacher checkpoint, got {tckpt['kind']}")
        if tckpt["bits"] != cfg.bits:
            raise ValueError(
                f"teacher and student must have the same bit length: teacher {tpath} has "
                f"{tckpt['bits']} bits, student bits={cfg.bits}")
        tmodel, tspec = load_model(tckpt, cfg.bits)
        tmodel.to(device).requires_grad_(False)
        if tckpt.get("masks") is not None:
            masks = ClusterMasks.from_dict(tckpt["masks"])
            if not np.array_equal(masks.train_indices.numpy(), splits.train_indices):
                raise ValueError("the masks in the teacher checkpoint were built on another "
                                 "training split (data config / seed differ); rerun build-masks")
    if dc.method == "brcd" and masks is None:
        raise ValueError(f"--method brcd needs clusters and masks in {tpath}; run build-masks")

    # The student seed drives only the student (init, batch order, view pairs / fresh views);
    # the split, view bank and teacher stay those of cfg.seed.
    sseed = cfg.seed if dc.seed is None else int(dc.seed)
    seed_everything(sseed)
    student = _build(st.model, cfg.bits, st.train.autocast).to(device)
    cl = st.train.channels_last
    if cl:
        student.to(memory_format=torch.channels_last)
    fwd = torch.compile(student) if st.train.compile else student
    n, bs, size = len(splits.train), st.train.batch_size, st.model.image_size
    _check_bs(n, bs, "student")
    nv = st.train.cache_views
    ids = masks.train_cluster_ids.to(device) if masks is not None else None
    centroids = masks.centroids.to(device) if masks is not None else None
    mtable = masks.mask_table.to(device) if masks is not None else None
    kd_w = dc.kd_weight if dc.kd_weight is not None else KD_DEFAULT_WEIGHTS.get(dc.method, 0.0)
    use_bank = bool(nv) and tmodel is not None and tspec["freeze_backbone"]
    cache = None
    if nv and not use_bank and tmodel is not None:
        log("note: student.train.cache_views is ignored (the teacher backbone is not frozen)")
    if use_bank:
        cache = _view_cache(cfg, tmodel, teacher_model_config(cfg, tspec), nv, splits, device, log)
        tcodes = _head_codes(tmodel, cache.feats.reshape(-1, cache.feats.shape[-1]), device)
        tcodes = tcodes.reshape(n, nv, -1)

        def batches(epoch):
            for idx, v1, v2 in _index_batches(n, bs, epoch, sseed, nv, st.train.steps_per_epoch):
                yield (cache.views[idx, v1], cache.views[idx, v2], idx, tcodes[idx, v1],
                       tcodes[idx, v2])
    else:
        base = D.base_images(splits.train, cfg.data.view_size, cfg.data.num_workers)

        def batches(epoch):
            for x1, x2, idx in _fresh_batches(base, cfg, bs, epoch, st.train.steps_per_epoch,
                                              sseed):
                t1 = t2 = None
                if tmodel is not None and dc.method != "none":
                    with torch.no_grad():
                        t1 = tmodel(D.prepare_batch(x1, tspec["image_size"], device)).codes
                        t2 = tmodel(D.prepare_batch(x2, tspec["image_size"], device)).codes
                yield x1, x2, idx, t1, t2

    def step(batch):
        x1, x2, idx, t1, t2 = batch
        s1 = fwd(D.prepare_batch(x1, size, device, cl))
        s2 = fwd(D.prepare_batch(x2, size, device, cl))
        own, parts = cibhash_loss(s1, s2, cfg.temperature, cfg.kl_weight)
        if dc.method == "none":
            return own, parts
        t1, t2 = t1.to(device).float(), t2.to(device).float()
        sc1, sc2 = s1.codes.float(), s2.codes.float()
        if dc.method == "brcd":
            cid = ids[idx.to(device)]
            opts = dict(alpha=dc.alpha, temperature=cfg.temperature, use_mask=dc.use_mask,
                        offset_positive=dc.offset_positive, false_negative=dc.false_negative)
            kd = brcd_distill_loss(sc1, t1, t2, mtable, cid, assign_clusters(t2, centroids),
                                   **opts)
            if dc.symmetric:
                kd = 0.5 * (kd + brcd_distill_loss(sc2, t2, t1, mtable, cid,
                                                   assign_clusters(t1, centroids), **opts))
            w = 1.0
        elif dc.method == "kd-codes":
            s1.logits, s2.logits = s1.logits.float(), s2.logits.float()
            kd = 0.5 * (kd_codes_loss(s1, t1) + kd_codes_loss(s2, t2))
            w = kd_w
        elif dc.method == "sp":
            kd = 0.5 * (sp_loss(sc1, t1) + sp_loss(sc2, t2))
            w = kd_w
        else:
            kd = 0.5 * (rkd_distance_loss(sc1, t1) + rkd_distance_loss(sc2, t2))
            w = kd_w
        parts["own"], parts["kd"] = float(own.detach()), float(kd.detach())
        return own + w * kd, parts

    t_db = None

    def validate():
        nonlocal t_db
        vs = cfg.data.view_size
        q = encode_images(student, splits.val, vs, size, device)
        db = encode_images(student, splits.train, vs, size, device)
        res = {"sshp": retrieval_map(q, db, splits.val.labels, splits.train.labels, cfg.topk)}
        if tmodel is not None:
            if t_db is None:
                t_db = (_head_codes(tmodel, cache.det_feats, device) if cache is not None else
                        encode_images(tmodel, splits.train, vs, tspec["image_size"], device))
            res["ashp"] = retrieval_map(q, t_db, splits.val.labels, splits.train.labels, cfg.topk)
        return res

    extra = {"kind": "student", "bits": cfg.bits, "spec": _model_spec(st.model, cfg.bits),
             "config": config_to_dict(cfg), "method": dc.method,
             "masks": masks.to_dict() if masks is not None else None,
             "teacher_path": str(tpath.resolve()) if tckpt is not None else None}
    trainer = Trainer(student, st.train, device, out, "student", step, batches,
                      _steps(n, bs, st.train.steps_per_epoch), bs * 2,
                      validate if len(splits.val) else None, extra, progress)
    if resume:
        trainer.resume(resume)
    trainer.fit()
    for which in ("best_ashp", "best_sshp", "last"):
        if trainer.path(which).is_file():
            return trainer.path(which)
    raise RuntimeError("distill produced no checkpoint (student.train.epochs = 0?)")


# ------------------------------------------------------------------------------ evaluation
def encode(checkpoint: str | Path, images: D.ImageSet, view_size: int,
           device: str | torch.device = "auto", bits: int | None = None,
           batch_size: int = 256) -> torch.Tensor:
    """±1 codes ``[N, L]`` of ``images`` (deterministic view) by a teacher/student checkpoint."""
    model, spec = load_model(checkpoint, bits)
    dev = resolve_device(device) if isinstance(device, str) else device
    return encode_images(model.to(dev), images, view_size, spec["image_size"], dev, batch_size)


def evaluate(cfg: Config, student: str | Path | None = None, teacher: str | Path | None = None,
             progress: bool = True, with_teacher: bool = True) -> dict[str, float]:
    """Test-protocol mAP@topk: query split vs database split.

    Returns:
        ``{"teacher": T/T, "sshp": S/S, "ashp": S query vs T database}`` for the models given
        (the student's teacher is taken from its checkpoint when ``teacher`` is None and
        ``with_teacher``; ``with_teacher=False`` gives SSHP only, without encoding the teacher).
    """
    device = _setup(cfg)
    log = _log(progress)
    splits = D.make_splits(cfg.data, cfg.seed)
    log(splits.summary())
    vs = cfg.data.view_size
    res: dict[str, float] = {}
    sq = None
    if student is not None:
        s_ckpt = load_checkpoint(student)
        sm, sspec = load_model(s_ckpt, cfg.bits)
        sm.to(device)
        sq = encode_images(sm, splits.query, vs, sspec["image_size"], device)
        sdb = encode_images(sm, splits.database, vs, sspec["image_size"], device)
        res["sshp"] = retrieval_map(sq, sdb, splits.query.labels, splits.database.labels, cfg.topk)
        tp = s_ckpt.get("teacher_path")
        if teacher is None and with_teacher and tp and Path(tp).is_file():
            teacher = tp
    if teacher is not None:
        tm, tspec = load_model(teacher, cfg.bits)
        tm.to(device)
        tq = encode_images(tm, splits.query, vs, tspec["image_size"], device)
        tdb = encode_images(tm, splits.database, vs, tspec["image_size"], device)
        res["teacher"] = retrieval_map(tq, tdb, splits.query.labels, splits.database.labels,
                                       cfg.topk)
        if sq is not None:
            res["ashp"] = retrieval_map(sq, tdb, splits.query.labels, splits.database.labels,
                                        cfg.topk)
    if not res:
        raise ValueError("evaluate needs a student and/or a teacher checkpoint")
    return res
