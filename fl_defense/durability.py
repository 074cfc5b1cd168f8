"""The attack window and the backdoor's lifespan after it, from attack success per round.

Attackers attack in rounds ``start .. stop`` (the window; ``stop`` 0: no end). Reported:

- ``asr_window_end``: attack success at the window's last recorded round;
- ``asr_window_worst`` and ``worst_round``: the highest attack success inside the window;
- ``lifespan_50`` / ``lifespan_10``: rounds after the window until attack success falls below
  0.5 / 0.1, that is ``r - stop`` for the first round ``r >= stop`` whose attack success is below
  the threshold: 0 when it is already below at the window's end, 1 when it falls in the first
  round without attack, None when it never does within the run or the window is still open at
  the run's end (then ``window_closed`` is false);
- ``mean_after_window``: mean attack success over the rounds after the window (the tail without
  attack), None while the window is open. Under client sampling the attackers may sit out the
  window's last rounds, so a backdoor can already have faded at its end (lifespan 0); the tail's
  mean still tells a backdoor that stays at 0.3 from one back at the floor.

Rounds whose attack success is unknown (None or NaN) never count as below a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

THRESHOLDS = {"lifespan_50": 0.5, "lifespan_10": 0.1}


def _known(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def lifespan(asr: Mapping[int, float | None], stop: int, threshold: float) -> int | None:
    """Rounds after round ``stop`` until attack success first falls below ``threshold`` (0: below
    at ``stop`` already); None when it never does among the recorded rounds."""
    for r in sorted(k for k in asr if k >= stop):
        if _known(asr[r]) and asr[r] < threshold:
            return r - stop
    return None


def mean_after_window(asr: Mapping[int, float | None], stop: int) -> float | None:
    """Mean attack success over the recorded rounds after round ``stop`` (unknown ones left out);
    None when ``stop`` is 0 (no end) or no known round follows it."""
    after = [asr[r] for r in asr if stop > 0 and r > stop and _known(asr[r])]
    return sum(after) / len(after) if after else None


def window_end_round(last: int, stop: int) -> int:
    """The round ``asr_window_end`` is read in: the window's last round, or the run's last
    recorded round ``last`` while the window is still open (``stop`` past it, or 0: no end)."""
    return min(stop, last) if stop > 0 else last


def window_metrics(asr: Mapping[int, float | None], start: int, stop: int) -> dict:
    """Attack success at the window's end, its worst round, and the lifespans (module docstring),
    from ``asr``: round -> attack success (round 0, the initial model, is never in the window)."""
    last = max(asr, default=0)
    closed = stop > 0 and stop < last
    end = window_end_round(last, stop)
    inside = [r for r in sorted(asr) if max(start, 1) <= r <= end and _known(asr[r])]
    worst = max(inside, key=lambda r: asr[r], default=None)  # the first of equal highs
    out = {
        "start_round": start, "stop_round": stop, "window_closed": closed,
        "asr_window_end": asr[end] if end in asr and _known(asr[end]) and end >= start else None,
        "asr_window_worst": asr[worst] if worst is not None else None,
        "worst_round": worst,
    }
    for name, threshold in THRESHOLDS.items():
        out[name] = lifespan(asr, stop, threshold) if closed else None
    return out


__all__ = ["THRESHOLDS", "lifespan", "mean_after_window", "window_end_round", "window_metrics"]
