"""ordered_map: the reader's bounded, in-order parallel decode."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qadpipe.cache.reader import ordered_map


def test_results_come_in_input_order_with_bounded_work_in_flight():
    started, lock = [], threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.02 if x % 3 == 0 else 0.0)   # out-of-order completion
        return x * x

    consumed = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        for result in ordered_map(pool, slow_square, range(20), ahead=4):
            consumed.append(result)
            with lock:
                # never more than `ahead` items submitted beyond what was consumed
                assert len(started) <= len(consumed) + 4
    assert consumed == [x * x for x in range(20)]


def test_an_exception_surfaces_at_its_items_turn():
    def fail_on_five(x: int) -> int:
        if x == 5:
            raise ValueError("bad batch 5")
        return x

    got = []
    with ThreadPoolExecutor(max_workers=2) as pool, pytest.raises(ValueError, match="bad batch 5"):
        for value in ordered_map(pool, fail_on_five, range(10), ahead=2):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]
