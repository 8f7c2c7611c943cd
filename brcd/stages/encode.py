"""The encode stage: build or load hashing models and turn images, views or cached features
into ±1 codes (or backbone features)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as D
from ..config import ModelConfig
from ..dist import Dist
from ..models import HashModel, create_model
from ..trainer import load_checkpoint

__all__ = [
    "resolve_device",
    "build_model",
    "model_spec",
    "load_model",
    "encode_batches",
    "encode_images",
    "encode_views",
    "FEATURE_BATCH",
    "map_batches",
    "head_codes",
    "encode",
    "shared_backbone_codes",
]


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as
    ``torch.device``, checked to exist (``ValueError`` naming the device otherwise)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    return dev


def build_model(mc: ModelConfig, bits: int, autocast: str = "none") -> HashModel:
    """A fresh model of ``mc``; ``autocast`` is the stage's ``train.autocast``."""
    model = create_model(mc.name, bits, pretrained=mc.pretrained, weights=mc.weights,
                         freeze_backbone=mc.freeze_backbone, head=mc.head, hidden=mc.hidden)
    return model.set_autocast(autocast)


def model_spec(mc: ModelConfig, bits: int) -> dict[str, Any]:
    """What a checkpoint stores to rebuild the model without weight files."""
    return {"name": mc.name, "bits": bits, "head": mc.head, "hidden": mc.hidden,
            "freeze_backbone": mc.freeze_backbone, "image_size": mc.image_size}


def load_model(ckpt: str | Path | dict, bits: int | None = None) -> tuple[HashModel, dict]:
    """Rebuild a hashing model from a brcd checkpoint (no weight files needed).

    Args:
        ckpt: checkpoint path or loaded dict. bits: if given, the expected code length.

    Returns:
        ``(model in eval mode, spec dict)``.

    Example:
        >>> model, spec = load_model("runs/brcd/student_last.pt")  # doctest: +SKIP
    """
    c = load_checkpoint(ckpt) if not isinstance(ckpt, dict) else ckpt
    spec = c["spec"]
    if bits is not None and spec["bits"] != bits:
        raise ValueError(f"checkpoint has {spec['bits']}-bit codes but bits={bits} was requested")
    model = create_model(spec["name"], spec["bits"], freeze_backbone=spec["freeze_backbone"],
                         head=spec["head"], hidden=spec["hidden"])
    try:
        model.load_state_dict(c["model"])
    except RuntimeError as err:  # weights of another architecture (a foreign or edited file)
        where = f"checkpoint {str(ckpt)!r}" if not isinstance(ckpt, dict) else "the checkpoint"
        raise ValueError(f"{where}: its weights do not fit its spec {spec['name']!r} "
                         f"({str(err).strip().splitlines()[0]})") from err
    return model.eval(), spec


# Images per forward pass of the frozen backbones: measured on a 2-core AVX2 EPYC (2 threads),
# Lite2 at 64 px encodes 443 img/s in batches of 48-64 and 282 in batches of 256 (whose
# activations overflow the caches); Lite0 at 48 px 891 vs 827
FEATURE_BATCH = 64


def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                device: torch.device | None = None) -> list[torch.Tensor]:
    """``fn`` (a forward pass, under inference mode) of each batch, in order. On a CPU process
    with several torch threads, one Python thread per torch thread runs whole batches with one
    intra-op thread each: Lite2 at 64 px, batches of 64, 2 cores: 1.2x the images/s of two
    intra-op threads on each batch (small convolutions split badly across threads); on a
    Sapphire Rapids-class VM no reliable gain (0.89-1.18x, ``bench/eval_speed.py``). While it
    runs, torch's process-wide intra-op thread count is 1 (restored after): other torch work
    in the process meanwhile runs single-threaded."""
    def one(x):
        with torch.inference_mode():
            return fn(x)

    threads = torch.get_num_threads()
    if (device is not None and device.type != "cpu") or threads < 2:
        return [one(x) for x in batches]
    torch.set_num_threads(1)
    out, pending = [], deque()
    try:
        with ThreadPoolExecutor(threads) as ex:
            for x in batches:  # a bounded window: the batches may come from a lazy reader
                pending.append(ex.submit(one, x))
                if len(pending) > 2 * threads:
                    out.append(pending.popleft().result())
            out += [f.result() for f in pending]
    finally:
        torch.set_num_threads(threads)
    return out


def encode_batches(model: HashModel, batches: Iterable[torch.Tensor], size: int, *,
                   device: torch.device | None = None, features: bool = False,
                   channels_last: bool = False) -> torch.Tensor:
    """Codes (or backbone features) of uint8 view batches, float32 on the CPU, in eval mode
    (:func:`map_batches`).

    Shape:
        batches of ``[B, 3, S, S]`` uint8 -> ``[N, L]`` codes or ``[N, D]`` features.
    """
    was = model.training
    model.eval()

    def fwd(x):
        x = D.prepare_batch(x, size, device, channels_last)
        return (model.features(x) if features else model(x).codes).float().cpu()
    out = map_batches(fwd, batches, device)
    model.train(was)
    return torch.cat(out)


def encode_images(model: HashModel, images: D.ImageSet, view_size: int, image_size: int, *,
                  device: torch.device, batch_size: int = 256, num_workers: int = 0,
                  features: bool = False, dist: Dist | None = None) -> torch.Tensor:
    """±1 codes (or backbone features) of the deterministic views of ``images``; with a
    torchrun ``dist``, each rank encodes its shard and every rank gets all the codes.

    Shape:
        -> ``[N, L]`` codes, or ``[N, D]`` features with ``features=True``.
    """
    if dist is not None and dist.enabled:
        return dist.sharded(len(images), lambda lo, hi: encode_images(
            model, images.subset(np.arange(lo, hi)), view_size, image_size, device=device,
            batch_size=batch_size, num_workers=num_workers, features=features))
    return encode_batches(model, D.eval_views(images, view_size, batch_size, num_workers),
                          image_size, device=device, features=features)


def encode_views(model: HashModel, views: torch.Tensor, size: int, *, batch: int = FEATURE_BATCH,
                 features: bool = False, channels_last: bool = True) -> torch.Tensor:
    """Codes (or features) of prepared uint8 views ``[N, 3, S, S]`` on the CPU, in batches."""
    return encode_batches(model, (views[i:i + batch] for i in range(0, len(views), batch)),
                          size, features=features, channels_last=channels_last)


@torch.no_grad()
def head_codes(model: HashModel, feats: torch.Tensor, device: torch.device,
               batch: int = 4096, dist: Dist | None = None) -> torch.Tensor:
    """±1 codes of cached backbone features ``[N, D]`` through the hash head (on the CPU);
    with a torchrun ``dist``, each rank codes its shard and every rank gets all the codes."""
    if dist is not None and dist.enabled:
        return dist.sharded(len(feats), lambda lo, hi: head_codes(model, feats[lo:hi], device,
                                                                  batch))
    was = model.training
    model.eval()
    out = [model.head_forward(feats[i:i + batch].to(device).float()).codes.cpu()
           for i in range(0, len(feats), batch)]
    model.train(was)
    return torch.cat(out)


def encode(checkpoint: str | Path | dict, images: D.ImageSet, view_size: int,
           device: str | torch.device = "auto", *, bits: int | None = None,
           batch_size: int = 256, dist: Dist | None = None) -> torch.Tensor:
    """The encode stage: ±1 codes ``[N, L]`` of ``images`` (deterministic view) by a checkpoint.

    Args:
        checkpoint: a teacher or student checkpoint (path or loaded dict).
        images: the images. view_size: ``data.view_size``. device: ``"auto"``, ``"cpu"``, ...
        bits: the expected code length (None: the checkpoint's). batch_size: images per batch.
        dist: a torchrun job: each rank encodes a shard, every rank gets all the codes.

    Returns:
        float32 ±1 codes on the CPU.

    Example:
        >>> codes = encode("runs/brcd/student_last.pt", splits.query, 16)  # doctest: +SKIP
    """
    model, spec = load_model(checkpoint, bits)
    dev = resolve_device(device)
    return encode_images(model.to(dev), images, view_size, spec["image_size"], device=dev,
                         batch_size=batch_size, dist=dist)


@torch.no_grad()
def shared_backbone_codes(checkpoints: dict[int, str | Path], views: dict[str, torch.Tensor], *,
                          autocast: str = "none") -> dict[int, dict[str, torch.Tensor]]:
    """Codes of several teachers (one per code length) that share one frozen backbone: the
    backbone features of each view set are computed once, then every head codes them.

    Args:
        checkpoints: ``{bits: teacher checkpoint}``. views: ``{name: uint8 [N, 3, S, S]}``.
        autocast: precision of the feature pass (``"none"`` | ``"bf16"``).

    Returns:
        ``{bits: {name: float32 ±1 codes [N, bits]}}``.
    """
    out, feats = {}, None
    for b, path in checkpoints.items():
        model, spec = load_model(path, b)
        if feats is None:
            model.set_autocast(autocast)
            feats = {k: encode_views(model, v, spec["image_size"], features=True)
                     for k, v in views.items()}
        out[b] = {k: model.head_forward(f).codes.float() for k, f in feats.items()}
    return out
