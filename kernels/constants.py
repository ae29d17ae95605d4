"""Numbers shared by the kernels and the references (torch only; ``_triton_utils`` holds their Triton constexprs)."""

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Added to the linear branch's denominator: ``o_l = phi(q) S / (DENOM_EPS + phi(q) . z)``.
DENOM_EPS = 1e-5
INT8_MAX = 127.0
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
# Keeps the scale of an all-zero block a normal fp32 number; every value of such a block quantizes to 0.
SCALE_FLOOR = 1e-30
