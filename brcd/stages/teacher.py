"""The teacher stage: train the teacher hashing model without labels (CIBHash loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import data as D
from ..config import Config, ModelConfig, StageConfig
from ..dist import check_divisible, sync_batchnorm
from ..losses import cibhash_loss
from ..models import pair_forward
from ..trainer import Trainer, seed_everything
from . import views as V
from .context import Context, OwnLoss
from .encode import build_model, encode_images, head_codes, model_spec
from .evaluate import retrieval_map

__all__ = ["TeacherInput", "TeacherResult", "train_teacher", "teacher_model_config",
           "default_teacher", "check_batch_size"]


@dataclass(frozen=True, kw_only=True)
class TeacherInput:
    """The teacher section, the code length, the own loss and an optional checkpoint to resume."""

    stage: StageConfig
    bits: int
    own: OwnLoss = field(default_factory=OwnLoss)
    resume: Path | None = None

    @classmethod
    def from_config(cls, cfg: Config, resume: str | Path | None = None) -> TeacherInput:
        """The teacher stage's input from a run config."""
        return cls(stage=cfg.teacher, bits=cfg.bits, own=OwnLoss.from_config(cfg),
                   resume=Path(resume) if resume else None)


@dataclass
class TeacherResult:
    """``checkpoint``: the teacher to use next (best on validation, else the last epoch);
    ``history``: one record per epoch; ``best``: the best validation mAP per paradigm."""

    checkpoint: Path
    history: list[dict[str, Any]]
    best: dict[str, float]


def check_batch_size(n: int, batch_size: int, stage: str) -> None:
    """A step needs ``batch_size`` distinct training images."""
    if n < batch_size:
        raise ValueError(f"{stage}.train.batch_size={batch_size} exceeds the {n} training images")


def train_teacher(inp: TeacherInput, ctx: Context) -> TeacherResult:
    """Train the teacher: on cached frozen-backbone features of the view bank when
    ``train.cache_views`` is set (the head only), else on fresh views of the images.

    In a torchrun job (``ctx.dist``) each rank trains on its share of every global batch of
    ``train.batch_size`` rows behind DistributedDataParallel (:mod:`brcd.dist`).

    Args:
        inp: the teacher's settings. ctx: the run context.

    Returns:
        a :class:`TeacherResult`.
    """
    seed_everything(ctx.seed)
    st, splits, device, d = inp.stage, ctx.splits, ctx.device, ctx.dist
    model = build_model(st.model, inp.bits, st.train.autocast).to(device)
    n, bs, nv = len(splits.train), st.train.batch_size, st.train.cache_views
    check_batch_size(n, bs, "teacher")
    check_divisible(bs, "teacher.train.batch_size", d.world)
    size, cl, steps = st.model.image_size, st.train.channels_last, st.train.steps_per_epoch
    if cl:
        model.to(memory_format=torch.channels_last)
    sync_batchnorm(model, d)
    own, group = inp.own, d.group
    cache = None
    if nv:
        cache = V.view_cache(ctx, model=model, model_cfg=st.model, n_views=nv, extract=st.train)
        head = d.wrap(model, "head_forward")

        def batches(epoch):
            for idx, v1, v2 in V.index_batches(n, batch_size=bs, epoch=epoch, seed=ctx.seed,
                                               n_views=nv, steps=steps, dist=d):
                yield cache.feats[idx, v1], cache.feats[idx, v2]

        def step(batch):
            f1, f2 = (b.to(device).float() for b in batch)
            return cibhash_loss(*pair_forward(head, f1, f2), own.temperature, own.kl_weight,
                                group)
    else:
        base = D.base_images(splits.train, ctx.data.view_size, ctx.data.num_workers)
        fwd = d.wrap(model)
        fwd = torch.compile(fwd) if st.train.compile else fwd

        def batches(epoch):
            return V.fresh_batches(base, batch_size=bs, epoch=epoch, steps=steps, seed=ctx.seed,
                                   mode=ctx.data.augment, dist=d)

        def step(batch):
            x1, x2 = (D.prepare_batch(b, size, device, cl) for b in batch[:2])
            return cibhash_loss(fwd(x1), fwd(x2), own.temperature, own.kl_weight, group)

    def validate():  # each rank encodes a shard; rank 0 scores
        vs = ctx.data.view_size
        db = (head_codes(model, cache.det_feats, device, dist=d) if cache is not None else
              encode_images(model, splits.train, vs, size, device=device, dist=d))
        q = encode_images(model, splits.val, vs, size, device=device, dist=d)
        return d.broadcast({"teacher": retrieval_map(
            q, db, splits.val.labels, splits.train.labels, topk=ctx.topk)} if d.main else None)

    extra = {"kind": "teacher", "bits": inp.bits, "spec": model_spec(st.model, inp.bits),
             "config": ctx.record}
    trainer = Trainer(model, st.train, device=device, out_dir=ctx.out_dir, tag="teacher",
                      step_fn=step, batches=batches,
                      steps_per_epoch=V.steps_per_epoch(n, bs, steps), batch_images=bs * 2,
                      validate=validate if len(splits.val) else None, extra=extra,
                      progress=ctx.progress, dist=d)
    if inp.resume:
        trainer.resume(inp.resume)
    history = trainer.fit()
    best = trainer.path("best_teacher")
    use_best = d.broadcast(best.is_file())  # rank 0 wrote it: its answer holds on every rank
    return TeacherResult(best if use_best else trainer.path("last"), history,
                         dict(trainer.best))


def default_teacher(out: Path) -> Path:
    """The trained teacher in ``out``: ``teacher_best_teacher.pt``, else ``teacher_last.pt``."""
    for name in ("teacher_best_teacher.pt", "teacher_last.pt"):
        if (out / name).is_file():
            return out / name
    raise ValueError(f"no teacher checkpoint in {str(out)!r}; run train-teacher first or pass "
                     f"--teacher PATH")


def teacher_model_config(mc: ModelConfig, spec: dict) -> ModelConfig:
    """The :class:`ModelConfig` of a trained teacher: ``mc`` with the checkpoint's backbone name
    and input size (what keys its view cache).

    Args:
        mc: the teacher section's model config. spec: the checkpoint's ``"spec"``.

    Returns:
        a new :class:`ModelConfig`.
    """
    return ModelConfig(**{**mc.__dict__, "name": spec["name"], "image_size": spec["image_size"]})
