"""The masks stage: cluster the teacher's codes of the training split and store the clusters
and per-cluster bit masks WITH the teacher (``teacher_masks.pt``; BRCD_SPEC §4-5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis import false_negative_removals
from ..config import Config, MaskConfig, StageConfig
from ..masks import ClusterMasks, assign_clusters, cluster_stats, compute_cluster_masks
from ..models import HashModel
from ..trainer import load_checkpoint, save_checkpoint
from . import views as V
from .context import Context
from .encode import encode_images, head_codes, load_model
from .teacher import default_teacher, teacher_model_config

__all__ = ["MasksInput", "MasksResult", "build_masks", "teacher_train_codes", "load_teacher",
           "mask_stats"]


@dataclass(frozen=True, kw_only=True)
class MasksInput:
    """The masks section, the teacher checkpoint, its stage section (view cache settings) and
    the code length."""

    masks: MaskConfig
    teacher: Path
    teacher_stage: StageConfig
    bits: int

    @classmethod
    def from_config(cls, cfg: Config, teacher: str | Path | None = None) -> MasksInput:
        """The masks stage's input; ``teacher`` defaults to the trained one in ``out_dir``."""
        path = Path(teacher) if teacher else default_teacher(Path(cfg.out_dir))
        return cls(masks=cfg.masks, teacher=path, teacher_stage=cfg.teacher, bits=cfg.bits)


@dataclass
class MasksResult:
    """``checkpoint``: ``<out_dir>/teacher_masks.pt`` (the teacher + ``"masks"``)."""

    checkpoint: Path
    masks: ClusterMasks


def _teacher_checkpoint(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "teacher":
        raise ValueError(f"{path}: expected a teacher checkpoint, got {ckpt['kind']}")
    return ckpt


def load_teacher(path: Path, bits: int) -> tuple[dict, HashModel, dict]:
    """``(checkpoint, model in eval mode, spec)`` of a teacher checkpoint of ``bits`` bits."""
    ckpt = _teacher_checkpoint(path)
    if ckpt["bits"] != bits:
        raise ValueError(f"teacher and student must have the same bit length: teacher {path} has "
                         f"{ckpt['bits']} bits, student bits={bits}")
    model, spec = load_model(ckpt, bits)
    return ckpt, model, spec


def teacher_train_codes(ctx: Context, model: HashModel, spec: dict,
                        stage: StageConfig) -> torch.Tensor:
    """The teacher's ±1 codes of the training split (deterministic views): through the head on
    the cached features when the teacher trained on the view cache."""
    nv = stage.train.cache_views
    if nv and spec["freeze_backbone"]:
        cache = V.view_cache(ctx, model=model, model_cfg=teacher_model_config(stage.model, spec),
                             n_views=nv, extract=stage.train)
        return head_codes(model, cache.det_feats, ctx.device)
    return encode_images(model, ctx.splits.train, ctx.data.view_size, spec["image_size"],
                         device=ctx.device)


def build_masks(inp: MasksInput, ctx: Context) -> MasksResult:
    """k-means on the teacher's training codes and the bit masks, saved with the teacher.

    Args:
        inp: the masks settings and teacher. ctx: the run context.

    Returns:
        a :class:`MasksResult`.
    """
    ckpt = _teacher_checkpoint(inp.teacher)
    model, spec = load_model(ckpt, inp.bits)
    codes = teacher_train_codes(ctx, model.to(ctx.device), spec, inp.teacher_stage)
    mc = inp.masks
    masks = compute_cluster_masks(codes, ctx.splits.train_indices, mc.n_clusters, delta=mc.delta,
                                  convention=mc.convention, n_init=mc.n_init, seed=ctx.seed,
                                  choose_from=mc.choose_from)
    ctx.log(masks.report())
    ckpt = {**ckpt, "masks": masks.to_dict(), "teacher_source": str(inp.teacher)}
    return MasksResult(save_checkpoint(ckpt, ctx.out_dir / "teacher_masks.pt"), masks)


def mask_stats(inp: MasksInput, ctx: Context, batch_size: int | None = None) -> dict:
    """Cluster sizes, bits kept per cluster and the share of offset-positive bank views of a
    ``teacher_masks.pt`` (``inp.teacher``) trained on the view cache.

    Args:
        inp: the masks settings and teacher. ctx: the run context. batch_size: also the
            negatives per row that BRCD's false-negative rule removes in random batches of this
            size (``fn_removed_per_row``, ``fn_removed_share``; :mod:`brcd.analysis`).

    Returns:
        :func:`brcd.masks.cluster_stats` of the teacher's codes of every cached view.
    """
    ckpt = _teacher_checkpoint(inp.teacher)
    if ckpt.get("masks") is None:
        raise ValueError(f"{inp.teacher}: no clusters and masks in this teacher checkpoint; run "
                         "build-masks")
    model, spec = load_model(ckpt, inp.bits)
    st = inp.teacher_stage
    cache = V.view_cache(ctx, model=model, model_cfg=teacher_model_config(st.model, spec),
                         n_views=st.train.cache_views, extract=st.train)
    n, v, _ = cache.feats.shape
    codes = head_codes(model, cache.feats.flatten(0, 1), ctx.device).reshape(n, v, -1)
    masks = ClusterMasks.from_dict(ckpt["masks"])
    hat = assign_clusters(codes.flatten(0, 1).float(), masks.centroids).reshape(n, v)
    stats = cluster_stats(masks, codes, hat)
    if batch_size:  # what the false-negative rule removes in batches of the distill schedule
        fn = false_negative_removals(masks.train_cluster_ids, hat, batch_size=batch_size,
                                     n_batches=200, seed=ctx.seed)
        stats.update({"fn_removed_per_row": fn["per_row"], "fn_removed_share": fn["share"]})
    return stats
