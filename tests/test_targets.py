"""tail_mass_from_logprobs, the tail every top-k backend stores, against hand-worked values."""

from __future__ import annotations

import numpy as np

from qadpipe.targets import tail_mass_from_logprobs


def test_tail_mass_is_summed_in_float64():
    """A top-1 of 1 - 1e-8: its fp32 log-prob is -1e-8, which float32 exp() rounds to 1.0 (a tail of 0);
    summed in float64 the tail is 1e-8 (to 1e-8 relative: -1e-8 as float32 is not exactly -1e-8)."""
    lp = np.array([[np.float32(-1e-8), -np.inf]], dtype=np.float32)
    tail = tail_mass_from_logprobs(lp)
    assert tail.dtype == np.float64
    assert abs(tail[0] - 1e-8) < 1e-15


def test_tail_mass_is_clamped_to_0_1():
    """fp32 log-probs that overshoot (0.6 + 0.41 = 1.01) give a tail of 0, not -0.01."""
    lp = np.log(np.array([[0.6, 0.41], [0.25, 0.25]], dtype=np.float64)).astype(np.float32)
    np.testing.assert_allclose(tail_mass_from_logprobs(lp), [0.0, 0.5], rtol=1e-6, atol=0)
