"""Run configuration: dataclasses for data / models / masks / losses / training, loaded from YAML.

A config is one :class:`Config` with nested sections. Presets live in ``brcd/configs/*.yaml``
(package data); :func:`load_config` takes a preset name or a YAML path plus dotted overrides
(``{"teacher.train.epochs": 3}``), checks every key and value, and returns the dataclass.
Choices are validated against the registries that define them: ``data.name`` (:data:`brcd.data.
DATASETS`), ``data.augment`` (:data:`brcd.augment.AUGMENTERS`), ``distill.method``
(:data:`brcd.losses.METHODS`), ``masks.convention`` and ``distill.mask_convention``
(:data:`brcd.masks.CONVENTIONS`), ``<stage>.train.autocast`` and ``<stage>.model.head``
(:mod:`brcd.models`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "StageConfig",
    "MaskConfig",
    "DistillConfig",
    "Config",
    "load_config",
    "list_presets",
    "config_to_dict",
    "config_from_dict",
    "override",
    "parse_yaml",
]

# Presets ship as package data next to this module.
_CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass
class DataConfig:
    """Dataset and split protocol.

    ``train_per_class`` (if set) draws a class-balanced training subset, else ``n_train`` images.
    Queries come from the official test split (or a held-out part of the pool when a dataset has
    none), the database from the training pool (``n_database: null`` = the whole pool), and the
    validation queries from the training pool outside the training subset; validation retrieves
    against the training subset, so it never touches the test queries.
    """

    name: str = "digits"
    root: str | None = None
    view_size: int = 16  # side of the augmented / deterministic uint8 views (before each model)
    augment: str = "batched"  # batched (vectorised) | torchvision (per-sample v2 pipeline)
    n_train: int | None = 1000
    train_per_class: int | None = None
    n_query: int | None = 300
    n_database: int | None = None
    n_val: int = 200
    test_fraction: float = 0.2  # for datasets without a test split (digits, imagefolder)
    num_workers: int = 0


@dataclass
class ModelConfig:
    """A hashing model: backbone name, head, weights, input size."""

    name: str = "tiny-cnn"
    head: str = "linear"
    hidden: int = 512
    pretrained: bool = False
    weights: str | None = None
    freeze_backbone: bool = False
    image_size: int = 16


@dataclass
class TrainConfig:
    """Optimisation of one stage (teacher or student)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    cosine: bool = False
    grad_clip: float | None = 5.0
    amp: bool = True  # only takes effect on CUDA
    # CPU precision of the backbone features: "none" (float32) | "bf16" (bf16 autocast around
    # the backbone, float32 features out; CUDA keeps ``amp``). Applies to this stage's model
    # wherever it is built and, for the teacher, to the view-cache feature extraction.
    autocast: str = "none"
    compile: bool = False
    eval_every: int = 1  # epochs; 0 disables validation
    cache_views: int = 0  # >0: precompute frozen-backbone features of this many views per image
    steps_per_epoch: int | None = None  # None = one pass over the training subset
    # channels-last inputs/weights (faster CPU/GPU convolutions); the teacher's setting also
    # applies to the view-cache feature extraction
    channels_last: bool = False
    keep_epochs: bool = False  # also keep <tag>_epoch<N>.pt for every epoch (else only last/best)
    # epochs between <tag>_last.pt checkpoints, 0 = the final epoch only (which always writes
    # one); the metrics log is written with them, so a resume re-runs the epochs the log lacks
    save_every: int = 1


@dataclass
class StageConfig:
    """Model + optimisation for one network."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class MaskConfig:
    """k-means clusters on teacher codes and per-cluster bit masks (BRCD_SPEC §4-5)."""

    n_clusters: int = 10
    choose_from: list[int] | None = None  # candidates for C, picked by silhouette
    n_init: int = 10
    delta: float = 0.5
    convention: str = "agree"  # agree: keep |mu| > delta; redundant: keep |mu| <= delta; none


@dataclass
class DistillConfig:
    """Student objective: ``L_own + L_BRCD`` or a KD baseline."""

    method: str = "brcd"  # brcd | none | kd-codes | sp | rkd
    alpha: float = 0.8
    use_mask: bool = True
    offset_positive: bool = True
    false_negative: bool = True
    # BRCD anchors the student's view-1 codes only (the paper); symmetric also anchors view 2
    # (mean of both directions), as the KD baselines and L_own use both views
    symmetric: bool = False
    # the mask table BRCD trains with: None = the teacher checkpoint's (masks.convention), else
    # agree | redundant | none | zero rebuilt from its centroids and delta (an ablation; "zero"
    # is the research code's all-zero table, BRCD_SPEC §8.1). Cluster ids, hence offset
    # positives and false negatives, are the checkpoint's whatever the table.
    mask_convention: str | None = None
    kd_weight: float | None = None  # None = the method's default (see brcd.losses)
    seed: int | None = None  # student-only seed (init, batch order, views); None = cfg.seed


@dataclass
class Config:
    """Everything a run needs; see ``brcd/configs/*.yaml``."""

    seed: int = 0
    bits: int = 16
    device: str = "auto"
    threads: int = 0  # torch intra-op CPU threads; 0 = torch's default
    out_dir: str = "runs/brcd"
    cache_dir: str | None = None  # view/feature cache; None = <out_dir>/cache
    temperature: float = 0.3
    kl_weight: float = 0.001
    topk: int = 1000
    data: DataConfig = field(default_factory=DataConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    student: StageConfig = field(default_factory=StageConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> Config:
        """Raise ``ValueError`` naming the offending option; return self."""
        from .augment import AUGMENTERS
        from .data import check_dataset
        from .losses import METHODS
        from .masks import CONVENTIONS
        from .models import AUTOCAST_MODES, HEADS

        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits <= 0:
            raise ValueError(f"bits must be a positive integer, got {self.bits!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0 (0 = torch's default), got "
                             f"{self.threads!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string (auto | cpu | cuda | cuda:N), got "
                             f"{self.device!r}")
        _check_plain_values(config_to_dict(self), "")
        _check_ranges(config_to_dict(self))
        check_dataset(self.data.name)
        _choice("distill.method", self.distill.method, METHODS)
        _choice("masks.convention", self.masks.convention, CONVENTIONS)
        if self.distill.mask_convention is not None and (
                not isinstance(self.distill.mask_convention, str)
                or self.distill.mask_convention not in CONVENTIONS):
            raise ValueError(
                f"distill.mask_convention must be null (the teacher checkpoint's mask table) or "
                f"one of {list(CONVENTIONS)}, got {self.distill.mask_convention!r}")
        _choice("data.augment", self.data.augment, AUGMENTERS)
        for stage in ("teacher", "student"):
            s: StageConfig = getattr(self, stage)
            if s.train.cache_views == 1 or s.train.cache_views < 0:
                raise ValueError(
                    f"{stage}.train.cache_views must be 0 (off) or >= 2 (two distinct views per "
                    f"step), got {s.train.cache_views}"
                )
            if s.train.cache_views and not s.model.freeze_backbone and stage == "teacher":
                raise ValueError(
                    "teacher.train.cache_views needs teacher.model.freeze_backbone: true "
                    "(cached features are only valid for a frozen backbone)"
                )
            _choice(f"{stage}.train.autocast", s.train.autocast, AUTOCAST_MODES)
            _choice(f"{stage}.model.head", s.model.head, HEADS)
        return self


@dataclass(frozen=True)
class _Range:
    """The numbers a config key accepts: ``kind`` (int, or float = any finite number), bounds
    (inclusive unless ``*_open``) and whether null is allowed."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None:
            what += f" {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            what += f"{' and' if self.lo is not None else ''} {'<' if self.hi_open else '<='} "
            what += f"{self.hi}"
        return what + (" or null" if self.nullable else "")

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if isinstance(v, bool) or not isinstance(v, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok


_STAGE_RANGES = {
    "model.hidden": _Range(int, 1), "model.image_size": _Range(int, 8),
    "train.epochs": _Range(int, 0), "train.batch_size": _Range(int, 2),
    "train.lr": _Range(float, 0, lo_open=True), "train.weight_decay": _Range(float, 0),
    "train.grad_clip": _Range(float, 0, lo_open=True, nullable=True),
    "train.eval_every": _Range(int, 0), "train.steps_per_epoch": _Range(int, 1, nullable=True),
    "train.save_every": _Range(int, 0),
}
# every numeric key with the values a run can use (checked before anything runs, so a bad
# value fails with one line naming the key instead of deep inside a stage)
_RANGES: dict[str, _Range] = {
    "seed": _Range(int, 0, 2**63 - 1), "bits": _Range(int, 1), "threads": _Range(int, 0),
    "temperature": _Range(float, 0, lo_open=True), "kl_weight": _Range(float, 0),
    "topk": _Range(int, 1), "data.view_size": _Range(int, 8),
    "data.n_train": _Range(int, 2, nullable=True),
    "data.train_per_class": _Range(int, 1, nullable=True),
    "data.n_query": _Range(int, 1, nullable=True), "data.n_database": _Range(int, 1, nullable=True),
    "data.n_val": _Range(int, 0),
    "data.test_fraction": _Range(float, 0, 1, lo_open=True, hi_open=True),
    "data.num_workers": _Range(int, 0), "masks.n_clusters": _Range(int, 2),
    "masks.n_init": _Range(int, 1), "masks.delta": _Range(float, 0, 1, hi_open=True),
    "distill.alpha": _Range(float, 0, 1), "distill.kd_weight": _Range(float, 0, nullable=True),
    "distill.seed": _Range(int, 0, 2**63 - 1, nullable=True),
    **{f"{st}.{k}": r for st in ("teacher", "student") for k, r in _STAGE_RANGES.items()},
}


def _check_ranges(d: dict[str, Any]) -> None:
    for key, rng in _RANGES.items():
        node: Any = d
        for part in key.split("."):
            node = node[part]
        if not rng.ok(node):
            raise ValueError(f"{key} must be {rng.describe()}, got {node!r}")


def _check_plain_values(node: Any, where: str) -> None:
    """Every value must be YAML-plain (checkpoints store the config as plain data)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if type(k) is not str:
                raise ValueError(f"config key {where}{k!r}: keys must be strings, got "
                                 f"{type(k).__name__}")
            _check_plain_values(v, f"{where}{k}.")
    elif isinstance(node, (list, tuple)):
        for v in node:
            _check_plain_values(v, where)
    elif type(node) not in (str, int, float, bool, type(None)):
        raise ValueError(f"config key {where[:-1]!r} must be a string, number, boolean, list or "
                         f"null, got {type(node).__name__} {node!r}")


def _choice(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"{key} must be one of {list(valid)}, got {value!r}")


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in ``brcd/configs``."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.yaml"))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or '<root>'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(
                f"unknown config key {where + key!r}; valid keys here: {sorted(fields)}"
            )
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (unknown keys raise ``ValueError``)."""
    return _build(Config, data, "").validate()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    source: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Load a preset name or YAML file, apply dotted overrides and validate.

    Args:
        source: a preset name (see :func:`list_presets`), a path to a YAML file, or None
            (built-in defaults: digits, tiny CNNs).
        overrides: ``{"dotted.key": value}``, e.g. ``{"bits": 32, "student.train.epochs": 2}``.

    Returns:
        the validated :class:`Config`.

    Example:
        >>> cfg = load_config("fashion-mnist", {"bits": 32}); cfg.bits
        32
    """
    data: dict[str, Any] = {}
    if source is not None:
        src = str(source)
        path = Path(src)
        if not path.is_file():
            if src in list_presets():
                text = (_CONFIG_DIR / f"{src}.yaml").read_text()
            else:
                raise ValueError(
                    f"config {src!r} is neither a YAML file nor a preset; presets: {list_presets()}"
                )
        else:
            text = path.read_text()
        data = parse_yaml(text, f"config {src!r}") or {}
    return config_from_dict(_apply_dotted(data, overrides or {}))


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with a one-line ``ValueError`` naming ``where`` for invalid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML{at}: {problem}") from err


def _apply_dotted(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        node: dict[str, Any] = {}
        cur = node
        parts = key.split(".")
        for p in parts[:-1]:
            cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = value
        data = _merge(data, node)
    return data


def override(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted overrides (``cfg`` itself is unchanged).

    Args:
        cfg: a config. overrides: ``{"dotted.key": value}``, e.g. ``{"bits": 32}``.

    Returns:
        the new :class:`Config`.

    Example:
        >>> override(load_config("digits"), {"student.train.epochs": 2}).student.train.epochs
        2
    """
    return config_from_dict(_apply_dotted(config_to_dict(cfg), overrides))
