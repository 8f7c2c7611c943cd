"""Numeric constants shared by the blocked torch path and the Triton kernels.

Triton-free (``blocked`` imports it on every CPU call); the kernel files wrap these values in
``tl.constexpr`` where a ``@triton.jit`` function reads them.
"""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E), the kernels' base-2 logits
LN2 = 0.6931471805599453  # ln(2): log(x) = log2(x) * LN2

# The contrastive log-sum-exp may shift every logit by the bound 1/tau instead of keeping a
# running max: exp(G - 1/tau) cannot overflow (|G| <= 1/tau for unit rows) and stays a normal
# number down to G = -1/tau as long as 2/tau is below this limit of the compute dtype, so one exp
# per logit suffices. Beyond it (tau < ~0.025 in fp32) the online max is used. The Triton kernels
# compute in fp32.
FIXED_SHIFT_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}
