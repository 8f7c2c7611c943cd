"""Image-folder support: decoding an image file of any mode, scanning a class-per-folder tree
(each file decoded once, cached while the tree is unchanged), and sizing the demo's protocol.

Plain functions of paths and label arrays; :mod:`brcd.data` registers the ``imagefolder``
loader on top of :func:`scan_imagefolder`, wraps :func:`protocol_sizes` as
:func:`brcd.data.demo_protocol`, and re-exports :data:`DEMO_PROTOCOL` and
:data:`IMAGE_SUFFIXES`. This module imports nothing from :mod:`brcd`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "read_image",
    "scan_imagefolder",
    "DEMO_PROTOCOL",
    "protocol_sizes",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


# ----------------------------------------------------------------------------- decoding
def _to_rgb(im) -> np.ndarray:
    """A PIL image of any mode as a contiguous uint8 ``[H, W, 3]`` array.

    Grey, palette and CMYK images go through ``convert("RGB")``; 16-bit / 32-bit integer and float
    greyscale are scaled to 0..255 first (``convert`` would clip a 16-bit PNG to white); images
    with transparency are composited onto white (their hidden colour is arbitrary, often black);
    the EXIF orientation of camera photos is applied.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        a = np.asarray(im, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        # integer data above 255 is 16-bit; float data in [0, 1] is a unit-range image
        scale = 255.0 / 65535.0 if hi > 255 else (255.0 if im.mode == "F" and hi <= 1.0 else 1.0)
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=-1))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        back = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(back, im)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def read_image(path: Path) -> torch.Tensor:
    """The image file ``path`` as uint8 ``[3, H, W]`` (any mode; see :func:`_to_rgb`).

    Raises:
        OSError: naming the file when it no longer decodes (changed or removed since the scan).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = _to_rgb(im)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {str(path)!r}: {err}") from err
    return torch.from_numpy(arr).permute(2, 0, 1)


# ----------------------------------------------------------------------------- scanning
def _imagefolder_files(root: Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """Class names and ``(class index, path)`` of the image files, from the listing alone.

    Hidden entries (``.ipynb_checkpoints/``, macOS ``._x.jpg`` forks) are neither classes nor
    images.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []
    for ci, cname in enumerate(classes):
        for f in sorted((root / cname).rglob("*")):
            rel = f.relative_to(root / cname).parts
            if (f.suffix.lower() in IMAGE_SUFFIXES and not any(x.startswith(".") for x in rel)
                    and f.is_file()):
                files.append((ci, f))
    return classes, files


def _readable(f: Path) -> bool:
    from PIL import Image

    try:  # verify() checks the container (e.g. PNG CRCs); load() decodes every pixel,
        # which catches truncated PNG / JPEG data that verify() lets through
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            # JPEG: decode at 1/8 scale; the whole entropy-coded stream is still read, so a
            # truncated file still fails, at a fraction of the cost
            im.draft(None, (1, 1))
            im.load()
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
        return False
    return True


# root -> (listing signature, readable paths, labels, skipped): the scan decodes every file once;
# a later load of an unchanged tree (same names, sizes and mtimes) reuses it, so demo_protocol
# followed by make_splits reads each image once
_SCANS: dict[str, tuple[tuple, list[Path], list[int], int]] = {}


def scan_imagefolder(root: Path, readable: Callable[[Path], bool] = _readable
                     ) -> tuple[list[str], list[Path], np.ndarray, int]:
    """Scan a class-per-folder tree: ``(classes, readable paths, labels, skipped)``.

    Every image file is decoded once to tell whether it is readable; files that do not decode are
    left out and counted (with a warning). An unchanged tree (same names, sizes and mtimes) is
    not decoded again. The returned lists are the caller's own.

    Args:
        root: one sub-folder of images per class (hidden entries are ignored).
        readable: ``readable(path) -> bool``, the decode check.

    Raises:
        ValueError: naming ``root`` when it is not a directory or holds no readable images.
    """
    if not root.is_dir():
        raise ValueError(f"imagefolder root {str(root)!r} is not a directory (data.root)")
    classes, files = _imagefolder_files(root)
    sig = (tuple(classes), tuple((ci, str(f), (st := f.stat()).st_size, st.st_mtime_ns)
                                 for ci, f in files))
    key = str(root.resolve())
    if key in _SCANS and _SCANS[key][0] == sig:
        _, paths, labels, skipped = _SCANS[key]
    else:
        paths, labels = [], []
        for ci, f in files:
            if readable(f):
                paths.append(f)
                labels.append(ci)
        skipped = len(files) - len(paths)
        _SCANS[key] = (sig, paths, labels, skipped)
    if not paths:
        raise ValueError(
            f"imagefolder {str(root)!r} holds no readable images (expected one sub-folder per "
            f"class with {sorted(IMAGE_SUFFIXES)} files; {skipped} unreadable skipped)"
        )
    if skipped:  # stacklevel: past the registered loader, to the load_pool call
        warnings.warn(f"imagefolder {root}: skipped {skipped} unreadable image(s)", stacklevel=3)
    return list(classes), list(paths), np.array(labels), skipped


# ----------------------------------------------------------------------------- demo protocol
# the demo's Fashion-MNIST protocol (brcd/configs/fashion-mnist.yaml; the demo's --quick)
DEMO_PROTOCOL: dict[bool, dict[str, int]] = {
    False: {"train_per_class": 500, "n_query": 1000, "n_database": 14000, "n_val": 500},
    True: {"train_per_class": 100, "n_query": 300, "n_database": 3000, "n_val": 200},
}


def _train_cap(n: int) -> int:
    # at most 4/5 of what the training images are drawn from, so validation queries remain
    return n * 4 // 5


def protocol_sizes(labels: np.ndarray, n_test: int, n_classes: int, *, quick: bool,
                   min_train: int = 64, test_fraction: float = 0.2, skipped: int = 0,
                   where: str = "the dataset") -> dict[str, int | None]:
    """The split sizes of the demo's protocol, scaled down to a pool.

    The protocol (:data:`DEMO_PROTOCOL`): 500 training images per class, 1,000 test queries, a
    14,000-image database (it contains the training split), 500 validation queries; ``quick``:
    100 per class, 300, 3,000, 200. Scaled down:

    * train: ``train_per_class = min(target, 4/5 of the smallest class in the pool)``; when that
      is under ``min_train`` images or under half of a random draw (one tiny class would starve
      the others), ``n_train = min(n_classes x target, 4/5 of the pool)`` random images instead;
    * val: ``min(target, pool images outside the training split)``;
    * database: ``max(n_train, min(target, pool))``; queries: ``min(target, test pool)``.

    The sizes always satisfy :func:`brcd.data.make_splits`' constraints.

    Args:
        labels: int labels ``[N]`` of the train pool (after any test hold-out).
        n_test: images in the test pool.
        n_classes: classes with readable images in the whole dataset.
        quick: the demo's ``--quick`` targets.
        min_train: fewest training images.
        test_fraction, skipped, where: for the error message only (the share held out as the
            test pool, unreadable files left out, and how to name the dataset).

    Returns:
        ``{"data.train_per_class", "data.n_train", "data.n_val", "data.n_database",
        "data.n_query"}``.

    Raises:
        ValueError: starting with ``where``, when fewer than 2 classes hold images or even a
            random draw stays under ``min_train`` (with the smallest size that splits).

    Example:
        >>> protocol_sizes(np.arange(200) % 2, 50, 2, quick=True)["data.train_per_class"]
        80
    """
    if n_classes < 2:
        raise ValueError(f"{where} holds readable images in {n_classes} class folder(s); the "
                         f"demo needs at least 2 (one sub-folder of images per class)")
    n_pool = len(labels)
    t = DEMO_PROTOCOL[bool(quick)]
    counts = np.bincount(labels)
    counts = counts[counts > 0]  # make_splits balances the classes present in the pool
    per_class = min(t["train_per_class"], _train_cap(int(counts.min())))
    n_bal = per_class * len(counts)
    n_rand = min(n_classes * t["train_per_class"], _train_cap(n_pool))
    if per_class >= 1 and n_bal >= min_train and 2 * n_bal >= n_rand:
        o = {"data.train_per_class": per_class, "data.n_train": None}
        n_train = n_bal
    elif n_rand >= min_train:
        o = {"data.train_per_class": None, "data.n_train": n_rand}
        n_train = n_rand
    else:
        need = next(n for n in itertools.count(2)  # the smallest folder that splits
                    if _train_cap(n - max(1, int(round(test_fraction * n)))) >= min_train)
        raise ValueError(
            f"{where} is too small to split: {n_pool + n_test} readable image(s) in {n_classes} "
            f"classes ({skipped} unreadable skipped); the demo needs at least {need} "
            f"({test_fraction:.0%} held out as test queries, then {min_train} training images, "
            f"one batch, and validation queries from the rest)"
        )
    return {
        **o,
        "data.n_val": min(t["n_val"], n_pool - n_train),
        "data.n_database": max(n_train, min(t["n_database"], n_pool)),
        "data.n_query": min(t["n_query"], n_test),
    }
