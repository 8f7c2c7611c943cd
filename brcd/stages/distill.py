"""The distill stage: train the student with a registered objective (:data:`brcd.losses.METHODS`).

The student seed (``distill.seed``) drives only the student (init, batch order, view pairs or
fresh views); the split, view bank and teacher stay those of the run seed. With a view cache
(``student.train.cache_views`` and a frozen teacher backbone) the teacher's codes of every bank
view are computed once; a step feeds the student the SAME bank images whose teacher codes it
uses. A student whose backbone is frozen (the paper's protocol: an ImageNet backbone and a
trainable hash head) sees those bank views through a feature bank extracted once
(:func:`brcd.stages.views.student_feature_bank`), so each step and each validation runs its
head alone. Without a bank, the teacher encodes the student's fresh views in the same step. In a
torchrun job each rank takes its share of every global batch (and the teacher codes only its
rows); the losses see the global batch (:mod:`brcd.dist`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as D
from ..config import Config, DistillConfig, StageConfig
from ..dist import check_divisible, sync_batchnorm
from ..losses import METHODS, KDBatch, cibhash_loss
from ..masks import ClusterMasks, training_mask_table
from ..models import HashModel, HashOutput, pair_forward
from ..trainer import Trainer, seed_everything
from . import views as V
from .context import Context, OwnLoss
from .encode import build_model, encode_images, head_codes, model_spec
from .evaluate import retrieval_map
from .masks import load_teacher
from .teacher import check_batch_size, teacher_model_config

__all__ = ["DistillInput", "DistillResult", "distill"]


@dataclass(frozen=True, kw_only=True)
class DistillInput:
    """The distill and student sections, the teacher section (its view-cache settings), the
    code length, the own loss, the teacher checkpoint (None: ``<out_dir>/teacher_masks.pt``)
    and an optional student checkpoint to resume."""

    distill: DistillConfig
    student: StageConfig
    teacher_stage: StageConfig
    bits: int
    own: OwnLoss = field(default_factory=OwnLoss)
    teacher: Path | None = None
    resume: Path | None = None

    @classmethod
    def from_config(cls, cfg: Config, teacher: str | Path | None = None,
                    resume: str | Path | None = None) -> DistillInput:
        """The distill stage's input from a run config."""
        return cls(distill=cfg.distill, student=cfg.student, teacher_stage=cfg.teacher,
                   bits=cfg.bits, own=OwnLoss.from_config(cfg),
                   teacher=Path(teacher) if teacher else None,
                   resume=Path(resume) if resume else None)


@dataclass
class DistillResult:
    """``checkpoint``: the best-ASHP student (else best-SSHP, else last); ``checkpoints``:
    every one written (``best_ashp`` / ``best_sshp`` / ``last``); ``history``: per epoch."""

    checkpoint: Path
    checkpoints: dict[str, Path]
    history: list[dict[str, Any]]
    best: dict[str, float]


@dataclass
class _Teacher:
    path: Path
    model: HashModel
    spec: dict
    masks: ClusterMasks | None


class _Head(nn.Module):
    """The student's hash head on cached backbone features (what DDP wraps then)."""

    def __init__(self, model: HashModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> HashOutput:
        return self.model.head_forward(feats)


def _teacher(inp: DistillInput, ctx: Context) -> _Teacher | None:
    method = METHODS[inp.distill.method]
    path = Path(inp.teacher) if inp.teacher else ctx.out_dir / "teacher_masks.pt"
    if not method.needs_teacher and not path.is_file():
        return None
    ckpt, model, spec = load_teacher(path, inp.bits)
    model.to(ctx.device).requires_grad_(False)
    masks = None
    if ckpt.get("masks") is not None:
        masks = ClusterMasks.from_dict(ckpt["masks"])
        if not np.array_equal(masks.train_indices.numpy(), ctx.splits.train_indices):
            raise ValueError("the masks in the teacher checkpoint were built on another "
                             "training split (data config / seed differ); rerun build-masks")
    if method.needs_masks and masks is None:
        raise ValueError(f"--method {method.name} needs clusters and masks in {path}; run "
                         "build-masks")
    return _Teacher(path, model, spec, masks)


# the teacher's codes of the bank views, per process: a demo worker's runs share a teacher and a
# bank (40,000 rows through the Lite2 head: 2.6 s of a 20 s head run)
_BANK_CODES: dict[tuple, torch.Tensor] = {}


def _bank_codes(t: _Teacher, cache: V.ViewCache, bank: Path, ctx: Context, n: int,
                nv: int) -> torch.Tensor:
    st = t.path.stat()
    key = (str(t.path.resolve()), st.st_mtime_ns, st.st_size, str(bank), ctx.dist.rank)
    if key not in _BANK_CODES:
        while len(_BANK_CODES) >= 4:  # --full's three teachers, and no more
            _BANK_CODES.pop(next(iter(_BANK_CODES)))
        flat = cache.feats.reshape(-1, cache.feats.shape[-1])
        _BANK_CODES[key] = head_codes(t.model, flat, ctx.device, dist=ctx.dist).reshape(n, nv, -1)
    return _BANK_CODES[key]


def _batches(inp: DistillInput, ctx: Context, t: _Teacher | None, sseed: int,
             student: HashModel):
    """``epoch -> iterator of (x1, x2, idx, t1, t2)``, the view cache (or None) and the
    student's feature bank (or None; then x1, x2 are its backbone features, not images)."""
    st, n, d = inp.student, len(ctx.splits.train), ctx.dist
    bs, nv, steps = st.train.batch_size, st.train.cache_views, st.train.steps_per_epoch
    use_bank = bool(nv) and t is not None and t.spec["freeze_backbone"]
    if nv and not use_bank and t is not None:
        ctx.log("note: student.train.cache_views is ignored (the teacher backbone is not frozen)")
    if use_bank:
        tm = teacher_model_config(inp.teacher_stage.model, t.spec)
        cache = V.view_cache(ctx, model=t.model, model_cfg=tm, n_views=nv,
                             extract=inp.teacher_stage.train)
        tcodes = _bank_codes(t, cache, V.cache_path(ctx, tm, nv), ctx, n, nv)
        # a frozen student backbone sees the same bank views once: its head trains on features
        fb = V.student_feature_bank(ctx, cache, V.cache_path(ctx, tm, nv), model=student,
                                    model_cfg=st.model, extract=st.train) \
            if st.model.freeze_backbone else None
        inputs = fb.feats if fb is not None else cache.views

        def batches(epoch):
            for idx, v1, v2 in V.index_batches(n, batch_size=bs, epoch=epoch, seed=sseed,
                                               n_views=nv, steps=steps, dist=d):
                yield (inputs[idx, v1], inputs[idx, v2], idx, tcodes[idx, v1],
                       tcodes[idx, v2])
        return batches, cache, fb

    base = D.base_images(ctx.splits.train, ctx.data.view_size, ctx.data.num_workers)
    coded = t is not None and METHODS[inp.distill.method].kd_loss is not None

    def batches(epoch):
        for x1, x2, idx in V.fresh_batches(base, batch_size=bs, epoch=epoch, steps=steps,
                                           seed=sseed, mode=ctx.data.augment, dist=d):
            t1 = t2 = None
            if coded:
                with torch.no_grad():
                    t1 = t.model(D.prepare_batch(x1, t.spec["image_size"], ctx.device)).codes
                    t2 = t.model(D.prepare_batch(x2, t.spec["image_size"], ctx.device)).codes
            yield x1, x2, idx, t1, t2
    return batches, None, None


def _step_fn(inp: DistillInput, ctx: Context, fwd, t: _Teacher | None, features: bool):
    """``batch -> (loss, parts)``; ``features``: the batch holds backbone features, and
    ``fwd`` is the head alone."""
    method, dc, own = METHODS[inp.distill.method], inp.distill, inp.own
    weight = dc.kd_weight if dc.kd_weight is not None else method.weight
    size, cl, device = inp.student.model.image_size, inp.student.train.channels_last, ctx.device
    m = t.masks if t is not None else None
    ids = m.train_cluster_ids.to(device) if m is not None else None
    table = training_mask_table(m, dc.mask_convention).to(device) if m is not None else None
    centroids = m.centroids.to(device) if m is not None else None
    group = ctx.dist.group

    def step(batch):
        x1, x2, idx, t1, t2 = batch
        if features:
            s1, s2 = pair_forward(fwd, x1.to(device), x2.to(device))
        else:
            s1 = fwd(D.prepare_batch(x1, size, device, cl))
            s2 = fwd(D.prepare_batch(x2, size, device, cl))
        loss, parts = cibhash_loss(s1, s2, own.temperature, own.kl_weight, group)
        if method.kd_loss is None:
            return loss, parts
        kb = KDBatch(
            s1=s1, s2=s2, t1=t1.to(device).float(), t2=t2.to(device).float(),
            cluster_ids=ids[idx.to(device)] if ids is not None else None, mask_table=table,
            centroids=centroids, temperature=own.temperature, options=dc, group=group)
        kd = method.kd_loss(kb)
        parts["own"], parts["kd"] = float(loss.detach()), float(kd.detach())
        parts.update(kb.parts)  # the term's own diagnostics (e.g. BRCD's positives)
        return loss + weight * kd, parts
    return step


def _validator(inp: DistillInput, ctx: Context, student: HashModel, t: _Teacher | None, cache,
               fb: V.FeatureBank | None):
    sp, vs, topk = ctx.splits, ctx.data.view_size, ctx.topk
    size, device, d = inp.student.model.image_size, ctx.device, ctx.dist
    t_db: list[torch.Tensor] = []  # the teacher's database codes, encoded once

    def validate():  # in a torchrun job each rank encodes a shard and rank 0 scores
        if fb is not None:
            q = head_codes(student, fb.val_feats, device, dist=d)
            db = head_codes(student, fb.det_feats, device, dist=d)
        else:
            q = encode_images(student, sp.val, vs, size, device=device, dist=d)
            db = encode_images(student, sp.train, vs, size, device=device, dist=d)
        if t is not None and not t_db:
            t_db.append(head_codes(t.model, cache.det_feats, device, dist=d) if cache is not None
                        else encode_images(t.model, sp.train, vs, t.spec["image_size"],
                                           device=device, dist=d))
        if not d.main:
            return d.broadcast(None)
        res = {"sshp": retrieval_map(q, db, sp.val.labels, sp.train.labels, topk=topk)}
        if t is not None:
            res["ashp"] = retrieval_map(q, t_db[0], sp.val.labels, sp.train.labels,
                                       topk=topk)
        return d.broadcast(res)
    return validate


def distill(inp: DistillInput, ctx: Context) -> DistillResult:
    """Train the student with ``inp.distill.method`` (see :data:`brcd.losses.METHODS`).

    In a torchrun job (``ctx.dist``) each rank trains on its share of every global batch of
    ``student.train.batch_size`` rows behind DistributedDataParallel (:mod:`brcd.dist`).

    Args:
        inp: the student's settings and teacher. ctx: the run context.

    Returns:
        a :class:`DistillResult`.
    """
    seed_everything(ctx.seed)
    ctx.log(ctx.splits.summary())
    t = _teacher(inp, ctx)
    st, dc = inp.student, inp.distill
    sseed = ctx.seed if dc.seed is None else int(dc.seed)
    seed_everything(sseed)
    student = build_model(st.model, inp.bits, st.train.autocast).to(ctx.device)
    if st.train.channels_last:
        student.to(memory_format=torch.channels_last)
    d = ctx.dist
    n, bs = len(ctx.splits.train), st.train.batch_size
    check_batch_size(n, bs, "student")
    check_divisible(bs, "student.train.batch_size", d.world)
    batches, cache, fb = _batches(inp, ctx, t, sseed, student)
    fwd = d.wrap(_Head(student) if fb is not None else sync_batchnorm(student, d))
    fwd = torch.compile(fwd) if st.train.compile else fwd
    extra = {"kind": "student", "bits": inp.bits, "spec": model_spec(st.model, inp.bits),
             "config": ctx.record, "method": dc.method,
             "masks": t.masks.to_dict() if t is not None and t.masks is not None else None,
             "teacher_path": str(t.path.resolve()) if t is not None else None}
    trainer = Trainer(student, st.train, device=ctx.device, out_dir=ctx.out_dir, tag="student",
                      step_fn=_step_fn(inp, ctx, fwd, t, fb is not None), batches=batches,
                      steps_per_epoch=V.steps_per_epoch(n, bs, st.train.steps_per_epoch),
                      batch_images=bs * 2,
                      validate=(_validator(inp, ctx, student, t, cache, fb)
                                if len(ctx.splits.val) else None),
                      extra=extra, progress=ctx.progress, dist=d)
    if inp.resume:
        trainer.resume(inp.resume)
    history = trainer.fit()
    written = {w: trainer.path(w) for w in ("best_ashp", "best_sshp", "last")
               if trainer.path(w).is_file()}
    written = d.broadcast(written)  # rank 0 wrote them (another node may not see the folder)
    if not written:
        raise ValueError("distill produced no checkpoint (student.train.epochs = 0?)")
    return DistillResult(next(iter(written.values())), written, history, dict(trainer.best))
