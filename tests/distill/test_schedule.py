"""The lr schedule at hand-computed points."""

import pytest

from qadpipe.distill.schedule import lr_multiplier


def test_warmup_then_cosine():
    f = lr_multiplier("cosine", warmup_steps=4, max_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)  # half-way through decay: (1 + cos(pi/2)) / 2
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)  # stays at the floor past max_steps


def test_linear_constant_and_no_warmup():
    linear = lr_multiplier("linear", warmup_steps=0, max_steps=10, floor=0.1)
    assert linear(0) == pytest.approx(1.0) and linear(5) == pytest.approx(0.55) and linear(10) == pytest.approx(0.1)
    assert lr_multiplier("constant", warmup_steps=2, max_steps=10)(7) == 1.0


def test_cosine_decays_to_the_floor_by_hand():
    """floor + (1 - floor) * (1 + cos(pi * progress)) / 2: the floor at 0.1, half-way 0.55."""
    f = lr_multiplier("cosine", warmup_steps=0, max_steps=10, floor=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
