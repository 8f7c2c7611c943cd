"""Datasets by name, retrieval splits, deterministic views and model-input preparation.

Images are held as uint8 tensors ``[3, H, W]`` (grayscale is replicated to 3 channels).
:data:`DATASETS` is the registry of ``data.name`` values: config validation, the CLI's help and
the demo read it, and a new dataset is one loader decorated with :func:`register_dataset` (plus
its test). Image-folder decoding, scanning and the demo's protocol sizes live in
:mod:`brcd.imagefolder` (re-exported here); two-view augmentation in :mod:`brcd.augment`.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2 as T

from .imagefolder import DEMO_PROTOCOL, _readable, protocol_sizes, read_image, scan_imagefolder
from .imagefolder import IMAGE_SUFFIXES as IMAGE_SUFFIXES

__all__ = [
    "DATASETS",
    "Dataset",
    "register_dataset",
    "check_dataset",
    "ImageSet",
    "Splits",
    "load_pool",
    "make_splits",
    "demo_protocol",
    "DEMO_PROTOCOL",
    "read_idx",
    "eval_transform",
    "base_images",
    "eval_views",
    "prepare_batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageSet:
    """Images with integer labels: in memory (uint8 ``[N, C, H, W]``) or lazily from files.

    Attributes:
        labels: int64 numpy ``[N]``. classes: class names. skipped: unreadable files left out.
    """

    def __init__(self, labels: np.ndarray, classes: list[str], images: torch.Tensor | None = None,
                 paths: list[Path] | None = None, skipped: int = 0) -> None:
        self.images, self.paths = images, paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes, self.skipped = classes, skipped

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 ``[3, H, W]``."""
        img = self.images[i] if self.images is not None else read_image(self.paths[i])
        return img.expand(3, -1, -1) if img.shape[0] == 1 else img

    def subset(self, idx: np.ndarray) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            self.labels[idx], self.classes,
            images=None if self.images is None else self.images[torch.from_numpy(idx)],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
        )


@dataclass
class Splits:
    """Retrieval splits. Indices refer to the train pool (train/database/val) or test pool."""

    train: ImageSet
    query: ImageSet
    database: ImageSet
    val: ImageSet
    train_indices: np.ndarray
    num_classes: int
    name: str
    skipped: int = 0  # unreadable files the loader left out (imagefolder)

    def summary(self) -> str:
        skipped = f"; {self.skipped} unreadable file(s) skipped" if self.skipped else ""
        return (f"{self.name}: train {len(self.train)}, query {len(self.query)}, "
                f"database {len(self.database)}, val {len(self.val)} (val db = train){skipped}")


# ----------------------------------------------------------------------------- registry
Loader = Callable[[Path | None], "tuple[ImageSet, ImageSet | None]"]


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A registered dataset: ``loader(root) -> (train pool, test pool or None)``.

    Attributes:
        name: the ``data.name`` value. loader: reads the data (``root`` is None when the
        dataset needs none). default_root: the folder used when ``data.root`` is unset.
        needs_root: ``data.root`` must be given (no default folder). help: one line.
    """

    name: str
    loader: Loader
    default_root: str | None
    needs_root: bool
    help: str


DATASETS: dict[str, Dataset] = {}


def register_dataset(name: str, *, default_root: str | None = None, needs_root: bool = False,
                     help: str = "") -> Callable[[Loader], Loader]:
    """Register ``loader(root) -> (train pool, test pool or None)`` as dataset ``name``.

    A dataset without an official test split returns ``None`` as its test pool;
    :func:`make_splits` then holds out ``data.test_fraction`` of the pool.

    Args:
        name: the ``data.name`` value (must be new). default_root, needs_root, help: see
            :class:`Dataset`.

    Returns:
        a decorator that registers the loader and returns it.

    Example:
        >>> @register_dataset("ones", help="four white 8x8 images")
        ... def _ones(root):
        ...     return ImageSet(np.arange(4) % 2, ["a", "b"],
        ...                     images=torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)), None
        >>> len(load_pool("ones")[0]), DATASETS.pop("ones").name
        (4, 'ones')
    """
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")

    def deco(fn: Loader) -> Loader:
        DATASETS[name] = Dataset(name=name, loader=fn, default_root=default_root,
                                 needs_root=needs_root, help=help)
        return fn

    return deco


# ----------------------------------------------------------------------------- readers
def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain, detected from the magic bytes) into a numpy array."""
    data = _open_maybe_gz(Path(path))
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for cand in (root / stem, root / (stem + ".gz")):
        if cand.is_file():
            return cand
    raise ValueError(
        f"Fashion-MNIST file {stem}[.gz] not found under {str(root)!r}; install the Debian "
        f"package dataset-fashion-mnist or set data.root / --data-root"
    )


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


@register_dataset("fashion-mnist", default_root="/usr/share/datasets/fashion-mnist",
                  help="IDX files (Debian package dataset-fashion-mnist)")
def _fashion(root: Path) -> tuple[ImageSet, ImageSet]:
    out = []
    for split in ("train", "t10k"):
        x = read_idx(_find(root, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find(root, f"{split}-labels-idx1-ubyte"))
        out.append(ImageSet(y, FASHION_CLASSES, images=torch.from_numpy(x.copy())[:, None]))
    return out[0], out[1]


@register_dataset("digits", help="scikit-learn's 1,797 8x8 digits (no root)")
def _digits(root: Path | None) -> tuple[ImageSet, None]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return ImageSet(d.target, [str(i) for i in range(10)],
                    images=torch.from_numpy(x)[:, None]), None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a crafted batch file that names any
    other callable is refused instead of run (a pickle can call whatever it names)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            d = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"CIFAR-10 batch {str(path)!r} is not a python batch file: "
                         f"{exc}") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"CIFAR-10 batch {str(path)!r} lacks b'data' / b'labels'")
    return d


@register_dataset("cifar10", default_root="data/cifar10",
                  help="the python batches (cifar-10-batches-py)")
def _cifar10(root: Path) -> tuple[ImageSet, ImageSet]:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root

    def load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in names:
            f = base / n
            if not f.is_file():
                raise ValueError(
                    f"CIFAR-10 batch {str(f)!r} not found; put the python batches "
                    f"(cifar-10-batches-py) under data.root / --data-root"
                )
            d = _read_cifar_batch(f)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    xtr, ytr = load([f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = load(["test_batch"])
    return (ImageSet(ytr, classes, images=torch.from_numpy(xtr)),
            ImageSet(yte, classes, images=torch.from_numpy(xte)))


@register_dataset("imagefolder", needs_root=True,
                  help="one sub-folder of images per class under data.root")
def _imagefolder(root: Path) -> tuple[ImageSet, None]:
    """Class-per-folder images (any size and mode: grey, RGB, RGBA, palette, 16-bit), read
    lazily; files that do not decode are skipped and counted (``ImageSet.skipped``)."""
    # _readable is looked up here at call time, so patching brcd.data._readable takes effect
    classes, paths, labels, skipped = scan_imagefolder(root, readable=_readable)
    return ImageSet(labels, classes, paths=paths, skipped=skipped), None


def load_pool(name: str, root: str | Path | None = None) -> tuple[ImageSet, ImageSet | None]:
    """Load a registered dataset by name: ``(train pool, test pool or None)``.

    Args:
        name: a key of :data:`DATASETS` (fashion-mnist: IDX files, default
            /usr/share/datasets/fashion-mnist; cifar10: python batches; imagefolder: a
            class-per-subfolder tree; digits: no root).
        root: data directory; None = the dataset's default root.
    """
    check_dataset(name)
    ds = DATASETS[name]
    if root is None and ds.needs_root:
        raise ValueError(f"dataset {name!r} needs data.root / --data-root")
    r = root if root is not None else ds.default_root
    path = Path(r) if r is not None else None
    if name == "imagefolder":  # its loader keeps its own per-file scan cache
        return ds.loader(path)
    key = (name, str(path.resolve()) if path is not None else None, _stamp(path))
    if key not in _POOLS:  # one load per process: the demo's workers run many jobs each
        _POOLS.clear()
        _POOLS[key] = ds.loader(path)
    return _POOLS[key]


# load_pool's last result, keyed by dataset, root and its files' names, sizes and mtimes
_POOLS: dict[tuple, tuple[ImageSet, ImageSet | None]] = {}


def _stamp(root: Path | None) -> tuple:
    if root is None or not root.is_dir():
        return ()
    return tuple(sorted((str(e), e.stat().st_size, e.stat().st_mtime_ns)
                        for e in root.rglob("*") if e.is_file()))


def check_dataset(name: str) -> None:
    """Raise ``ValueError`` naming the valid datasets unless ``name`` is registered."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASETS)}")


def _balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"train_per_class={per_class} but class {c} has only {len(idx)}")
        out.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(out))


def _hold_out(n: int, test_fraction: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(test indices, pool indices)`` of a pool of ``n`` without a test split: the
    first draw of :func:`make_splits`' generator, so :func:`demo_protocol` can replay it."""
    perm = rng.permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return np.sort(perm[:n_test]), np.sort(perm[n_test:])


def make_splits(cfg, seed: int = 0) -> Splits:
    """Build train / query / database / validation splits from a :class:`DataConfig`.

    * train: ``train_per_class`` per class (the paper's CIFAR-10 protocol: 500) or ``n_train``
      random images of the train pool;
    * query: ``n_query`` random images of the test pool (None = all);
    * database: the train pool (``n_database`` = a random subset that contains the train split);
    * val: ``n_val`` train-pool images outside the training subset; validation queries retrieve
      against the training subset, so model selection never sees the test queries.
    Datasets without a test split hold out ``test_fraction`` of the pool as the test pool.
    """
    rng = np.random.default_rng(seed)
    pool, test = load_pool(cfg.name, cfg.root)
    skipped = pool.skipped
    if test is None:
        test_idx, pool_idx = _hold_out(len(pool), cfg.test_fraction, rng)
        test, pool = pool.subset(test_idx), pool.subset(pool_idx)
    n_pool = len(pool)
    if cfg.train_per_class:
        train_idx = _balanced(pool.labels, cfg.train_per_class, rng)
    else:
        n_train = n_pool if cfg.n_train is None else int(cfg.n_train)
        if not 2 <= n_train <= n_pool:
            raise ValueError(f"data.n_train must be in [2, {n_pool}], got {cfg.n_train}")
        train_idx = np.sort(rng.choice(n_pool, n_train, replace=False))
    rest = np.setdiff1d(np.arange(n_pool), train_idx)
    if cfg.n_val > len(rest):
        raise ValueError(f"data.n_val={cfg.n_val} but only {len(rest)} pool images remain")
    val_idx = np.sort(rng.choice(rest, cfg.n_val, replace=False)) if cfg.n_val else rest[:0]
    if cfg.n_database is None:
        db_idx = np.arange(n_pool)
    else:
        extra = int(cfg.n_database) - len(train_idx)
        if not 0 <= extra <= len(rest):
            raise ValueError(
                f"data.n_database must be in [{len(train_idx)}, {n_pool}], got {cfg.n_database}"
            )
        db_idx = np.sort(np.concatenate([train_idx, rng.choice(rest, extra, replace=False)]))
    n_query = len(test) if cfg.n_query is None else int(cfg.n_query)
    if not 1 <= n_query <= len(test):
        raise ValueError(f"data.n_query must be in [1, {len(test)}], got {cfg.n_query}")
    q_idx = np.sort(rng.choice(len(test), n_query, replace=False))
    return Splits(
        train=pool.subset(train_idx), query=test.subset(q_idx), database=pool.subset(db_idx),
        val=pool.subset(val_idx), train_indices=train_idx,
        num_classes=len(pool.classes), name=cfg.name, skipped=skipped,
    )


def demo_protocol(name: str, root: str | None, *, quick: bool, seed: int = 0,
                  test_fraction: float = 0.2, min_train: int = 64) -> dict[str, Any]:
    """The ``data.*`` overrides of the demo's protocol, scaled down to what a dataset holds.

    The protocol is :data:`DEMO_PROTOCOL`, scaled by :func:`brcd.imagefolder.protocol_sizes`
    (which states the rules; the sizes always satisfy :func:`make_splits`' constraints). A
    dataset without a test split first holds out ``test_fraction`` of its images as the test
    pool, with the draw :func:`make_splits` makes for ``seed``, so the per-class counts used are
    exactly those it will see. An image folder is scanned once: :func:`make_splits` reuses it.

    Args:
        name: a registered dataset (the demo passes ``"imagefolder"``).
        root: its folder (``--data-root``); None = the dataset's default (returned as data.root).
        quick: the demo's ``--quick`` targets.
        seed: the ``cfg.seed`` that :func:`make_splits` will get (the demo's is 0).
        test_fraction: share held out as the test pool when the dataset has no test split.
        min_train: fewest training images (the preset's batch size: a step needs that many
            distinct images; it also covers k-means' ``masks.n_clusters`` of 10).

    Returns:
        ``{"data.name", "data.root", "data.train_per_class", "data.n_train", "data.n_query",
        "data.n_database", "data.n_val", "data.test_fraction"}`` overrides for
        :func:`brcd.config.load_config`.

    Raises:
        ValueError: naming ``--data-root`` when it is required and missing, not a folder, or
            holds under 2 classes with readable images or too few images (with the minimum).

    Example:
        >>> o = demo_protocol("digits", None, quick=True)
        >>> o["data.train_per_class"], o["data.n_query"], o["data.n_database"], o["data.n_val"]
        (100, 300, 1438, 200)
    """
    check_dataset(name)
    ds = DATASETS[name]
    if root is None and ds.needs_root:
        raise ValueError(f"--data-root is required for --dataset {name}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = str(root) if root is not None else ds.default_root
    where = f"--data-root {root!r}"
    if ds.needs_root and not Path(root).is_dir():
        raise ValueError(f"{where} is not a directory (expected one sub-folder of images per "
                         f"class)")
    try:
        pool, test = load_pool(name, root)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if test is None:
        test_idx, pool_idx = _hold_out(len(pool), test_fraction, np.random.default_rng(seed))
        n_test, labels = len(test_idx), pool.labels[pool_idx]
    else:
        n_test, labels = len(test), pool.labels
    sizes = protocol_sizes(labels, n_test, len(np.unique(pool.labels)), quick=quick,
                           min_train=min_train, test_fraction=test_fraction,
                           skipped=pool.skipped, where=where)
    return {"data.name": name, "data.root": root, **sizes, "data.test_fraction": test_fraction}


# ----------------------------------------------------------------------------- transforms
def eval_transform(size: int) -> T.Compose:
    """Deterministic view: resize the shorter side to ``size`` and centre-crop (uint8)."""
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)])


class _EvalDataset(TorchDataset):
    def __init__(self, images: ImageSet, size: int) -> None:
        self.images, self.t = images, eval_transform(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.t(self.images.get(i)).contiguous()


def _worker_init(worker_id: int) -> None:
    # Views are keyed per sample; this only makes any other numpy randomness in a worker
    # deterministic too.
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)


def loader(ds: TorchDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """An ordered DataLoader with per-worker deterministic seeding."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      worker_init_fn=_worker_init if num_workers else None)


def eval_views(images: ImageSet, size: int, batch_size: int = 256, num_workers: int = 0):
    """Iterate the deterministic uint8 views ``[B, 3, size, size]`` of ``images`` in order."""
    return loader(_EvalDataset(images, size), batch_size, num_workers)


def base_images(images: ImageSet, size: int, num_workers: int = 0) -> torch.Tensor:
    """All deterministic views as one uint8 tensor ``[N, 3, size, size]`` (the augmentation
    input: in-memory datasets are resized; imagefolder images are resized and centre-cropped)."""
    if images.images is not None and images.images.shape[-1] == images.images.shape[-2] == size:
        return images.images.expand(-1, 3, -1, -1).contiguous()
    return torch.cat(list(eval_views(images, size, 512, num_workers)))


def prepare_batch(x: torch.Tensor, size: int, device: torch.device | str | None = None,
                  channels_last: bool = False) -> torch.Tensor:
    """uint8 views ``[B, 3, H, W]`` → float ImageNet-normalised ``[B, 3, size, size]``.

    Resizing happens batched (bilinear, antialiased) on ``device``, so every model can take the
    same uint8 views at its own resolution.
    """
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
