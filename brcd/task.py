"""The BRCD pipeline from a ``Config``: teacher → clusters/masks → student → evaluation.

Each function here turns a :class:`~brcd.config.Config` into one stage's typed input
(:mod:`brcd.stages`) and the shared :class:`~brcd.stages.Context`, runs the stage and returns
its main output; the CLI subcommands are one call each.

Checkpoints (``<out_dir>``): ``teacher_{last,best_teacher}.pt``; ``teacher_masks.pt`` (teacher +
clusters + masks, written by :func:`build_masks`); ``student_{last,best_sshp,best_ashp}.pt``
(student + masks + the teacher checkpoint path). Validation: val queries against the training
split (teacher/teacher, SSHP, ASHP); test evaluation: query split against the database split.
The frozen-backbone view cache (``<stage>.train.cache_views``) is described in
:mod:`brcd.stages.views`.
"""

from __future__ import annotations

from pathlib import Path

from . import data as D
from . import stages as S
from .config import Config, ModelConfig
from .stages import teacher as _teacher
from .stages.encode import encode, encode_images, load_model, resolve_device
from .stages.evaluate import retrieval_map
from .stages.views import ViewCache

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


def train_teacher(cfg: Config, resume: str | Path | None = None, progress: bool = True) -> Path:
    """Train the teacher hashing model with the CIBHash-style loss (no labels).

    Returns:
        path of the checkpoint to use next: ``teacher_best_teacher.pt`` when validation ran,
        else ``teacher_last.pt``.
    """
    ctx = S.make_context(cfg, progress)
    ctx.log(ctx.splits.summary())
    return S.train_teacher(S.TeacherInput.from_config(cfg, resume), ctx).checkpoint


def build_masks(cfg: Config, teacher: str | Path | None = None, progress: bool = True) -> Path:
    """Cluster the teacher's codes of the training split and store masks WITH the teacher.

    Args:
        cfg: the run config (data split, masks section, bits).
        teacher: teacher checkpoint; default ``<out_dir>/teacher_best_teacher.pt`` or
            ``teacher_last.pt``.

    Returns:
        path of ``<out_dir>/teacher_masks.pt`` (the teacher checkpoint + ``"masks"``).
    """
    ctx = S.make_context(cfg, progress)
    return S.build_masks(S.MasksInput.from_config(cfg, teacher), ctx).checkpoint


def distill(cfg: Config, teacher: str | Path | None = None, resume: str | Path | None = None,
            progress: bool = True) -> Path:
    """Train the student with ``cfg.distill.method`` (a key of :data:`brcd.losses.METHODS`).

    Args:
        cfg: run config. teacher: teacher checkpoint with masks (default
            ``<out_dir>/teacher_masks.pt``; a method that needs masks needs them there; one that
            needs no teacher runs without when none exists). resume: a ``student_last.pt``.

    Returns:
        path of ``student_best_ashp.pt`` (or ``_sshp`` / ``_last`` when that is all there is).
    """
    ctx = S.make_context(cfg, progress)
    return S.distill(S.DistillInput.from_config(cfg, teacher, resume), ctx).checkpoint


def evaluate(cfg: Config, student: str | Path | None = None, teacher: str | Path | None = None,
             progress: bool = True, with_teacher: bool = True) -> dict[str, float]:
    """Test-protocol mAP@topk: query split vs database split.

    Returns:
        ``{"teacher": T/T, "sshp": S/S, "ashp": S query vs T database}`` for the models given
        (the student's teacher is taken from its checkpoint when ``teacher`` is None and
        ``with_teacher``; ``with_teacher=False`` gives SSHP only, without encoding the teacher).
    """
    ctx = S.make_context(cfg, progress)
    ctx.log(ctx.splits.summary())
    return S.evaluate(S.EvalInput.from_config(cfg, student, teacher, with_teacher), ctx)


def teacher_model_config(cfg: Config, spec: dict) -> ModelConfig:
    """The teacher :class:`ModelConfig` of a trained teacher: ``cfg.teacher.model`` with the
    checkpoint's backbone name and input size (what keys its view cache).

    Example:
        >>> _, spec = load_model("runs/brcd/teacher_masks.pt")  # doctest: +SKIP
        >>> teacher_model_config(cfg, spec).image_size  # doctest: +SKIP
        64
    """
    return _teacher.teacher_model_config(cfg.teacher.model, spec)


def view_cache(cfg: Config, splits: D.Splits | None = None, log=print,
               teacher: str | Path | dict | None = None) -> ViewCache:
    """Load or build the frozen-teacher-backbone view cache of ``cfg``.

    Builds nothing when ``<cache_dir or out_dir/cache>/views_<key>.pt`` exists. Otherwise makes
    ``cfg.teacher.train.cache_views`` augmented views per training image and extracts their
    features with the teacher backbone under ``teacher.train.autocast`` and
    ``teacher.train.channels_last``. :func:`train_teacher`, :func:`build_masks` and
    :func:`distill` of the same data/seed/teacher backbone then reuse it.

    Args:
        cfg: run config; needs ``teacher.model.freeze_backbone`` and
            ``teacher.train.cache_views >= 2``.
        splits: ``brcd.data.make_splits(cfg.data, cfg.seed)`` when None.
        log: where log lines go (``print`` also shows a progress bar).
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
    from .trainer import load_checkpoint

    ctx = S.make_context(cfg, splits=splits, logger=log)
    nv = cfg.teacher.train.cache_views
    if nv < 2:
        raise ValueError(f"view_cache needs teacher.train.cache_views >= 2, got {nv}")
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
    model = None
    if not S.views.cache_path(ctx, mc, nv).is_file():  # build a backbone only when needed
        model = (load_model(ckpt, cfg.bits)[0] if ckpt is not None
                 else S.build_model(mc, cfg.bits, cfg.teacher.train.autocast)).to(ctx.device)
    return S.view_cache(ctx, model=model, model_cfg=mc, n_views=nv, extract=cfg.teacher.train)
