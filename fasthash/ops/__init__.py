"""Fused ops: torch.library registrations (``registry``), the blocked torch CPU path
(``blocked``) and the Triton kernels (``*_triton``, imported lazily: only CUDA paths and tests
import triton).

Importing this package registers the ``fasthash::`` custom ops; it never imports triton.
"""

from . import registry  # noqa: F401  (registers the fasthash:: ops)
