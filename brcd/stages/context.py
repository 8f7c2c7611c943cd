"""What every stage shares: the run context and the student's own-loss settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, DataConfig, config_to_dict
from ..data import Splits, make_splits
from ..dist import Dist, current
from ..files import check_folder

__all__ = ["Context", "OwnLoss", "make_context"]


@dataclass(frozen=True)
class Context:
    """One run's shared state: built once by :func:`brcd.task.context` from a ``Config``.

    Attributes:
        splits: the retrieval splits of ``data`` / ``seed``. data: the data section (keys the
        view cache). seed: the run seed (split, view bank). device: where models run.
        out_dir: checkpoints and logs. cache_dir: the view cache folder. topk: K of the
        validation mAP@K. record: the run's config as a dict, stored in every checkpoint.
        progress: show logs and progress bars. logger: where log lines go (default print).
        dist: the torchrun job this process is a rank of (:mod:`brcd.dist`; default a single
        process).
    """

    splits: Splits
    data: DataConfig
    seed: int
    device: torch.device
    out_dir: Path
    cache_dir: Path
    topk: int
    record: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    logger: Callable[[str], None] | None = None
    dist: Dist = field(default_factory=Dist)

    def log(self, msg: str) -> None:
        """Log ``msg`` when ``progress`` is on."""
        if self.progress:
            (self.logger or print)(msg)


@dataclass(frozen=True)
class OwnLoss:
    """``L_own`` of a hashing model (BRCD_SPEC §2): NT-Xent temperature and the KL weight."""

    temperature: float = 0.3
    kl_weight: float = 0.001

    @classmethod
    def from_config(cls, cfg: Config) -> OwnLoss:
        """The top-level ``temperature`` and ``kl_weight`` of ``cfg``."""
        return cls(cfg.temperature, cfg.kl_weight)


def make_context(cfg: Config, progress: bool = True, splits: Splits | None = None,
                 logger: Callable[[str], None] | None = None) -> Context:
    """Validate ``cfg``, apply ``cfg.threads``, resolve the device and build the splits.

    Args:
        cfg: the run config. progress: logs and progress bars.
        splits: ``make_splits(cfg.data, cfg.seed)`` when None (pass them to skip the reload).
        logger: where log lines go (default print).

    In a torchrun job (:func:`brcd.dist.init` ran) the device is the rank's and only rank 0
    shows logs and progress.

    Returns:
        the :class:`Context` every stage of the run shares.
    """
    from .encode import resolve_device

    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = check_folder(cfg.out_dir, "out_dir")
    if cfg.cache_dir:
        check_folder(cfg.cache_dir, "cache_dir")
    if splits is None:
        splits = make_splits(cfg.data, cfg.seed)
    d = current()
    return Context(splits=splits, data=cfg.data, seed=cfg.seed,
                   device=d.device if d.enabled else resolve_device(cfg.device), out_dir=out,
                   cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else out / "cache",
                   topk=cfg.topk, record=config_to_dict(cfg), progress=progress and d.main,
                   logger=logger, dist=d)
