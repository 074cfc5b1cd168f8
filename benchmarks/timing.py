"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time


def best(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
