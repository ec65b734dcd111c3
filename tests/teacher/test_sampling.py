"""Sampled-target draws: the right distribution, deterministic, ids + counts exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qadpipe.errors import TeacherError
from qadpipe.teacher.sampling import counts_by_row, draw_indices, sequence_seed


def test_draws_follow_a_known_distribution() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.125, 0.125], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    uniforms = np.random.default_rng(0).random((2, 40000))
    draws = draw_indices(probs, uniforms)
    freq = np.bincount(draws[0], minlength=5) / 40000
    expected = probs[0].numpy()
    assert freq[1] == 0.0  # zero-probability tokens are never drawn
    chi2 = 40000 * float(((freq - expected)[expected > 0] ** 2 / expected[expected > 0]).sum())
    assert chi2 < 20  # 3 degrees of freedom: p ~ 2e-4
    assert (draws[1] == 4).all()


def test_a_uniform_on_a_cdf_step_draws_the_next_column_with_mass() -> None:
    """Guards searchsorted(right=True): column j owns [cdf_{j-1}, cdf_j), so a uniform exactly
    at a CDF value belongs to the next column -- a zero-probability column (an empty
    interval) is never drawn even at u = 0, or where its CDF value repeats."""
    assert draw_indices(torch.tensor([[0.0, 1.0]], dtype=torch.float64), np.array([[0.0]])).tolist() == [[1]]
    assert draw_indices(torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64), np.array([[0.5]])).tolist() == [[2]]
    # hand-worked: CDF 0.25, 0.25, 0.75, 1 -> [0, .25) col 0; [.25, .75) col 2; [.75, 1) col 3
    draws = draw_indices(torch.tensor([[0.25, 0.0, 0.5, 0.25]], dtype=torch.float64),
                         np.array([[0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.9999]]))
    assert draws.tolist() == [[0, 0, 2, 2, 2, 3, 3]]


def test_unnormalised_rows_are_scaled_not_skewed() -> None:
    probs = torch.tensor([[0.3, 0.3, 0.3]], dtype=torch.float32)  # sums to 0.9 (fp32 round-off, exaggerated)
    draws = draw_indices(probs, np.random.default_rng(1).random((1, 30000)))
    assert np.allclose(np.bincount(draws[0], minlength=3) / 30000, 1 / 3, atol=0.015)


def test_counts_by_row_matches_a_per_row_unique() -> None:
    draws = np.random.default_rng(2).integers(0, 7, size=(50, 13))
    offsets, values, counts = counts_by_row(draws)
    for row in range(50):
        unique, expected = np.unique(draws[row], return_counts=True)
        a, b = offsets[row], offsets[row + 1]
        assert values[a:b].tolist() == unique.tolist() and counts[a:b].tolist() == expected.tolist()
    assert counts.sum() == draws.size and counts.dtype == np.int32


def test_sequence_seed_depends_on_seed_and_id_only() -> None:
    assert sequence_seed(0, "abc") == sequence_seed(0, "abc")
    assert len({sequence_seed(0, "abc"), sequence_seed(1, "abc"), sequence_seed(0, "abd")}) == 3
    assert 0 <= sequence_seed(5, "x") < 2 ** 63


@pytest.mark.parametrize("bad_row", [[0.5, float("nan"), 0.5], [0.5, float("inf"), 0.5], [0.0, 0.0, 0.0]])
def test_a_row_without_finite_mass_is_refused_not_drawn_as_the_last_column(bad_row) -> None:
    probs = torch.tensor([[0.2, 0.3, 0.5], bad_row], dtype=torch.float64)
    with pytest.raises(TeacherError, match=r"^sequence 's' position 8: the teacher's probabilities are NaN/inf"):
        draw_indices(probs, np.random.default_rng(0).random((2, 10)), lambda row: f"sequence 's' position {7 + row}")


def test_a_column_of_a_billionth_keeps_its_interval_in_the_float64_cdf() -> None:
    """Hand-worked: CDF 0.5, 0.5 + 1e-9, 1.  The uniform 0.5 + 5e-10 lies in column 1's
    interval; a float32 CDF (0.5 + 1e-9 rounds to 0.5) would give that column no interval at all,
    and over a 49k vocabulary every column of the long tail would lose its share."""
    probs = torch.tensor([[0.5, 1e-9, 0.5 - 1e-9]], dtype=torch.float64)
    assert draw_indices(probs, np.array([[0.5 + 5e-10, 0.4999999, 0.5 + 2e-9]])).tolist() == [[1, 0, 2]]


def test_sequence_seeds_are_pinned_across_versions() -> None:
    """A cache resumed (or rerun) by a later qadpipe must draw the same sampled targets for the
    same (seed, id): these values are fixed, not recomputed, and (1, '2x') is not (12, 'x')."""
    assert sequence_seed(0, "abc") == 3423306031300463063
    assert sequence_seed(7, "doc-3") == 2391537939962129126
    assert sequence_seed(1, "2x") != sequence_seed(12, "x")
