"""Choosing RLR's theta (issue #21): the exact keep probabilities, checked against the issue's
figures and against RLR's own sign vote on constructed rounds."""

from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_defense.defenses import RLR
from fl_defense.defenses.rlr import (
    attackers_per_round,
    choose_theta,
    effective_theta,
    format_tradeoff,
    keep_probability,
    theta_tradeoff,
)
from fl_defense.defenses.rlr_theta import main
from tests.helpers import round_updates


def test_the_issues_figures_for_three_attackers_of_ten():
    # 7 honest coin-flip signs beside 3 attackers: 65/128 at theta 4 (64 with the attackers, 1
    # with all 7 against), 29/128 at 6, 8/128 at 8.
    assert keep_probability(10, 3, 4) == pytest.approx(65 / 128)
    assert keep_probability(10, 3, 6) == pytest.approx(29 / 128)
    assert keep_probability(10, 3, 8) == pytest.approx(8 / 128)
    assert [round(keep_probability(10, 3, t), 2) for t in (4, 6, 8)] == [0.51, 0.23, 0.06]
    # 10 votes sum to even numbers: 5 acts as 6, 7 as 8, and the table says so
    assert keep_probability(10, 3, 5) == keep_probability(10, 3, 6)
    assert keep_probability(10, 3, 7) == keep_probability(10, 3, 8)
    assert effective_theta(10, 5) == 6 and effective_theta(10, 6) == 6 and effective_theta(9, 4) == 5


def test_consensus_coordinates_and_edge_cases():
    # everyone agrees: always kept up to theta = n; nobody agrees: the same (all vote the other way)
    assert keep_probability(10, 0, 10, 1.0) == 1.0
    assert keep_probability(10, 0, 10, 0.0) == 1.0
    assert keep_probability(10, 10, 10) == 1.0  # all attackers
    assert keep_probability(9, 0, 1) == 1.0  # 9 nonzero votes never sum to 0: theta 1 flips nothing
    assert keep_probability(10, 0, 1) == pytest.approx(1 - comb(10, 5) / 2**10)  # 10 can tie at 0
    # 10 clients agreeing with probability 0.8, theta 8: at least 9 agree, or at most 1
    q = 0.8
    exact = sum(comb(10, k) * q**k * (1 - q) ** (10 - k) for k in (0, 1, 9, 10))
    assert keep_probability(10, 0, 8, q) == pytest.approx(exact)
    with pytest.raises(ValueError, match="num_attackers"):
        keep_probability(10, 11, 4)
    with pytest.raises(ValueError, match="benign_agreement"):
        keep_probability(10, 3, 4, 1.5)


def test_attackers_per_round_is_hypergeometric():
    dist = attackers_per_round(100, 10, 10)
    assert sum(dist.values()) == pytest.approx(1.0)
    assert sum(a * p for a, p in dist.items()) == pytest.approx(1.0)  # 10 * 10/100
    assert dist[0] == pytest.approx(comb(90, 10) / comb(100, 10))
    assert attackers_per_round(10, 3, 10) == {3: 1.0}  # full participation: always all three
    with pytest.raises(ValueError):
        attackers_per_round(10, 11, 5)


def test_tradeoff_rows_and_chooser():
    rows = theta_tradeoff(10, 3, consensus=(0.8,))
    assert [r["theta"] for r in rows] == list(range(1, 11))
    attack = [r["attack"] for r in rows]
    benign = [r[0.8] for r in rows]
    assert attack == sorted(attack, reverse=True) and benign == sorted(benign, reverse=True)
    assert rows[3]["attack"] == pytest.approx(65 / 128)
    # with a distribution, the attack column averages over the rounds that have an attacker
    dist = attackers_per_round(100, 10, 10)
    row = theta_tradeoff(10, dist, thetas=[6], consensus=())[0]
    with_attackers = {a: p for a, p in dist.items() if a > 0}
    expected = sum(p * keep_probability(10, a, 6) for a, p in with_attackers.items()) / sum(with_attackers.values())
    assert row["attack"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="sum to 1"):
        theta_tradeoff(10, {1: 0.5})
    assert choose_theta(10, 3) == 6  # 0.23 <= 0.25 < 0.51
    assert choose_theta(10, 3, max_attack_keep=0.1) == 8
    assert choose_theta(10, 2) == 6
    table = format_tradeoff(rows)
    assert "| 4 | 4 | 0.508 | 0.880 |" in table and "| 5 | 6 | 0.227 | 0.678 |" in table


def test_command_prints_the_table(capsys):
    main(["--clients", "10", "--attackers", "3", "--consensus", "0.8"])
    out = capsys.readouterr().out
    assert "| 8 | 8 | 0.062 | 0.376 |" in out
    main(["--clients", "10", "--population", "100", "--malicious", "10", "--consensus", "0.8"])
    assert "0: 0.330" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--clients", "10"])
    with pytest.raises(SystemExit):  # more attackers than clients: a usage error, not a traceback
        main(["--clients", "10", "--attackers", "11"])
    assert "num_attackers must be in [0, 10]" in capsys.readouterr().err


def test_the_docs_table_is_what_the_command_prints(capsys):
    main(["--clients", "10", "--attackers", "3"])
    table = capsys.readouterr().out.split("\n", 1)[1].strip()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "defenses" / "rlr.md").read_text()
    assert "python -m fl_defense.defenses.rlr_theta --clients 10 --attackers 3" in doc
    assert table in doc


def _signs_round(rng, n, attackers, d, agreement):
    """A round whose coordinates the first ``attackers`` rows push up, each other row agreeing
    (sign +) with probability ``agreement``; magnitudes random, as trained updates'."""
    signs = np.where(rng.random((n, d)) < agreement, 1.0, -1.0)
    signs[:attackers] = 1.0
    return signs * rng.uniform(0.01, 1.0, size=(n, d))


@pytest.mark.parametrize("attackers,theta,agreement", [(3, 4, 0.5), (3, 6, 0.5), (3, 8, 0.5), (2, 5, 0.5),
                                                       (0, 6, 0.8), (0, 8, 0.9)])
def test_monte_carlo_against_rlrs_own_vote(attackers, theta, agreement):
    rng = np.random.default_rng(attackers * 100 + theta)
    n, d = 10, 40_000
    ru = round_updates(_signs_round(rng, n, attackers, d, agreement))
    res = RLR(theta=theta).aggregate(torch.zeros(d), ru)
    kept = 1.0 - res.info["flipped-fraction"]
    p = keep_probability(n, attackers, theta, agreement)
    assert abs(kept - p) < 5 * np.sqrt(p * (1 - p) / d) + 1e-9, (kept, p)


def test_monte_carlo_partial_participation():
    """100 clients, 10 attackers, 10 sampled a round: RLR's kept fraction on the attackers'
    coordinates, over rounds with an attacker, matches the hypergeometric average."""
    rng = np.random.default_rng(7)
    population, malicious, sampled, theta, d = 100, 10, 10, 6, 2_000
    kept = []
    for _ in range(300):
        chosen = rng.choice(population, size=sampled, replace=False)
        a = int((chosen < malicious).sum())
        if a == 0:
            continue
        ru = round_updates(_signs_round(rng, sampled, a, d, 0.5))
        kept.append(1.0 - RLR(theta=theta).aggregate(torch.zeros(d), ru).info["flipped-fraction"])
    expected = theta_tradeoff(sampled, attackers_per_round(population, malicious, sampled),
                              thetas=[theta], consensus=())[0]["attack"]
    # rounds differ in their attacker count: the spread is mostly between rounds
    assert abs(np.mean(kept) - expected) < 4 * np.std(kept) / np.sqrt(len(kept)) + 0.005, (np.mean(kept), expected)
