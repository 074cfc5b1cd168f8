"""FreqFed (Fereidooni et al., NDSS 2024) on constructed rounds: the low-frequency Gram against
an explicit DCT, the filter ignoring a benign client's high-frequency noise, the majority cluster
accepted and sample-weighted, and the no-cluster fallback."""

import numpy as np
import pytest
import torch
from scipy.fft import dct, dctn, idct

from fl_defense import strategies
from fl_defense.defenses import FLAME, FreqFed
from fl_defense.defenses.freqfed import low_frequency_count, low_frequency_gram, low_frequency_index
from fl_defense.updates import RoundUpdates
from fl_defense.strategies import message
from tests.helpers import round_updates
from tests.test_adapters import _round, run_legacy, run_message

SIZES = [48, 17]  # two layers, an even and an odd length


def explicit_low_frequency(x: np.ndarray) -> np.ndarray:
    """F: per layer, the orthonormal DCT-II's first floor(L/2) + 1 coefficients, concatenated."""
    parts, s = [], 0
    for size in SIZES:
        parts.append(dct(x[..., s:s + size].astype(np.float64), norm="ortho", axis=-1)[..., :size // 2 + 1])
        s += size
    return np.concatenate(parts, axis=-1)


def from_spectrum(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A vector whose layers have the given low- and high-frequency DCT coefficients."""
    out, s, ls, hs = [], 0, 0, 0
    for size in SIZES:
        k = low_frequency_count(size)
        out.append(idct(np.r_[low[ls:ls + k], high[hs:hs + size - k]], norm="ortho"))
        ls, hs = ls + k, hs + size - k
    return np.concatenate(out)


def constructed_round(seed=0, n_benign=7, n_attackers=3):
    """Benign updates share a low-frequency pattern (each with its own small deviations and
    high-frequency noise); client 6 is benign, central in the low frequencies, but carries 30x more
    high-frequency noise (a noisy optimiser, a different local schedule). Attackers share another low-frequency pattern."""
    rng = np.random.default_rng(seed)
    k = sum(low_frequency_count(s) for s in SIZES)
    h = sum(SIZES) - k
    benign_low, attack_low = rng.normal(size=k), rng.normal(size=k)
    rows = [from_spectrum(benign_low + 0.2 * rng.normal(size=k), 0.05 * rng.normal(size=h)) for _ in range(n_benign)]
    rows[6] = from_spectrum(benign_low + 0.05 * rng.normal(size=k), 1.5 * rng.normal(size=h))
    rows += [from_spectrum(attack_low + 0.2 * rng.normal(size=k), 0.05 * rng.normal(size=h))
             for _ in range(n_attackers)]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("transform_on", ["models", "updates"])
def test_low_frequency_gram_equals_the_explicit_transform(transform_on):
    rng = np.random.default_rng(1)
    u = rng.normal(size=(6, sum(SIZES))).astype(np.float32)
    g = rng.normal(size=sum(SIZES)).astype(np.float32)
    ru = round_updates(u, layer_sizes=SIZES)
    ref = torch.as_tensor(g) if transform_on == "models" else None
    got = low_frequency_gram(ru.updates, ref, ru.layer_slices)
    f = explicit_low_frequency(u.astype(np.float64) + (g if transform_on == "models" else 0.0))
    np.testing.assert_allclose(got, f @ f.T, rtol=1e-4, atol=1e-4)
    assert low_frequency_count(48) == 25 and low_frequency_count(17) == 9


@pytest.mark.parametrize("seed", range(5))
def test_attackers_flagged_and_high_frequency_noise_does_not_make_a_benign_outlier(seed):
    u = constructed_round(seed)
    res = FreqFed(transform_on="updates").aggregate(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    flagged = res.flagged.numpy()
    # HDBSCAN with one cluster allowed labels as noise a member that leaves the cluster before
    # its densest level, so one benign client may be dropped; the attackers never get in and
    # the noisy benign client 6 always does
    assert flagged[7:].all() and not flagged[6] and flagged[:7].sum() <= 1
    # the filter is what keeps client 6: over the whole updates (FLAME's cosine) it is an outlier
    flame = FLAME(noise_lambda=0.0).cluster(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    assert flame[6] == -1 or flame[6] != flame[0]


def test_models_transform_with_a_global_model_gives_the_same_verdict():
    u = constructed_round()
    g = torch.as_tensor(np.random.default_rng(2).normal(size=u.shape[1]).astype(np.float32)) * 0.3
    res = FreqFed().aggregate(g, round_updates(u, layer_sizes=SIZES))
    flat = FreqFed(transform_on="updates").aggregate(g, round_updates(u, layer_sizes=SIZES))
    assert res.flagged[7:].all() and not res.flagged[6] and res.flagged[:7].sum() <= 1
    assert flat.flagged[7:].all() and not flat.flagged[6]


def test_the_accepted_cluster_is_averaged_with_sample_weights():
    u = constructed_round()
    ne = np.arange(10, 20, dtype=np.float64)
    g = torch.full((u.shape[1],), 0.25)
    res = FreqFed(transform_on="updates").aggregate(g, round_updates(u, num_examples=ne, layer_sizes=SIZES))
    keep = ~res.flagged.numpy()
    assert keep.sum() >= 6 and not keep[7:].any()
    w = np.where(keep, ne, 0.0) / ne[keep].sum()
    np.testing.assert_allclose(res.weights.numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(res.params.numpy(), 0.25 + w @ u, rtol=1e-5, atol=1e-6)


def test_without_a_cluster_everyone_is_averaged():
    u = constructed_round()[[0, 9]]  # two clients: nothing to cluster
    res = FreqFed().aggregate(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    assert not res.flagged.any() and res.info["clusters"] == [0, 0]
    np.testing.assert_allclose(res.weights.numpy(), [0.5, 0.5])


def test_output_layer_only():
    u = constructed_round()
    res = FreqFed(layers="last").aggregate(torch.zeros(u.shape[1]), round_updates(u, layer_sizes=SIZES))
    assert res.flagged[7:].all() and not res.flagged[6] and res.flagged[:7].sum() <= 1


def test_validation_names_the_parameter():
    with pytest.raises(ValueError, match="transform_on"):
        FreqFed(transform_on="weights").validate()
    with pytest.raises(ValueError, match="layers"):
        FreqFed(layers="first").validate()


def test_both_adapters_agree():
    g, clients = _round(seed=4)
    legacy, _ = run_legacy(strategies.FreqFed(), g, clients)
    msg, _ = run_message(message.FreqFed(), g, clients)
    for a, b in zip(legacy, msg):
        np.testing.assert_array_equal(a, b)


SHAPES = [(6, 2, 2, 2), (6,), (4, 6), (4,)]  # a conv weight and bias, then an output layer: 48, 6, 24, 4


def shaped(u, ne=None):
    ru = round_updates(u, num_examples=ne, layer_sizes=[int(np.prod(s)) for s in SHAPES])
    return RoundUpdates(**{**vars(ru), "layer_shapes": SHAPES})


def test_with_layer_shapes_each_weight_is_a_2d_dct_and_its_triangle():
    # the triangle i + j <= floor(M / 2) of a 6 x 8 matrix: rows 0..3 keep 4, 3, 2, 1 columns
    assert low_frequency_index(6, 8).tolist() == [0, 1, 2, 3, 8, 9, 10, 16, 17, 24]
    rng = np.random.default_rng(3)
    d = sum(int(np.prod(s)) for s in SHAPES)
    u = rng.normal(size=(5, d)).astype(np.float32)
    g = rng.normal(size=d).astype(np.float32)
    parts, s0 = [], 0
    for shape in SHAPES:
        size = int(np.prod(shape))
        m = shape[0]
        mat = (u[:, s0:s0 + size] + g[s0:s0 + size]).astype(np.float64).reshape(5, m, -1)
        coef = np.stack([dctn(a, norm="ortho") for a in mat])
        i, j = np.indices(coef.shape[1:])
        parts.append(coef[:, i + j <= m // 2])
        s0 += size
    f = np.concatenate(parts, axis=1)
    ru = shaped(u)
    got = low_frequency_gram(ru.updates, torch.as_tensor(g), ru.layer_slices, ru.layer_shapes)
    np.testing.assert_allclose(got, f @ f.T, rtol=1e-4, atol=1e-4)
    assert f.shape[1] == 10 + 4 + 6 + 3  # the four triangles: 6 x 8, 6 x 1, 4 x 6, 4 x 1


def test_the_adapters_hand_freqfed_the_layer_shapes():
    seen = []

    class Spy(FreqFed):
        def aggregate(self, global_params, round_updates):
            seen.append(round_updates.layer_shapes)
            return super().aggregate(global_params, round_updates)

    g, clients = _round(seed=4)
    run_legacy(strategies.DefenseStrategy(defense=Spy()), g, clients)
    run_message(message.DefenseStrategy(defense=Spy()), g, clients)
    assert seen == [[(4, 3), (4,), (2, 4), (2,)]] * 2
