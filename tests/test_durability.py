"""The attack window and the backdoor's lifespan, on constructed attack-success sequences."""

import math

import pytest

from fl_defense.attacks.poisoning import AttackSchedule
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.durability import lifespan, mean_after_window, window_metrics


def seq(*values):
    return dict(enumerate(values))  # round 0 is the initial model


def test_window_end_worst_and_lifespans():
    #          r0   r1   r2   r3   r4   r5   r6   r7   r8
    asr = seq(0.0, 0.3, 0.9, 0.95, 0.8, 0.6, 0.4, 0.2, 0.05)
    m = window_metrics(asr, start=2, stop=4)
    assert m["window_closed"] and m["asr_window_end"] == 0.8
    assert m["asr_window_worst"] == 0.95 and m["worst_round"] == 3
    assert m["lifespan_50"] == 2  # round 6 is the first below 0.5
    assert m["lifespan_10"] == 4  # round 8


def test_mean_after_the_window_is_the_tails_mean_and_none_while_open():
    asr = seq(0.0, 0.3, 0.9, 0.95, 0.8, 0.6, None, 0.2, 0.05)
    assert mean_after_window(asr, 4) == pytest.approx((0.6 + 0.2 + 0.05) / 3)  # round 6 unknown: left out
    assert mean_after_window(asr, 8) is None and mean_after_window(asr, 0) is None


def test_never_below_within_the_run():
    m = window_metrics(seq(0.0, 0.9, 0.9, 0.7, 0.6, 0.3), start=1, stop=2)
    assert m["lifespan_50"] == 3 and m["lifespan_10"] is None


def test_below_immediately():
    # already below 0.5 at the window's end: 0; below 0.1 in the first round without attack: 1
    m = window_metrics(seq(0.0, 0.6, 0.3, 0.05, 0.5), start=1, stop=2)
    assert m["lifespan_50"] == 0 and m["lifespan_10"] == 1
    assert lifespan(seq(0.0, 0.6, 0.3, 0.05, 0.5), 2, 0.1) == 1


def test_window_still_open_at_the_end():
    asr = seq(0.0, 0.5, 0.7, 0.6)
    for stop in (0, 3, 5):  # no end, ends at the last round, ends after the run
        m = window_metrics(asr, start=1, stop=stop)
        assert not m["window_closed"] and m["lifespan_50"] is None and m["lifespan_10"] is None
        assert m["asr_window_end"] == 0.6 and m["asr_window_worst"] == 0.7 and m["worst_round"] == 2


def test_unknown_rounds_never_count_as_below():
    m = window_metrics({0: 0.0, 1: 0.9, 2: None, 3: math.nan, 4: 0.2}, start=1, stop=1)
    assert m["lifespan_50"] == 3 and m["asr_window_worst"] == 0.9


def test_schedule_stops_after_the_stop_round():
    s = AttackSchedule(10, 0.3, seed=1, start_round=2, every=1, stop_round=4)
    assert [bool(s.attackers(r)) for r in range(1, 7)] == [False, True, True, True, False, False]
    assert AttackSchedule(10, 0.3, seed=1, start_round=2).attackers(100)  # 0: never stops


def test_stop_before_start_fails_naming_the_key():
    with pytest.raises(ConfigError, match="'attack-stop-round'"):
        ExperimentConfig.from_run_config({"attack-start-round": 5, "attack-stop-round": 3})
    with pytest.raises(ConfigError, match="'attack-stop-round'"):
        ExperimentConfig.from_run_config({"attack-stop-round": -1})
    assert ExperimentConfig.from_run_config({"attack-stop-round": 5}).attack_stop_round == 5
