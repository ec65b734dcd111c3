"""Named constants of the number formats; no logic (torchao ``mx_formats/constants.py`` style)."""

from __future__ import annotations

import torch

# E2M1 (FP4): 1 sign, 2 exponent, 1 mantissa bit.  The nibble's low 3 bits index this grid.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest normal, 6 = 1.5 * 2**2 (OCP MX v1.0, table 1)
# Halfway from 6 to 8, the next value with one more exponent: below it rounding alone gives 6,
# so only elements beyond it are changed by the saturating clamp.
E2M1_SATURATES_ABOVE = 7.0

# FP8 E4M3 (the "fn" variant: no infinities, 0x7F/0xFF are NaN).
FP8_E4M3_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0
FP8_E4M3_EMAX = 8  # 448 = 1.75 * 2**8
# Halfway from 448 to 480 (the code 0x7E + 1, NaN in the fn variant); ties round to 448 (even).
FP8_E4M3_SATURATES_ABOVE = 464.0
# Rounded toward zero, everything below 480 (the step past 448) becomes 448 without the clamp.
FP8_E4M3_TOWARD_ZERO_SATURATES_ABOVE = 480.0
# Floor of a dynamic per-token FP8 scale in vLLM (its CUDA kernel's min_scaling_factor and
# QuantFP8's _FP8_MIN_SCALING_FACTOR): amax/448, but never below 1/(448 * 512).
FP8_MIN_DYNAMIC_SCALE = 1.0 / (FP8_E4M3_MAX * 512.0)

# E8M0 shared scale of the MX formats: an unsigned biased exponent; 255 is NaN.
E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
E8M0_NAN = 255

# Block sizes fixed by the formats themselves.
NVFP4_BLOCK = 16
MX_BLOCK = 32

# compressed-tensors replaces a zero scale by the smallest step of its storage dtype
# (``_get_dtype_eps``): 0.125 for FP8 scales, ``finfo(dtype).eps`` for float scales.
FP8_ZERO_SCALE = 0.125
