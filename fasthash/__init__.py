"""fasthash: bit-masked Hamming ops, a fused contrastive (BRCD / NT-Xent) loss and exact
Hamming search over packed binary codes.

Public names load lazily, so ``import fasthash`` is cheap and never imports triton; the
compiled core ``fasthash._C`` is optional (a one-time warning names the slower path).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> defining module
_EXPORTS = {
    "sign_ste": "fasthash.codes",
    "pack_codes": "fasthash.codes",
    "unpack_codes": "fasthash.codes",
    "to_faiss_bytes": "fasthash.codes",
    "from_faiss_bytes": "fasthash.codes",
    "backend_info": "fasthash.env",
    "masked_hamming_similarity": "fasthash.functional",
    "brcd_contrastive_loss": "fasthash.functional",
    "nt_xent_loss": "fasthash.functional",
    "hamming_distance": "fasthash.functional",
    "hamming_topk": "fasthash.search",
    "hamming_radius": "fasthash.search",
    "HammingIndex": "fasthash.index",
    "MIHIndex": "fasthash.mih",
}
_SUBMODULES = {
    "codes", "reference", "functional", "nn", "search", "index", "mih", "distributed", "sharded",
    "env", "ops",
}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)

try:
    from . import _C  # noqa: F401

    HAS_C = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    from .env import warn_once as _warn_once

    _C = None
    HAS_C = False
    _warn_once(
        "import:no-_C",
        "fasthash._C is not built: Hamming search falls back to the pure-torch reference "
        "(fasthash.reference.topk_ref), which is 10-100x slower. Build it with "
        "'pip install -e .' or 'python setup.py build_ext --inplace'.",
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fasthash.{name}")
    raise AttributeError(f"module 'fasthash' has no attribute {name!r}")


def __dir__():
    return __all__
