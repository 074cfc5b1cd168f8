"""FreqFed (Fereidooni, Pegoraro, Rieger, Dmitrienko and Sadeghi, "FreqFed: A Frequency
Analysis-Based Approach for Mitigating Poisoning Attacks in Federated Learning", NDSS 2024)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey
from .parallel import parallel_map, split_evenly, workers

TRANSFORM_ON = ("models", "updates")
LAYERS = ("all", "last")


def low_frequency_count(length: int) -> int:
    """How many leading DCT coefficients of a flattened layer of ``length`` values are
    low-frequency: the paper's filter keeps V[i, j] with i + j <= floor(M / 2); a flattened layer
    is an M x 1 matrix (j = 0), so that is coefficients 0..floor(M / 2)."""
    return length // 2 + 1


def layer_matrix_shape(shape: tuple[int, ...] | None, size: int) -> tuple[int, int]:
    """The M x N matrix a layer's DCT runs over: a weight of shape (out, ...) as out x (the rest),
    as the layer's output neurons by their inputs; a vector (a bias, or a layer whose shape is
    unknown) as a column of its M values."""
    if shape is not None and len(shape) >= 2:
        return int(shape[0]), size // int(shape[0])
    return size, 1


def low_frequency_index(m: int, n: int) -> np.ndarray:
    """Flat (row-major) indices of the top-left triangle i + j <= floor(M / 2) of an M x N matrix
    of DCT coefficients: the low frequencies FreqFed keeps."""
    i, j = np.indices((m, n))
    return np.flatnonzero((i + j).ravel() <= m // 2)


def low_frequency_gram(u: torch.Tensor, reference: torch.Tensor | None, slices: list[slice],
                       shapes: list[tuple[int, ...]] | None = None) -> np.ndarray:
    """The Gram matrix of the clients' low-frequency vectors F_k (float64, n x n).

    F_k is, layer by layer, the low-frequency triangle (``low_frequency_index``) of the
    orthonormal 2-D DCT-II (``scipy.fft.dctn``) of the layer's M x N matrix
    (``layer_matrix_shape``; without ``shapes`` every layer is a column, a 1-D DCT), concatenated.
    With ``reference`` (the global vector) the vectors are those of the local models W_k = G +
    delta_k; the DCT is linear, so F(W_k) = F(G) + F(delta_k) and their Gram follows from the
    updates' (FLAME's trick): no model is built. Layer by layer, so at most one n x (largest
    layer's triangle) block is alive; rows are shared out among threads.
    """
    from scipy.fft import dctn

    on_cpu = u.device.type == "cpu"
    x = u.detach().numpy() if on_cpu else None  # elsewhere one layer's columns at a time come over
    n = u.shape[0]
    dtype = np.float64 if u.dtype == torch.float64 else np.float32
    gram = np.zeros((n, n))
    cross = np.zeros(n)
    ref_sq = 0.0
    g = None if reference is None else reference.detach().cpu().numpy().astype(dtype, copy=False)
    for li, sl in enumerate(slices):
        m, cols = layer_matrix_shape(None if shapes is None else shapes[li], sl.stop - sl.start)
        idx = low_frequency_index(m, cols)
        block = np.empty((n, len(idx)), dtype=dtype)
        xl = x[:, sl] if on_cpu else u[:, sl].detach().cpu().numpy()

        def rows(group: list[int]) -> None:
            for i in group:
                block[i] = dctn(xl[i].reshape(m, cols), norm="ortho").ravel()[idx]

        parallel_map(rows, split_evenly(list(range(n)), workers()))
        gram += (block @ block.T).astype(np.float64)
        if g is not None:
            fg = dctn(g[sl].reshape(m, cols), norm="ortho").ravel()[idx]
            cross += (block @ fg).astype(np.float64)
            ref_sq += float(fg.astype(np.float64) @ fg.astype(np.float64))
    gram = (gram + gram.T) / 2
    if g is not None:
        gram = gram + cross[:, None] + cross[None, :] + ref_sq
    return gram


def cosine_distances_from_gram(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    dist = np.clip(1.0 - gram / norms[:, None] / norms[None, :], 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return dist


class FreqFed(Defense):
    """FreqFed, Fereidooni et al., NDSS 2024 (sec. IV, Algorithm 1).

    1. Frequency analysis: each local model W_k (``transform_on="models"``, the paper: it
       transforms the weights; ``"updates"`` uses delta_k) is transformed layer by layer with the
       orthonormal 2-D DCT-II (``scipy.fft.dctn``) of the layer's M x N matrix: a weight of shape
       (out, ...) as out x (the rest), a bias as an M x 1 column.
    2. Filtering: the low-frequency components are kept, the top-left triangle i + j <=
       floor(M / 2) of each layer's coefficient matrix V, concatenated into F_k (for a column,
       its first floor(M / 2) + 1 coefficients). When the round carries no layer shapes
       (``RoundUpdates.layer_shapes`` None: a hand-built round) every layer is a column: the
       flattened variant public reimplementations use. ``layers="last"`` uses only the output
       layer's weight and bias (as some reimplementations do).
    3. Clustering: c_kl = 1 - cos(F_k, F_l); HDBSCAN (scikit-learn, precomputed distances) with
       min_cluster_size = n/2 + 1, min_samples = 1, one cluster allowed. The cluster with the most
       members is accepted, everyone else is flagged.
    4. Aggregation: FedAvg of the accepted models, weights n_k / sum n_k over the cluster.

    Left open by the paper and chosen here: when HDBSCAN finds no cluster (every model is noise)
    all clients are averaged, as FLAME here does; with fewer than 3 clients there is nothing to
    cluster and all are averaged. Memory: the n x n Gram and one n x (largest layer's triangle)
    block of coefficients, float32 (on a GPU also that layer's columns, copied to the host); no d x d
    anything and no second n x d matrix. FreqFed keeps no state across rounds.
    """

    name = "freqfed"
    paper = "Fereidooni et al., NDSS 2024"
    detects = True
    run_config = {
        "transform_on": RunKey("FreqFed: DCT of the local models (paper) or of the updates", choices=TRANSFORM_ON),
        "layers": RunKey("FreqFed: DCT of every layer (paper) or the output layer only", choices=LAYERS),
    }

    def __init__(self, transform_on: str = "models", layers: str = "all") -> None:
        self.transform_on = transform_on
        self.layers = layers

    def validate(self) -> None:
        if self.transform_on not in TRANSFORM_ON:
            raise ValueError(f"transform_on must be one of {TRANSFORM_ON}, got {self.transform_on!r}")
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {self.layers!r}")

    def cluster(self, global_params: torch.Tensor, ru: RoundUpdates) -> np.ndarray:
        """HDBSCAN labels over the cosine distances of the low-frequency vectors (-1: noise)."""
        from sklearn.cluster import HDBSCAN

        slices, shapes = ru.layer_slices, ru.layer_shapes
        if self.layers == "last" and len(slices) > 1:
            slices, shapes = slices[-2:], None if shapes is None else shapes[-2:]
        ref = global_params if self.transform_on == "models" else None
        dist = cosine_distances_from_gram(low_frequency_gram(ru.updates, ref, slices, shapes))
        if ru.n < 3:
            return np.zeros(ru.n, dtype=int)
        return HDBSCAN(min_cluster_size=ru.n // 2 + 1, min_samples=1, metric="precomputed", copy=True,
                       allow_single_cluster=True).fit(dist).labels_

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        labels = self.cluster(global_params, ru)
        clusters, counts = np.unique(labels[labels >= 0], return_counts=True)
        accepted = labels == clusters[np.argmax(counts)] if len(clusters) else np.ones(ru.n, dtype=bool)
        adm = torch.as_tensor(accepted, device=ru.device)
        w = torch.where(adm, ru.sample_weights, 0.0)
        w = w / w.sum()
        return DefenseResult(params=global_params + w @ ru.updates, weights=w, flagged=~adm,
                             info={"clusters": labels.tolist(), "no-cluster": not len(clusters)})
