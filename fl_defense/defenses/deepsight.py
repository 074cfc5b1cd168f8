"""DeepSight (Rieger, Nguyen, Miettinen and Sadeghi, "DeepSight: Mitigating Backdoor Attacks in
Federated Learning Through Deep Model Inspection", NDSS 2022)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..training import uses_channels_last
from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey, ServerContext

log = logging.getLogger(__name__)


class RandomInputProbabilities:
    """DeepSight's probe for DDifs: the output probabilities (softmax) of the model with a given
    trainable vector on ``num_seeds`` fixed batches of ``num_samples`` random inputs of
    ``input_shape`` (uniform in [0, 1), batch s drawn from a generator seeded ``seed + s``).

    Returns a (num_seeds, num_samples, classes) float32 tensor. Holds a private model copy (pass a
    deepcopy) and loads each vector cloned, never aliased (DESIGN.md's ``vector_to_parameters``
    trap). Forward passes in eval mode, ``batch_size`` inputs at a time; a convolutional model on
    the CPU runs in channels-last format, as ``training.predict``: with cnn_small, 2,000 inputs x 3
    seeds take 0.36x the time of batches of 1,000 in the default format (one thread, AVX512;
    ``benchmarks/deepsight_probe.py``; 11 calls a round at 10 clients), the probabilities within 3e-8.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], num_seeds: int = 3,
                 num_samples: int = 2000, seed: int = 0, batch_size: int = 256) -> None:
        self.model = model
        self.inputs = [torch.rand((num_samples, *input_shape), generator=torch.Generator().manual_seed(seed + s))
                       for s in range(num_seeds)]
        self.batch_size = batch_size
        self.channels_last = uses_channels_last(model, self.inputs[0], "cpu")
        if self.channels_last:
            self.inputs = [x.contiguous(memory_format=torch.channels_last) for x in self.inputs]

    @torch.no_grad()
    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.vector_to_parameters(vector.detach().to("cpu", torch.float32).clone(), params)
        self.model.eval()
        if self.channels_last:  # loading the vector left the weights in the default format
            self.model.to(memory_format=torch.channels_last)
        out = []
        for batch in self.inputs:
            probs = [torch.softmax(self.model(batch[s:s + self.batch_size]).float(), dim=1)
                     for s in range(0, len(batch), self.batch_size)]
            out.append(torch.cat(probs))
        return torch.stack(out)


def output_layer(ru: RoundUpdates) -> tuple[slice, slice, int]:
    """The output layer's weight and bias slices and its number of neurons P: the last two
    trainable arrays, a bias of P values after a P x h weight (every model here ends in a Linear)."""
    if len(ru.layer_slices) < 2:
        raise ValueError("DeepSight needs the output layer's weight and bias as the last two trainable arrays")
    w_sl, b_sl = ru.layer_slices[-2], ru.layer_slices[-1]
    p = b_sl.stop - b_sl.start
    if p < 2 or (w_sl.stop - w_sl.start) % p:
        raise ValueError(f"DeepSight: the last trainable array ({p} values) is not the bias of an output layer "
                         f"whose weight ({w_sl.stop - w_sl.start} values) comes just before it")
    return w_sl, b_sl, p


def neups(w_update: np.ndarray, b_update: np.ndarray) -> np.ndarray:
    """Normalised energy updates (sec. V-A): the update energy of output neuron j,
    eps_j = |db_j| + sum_p |dw_jp|, squared and normalised, c_j = eps_j^2 / sum_k eps_k^2.
    ``w_update`` is n x P x h, ``b_update`` n x P; returns n x P."""
    energy = np.abs(b_update) + np.abs(w_update).sum(axis=2)
    sq = energy.astype(np.float64) ** 2
    return sq / np.clip(sq.sum(axis=1, keepdims=True), 1e-300, None)


def threshold_exceedings(c: np.ndarray, threshold_factor: float) -> np.ndarray:
    """TE_i = |{j : c_ij > xi_i}| with xi_i = max(threshold_factor, 1/P) * max_j c_ij: how many
    labels a model was trained on with substantial energy (few for homogeneous training data)."""
    xi = max(threshold_factor, 1.0 / c.shape[1]) * c.max(axis=1, keepdims=True)
    return (c > xi).sum(axis=1)


def cosine_distances(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-150, None)  # a zero row stays zero
    dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def cluster_distances(labels: np.ndarray) -> np.ndarray:
    """0 between two models HDBSCAN put in the same cluster, 1 otherwise (noise shares no cluster,
    not even with other noise); 0 on the diagonal."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    dist = np.where(same, 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    return dist


class DeepSight(Defense):
    """DeepSight, Rieger et al., NDSS 2022 (sec. V, Algorithms 1 and 2).

    Classification: each model's NEUPs c_ij (normalised energy of the output layer's neuron j,
    ``neups``) and threshold exceedings TE_i (``threshold_exceedings``, threshold factor 0.01);
    a model is labelled suspicious when TE_i <= median(TE) / 2 (homogeneous training data, as a
    backdoor's).

    Clustering (ensemble): HDBSCAN separately on (a) the cosine distances of the output layer's
    bias updates, (b) the NEUPs, (c) the DDifs of each of ``num_seeds`` seeds, DDif_{i,s,k} =
    (1/N) sum_x p_i(x)_k / p_G(x)_k over N random inputs x of seed s (local model i's and the
    global model's output probabilities); each clustering becomes a 0/1 distance matrix (0: same
    cluster), the seeds' matrices are averaged, the three are averaged, and HDBSCAN on that
    merged matrix gives the final clusters. Noise models are clusters of their own.

    Identification: a cluster is accepted when fewer than ``tau`` (1/3) of its members are
    suspicious; all others are flagged. Clipping: each accepted update is scaled to at most the
    median norm of all updates, S_t = median ||W_i - G_t||, and the clipped accepted updates are
    averaged (plain mean). Nothing accepted: the global model is kept.

    ``model_outputs`` maps a trainable vector to its output probabilities on fixed random inputs,
    (num_seeds, N, P) (``RandomInputProbabilities``; the server app builds it from a private copy
    of the model). Without it (a Flower strategy built directly, with no model at hand) DeepSight
    runs degraded: the DDif clusterings are left out of the ensemble (a warning says so once and
    each round records ``ddifs: false``).

    Choices where the paper leaves it open: HDBSCAN's ``min_cluster_size`` 2 (capped at n) and
    min_samples 1, so that a few colluding clients can form a cluster of their own (public
    reimplementations keep the hdbscan package's 5 and 5, which at 10 clients a round leaves 3
    attackers as noise); probabilities are softmax outputs; the random inputs are uniform in
    [0, 1) of the data's shape, ``num_samples`` 2000 a seed (reimplementations use 20000); the
    clipping bound is torch's median (the lower middle one for an even count). DeepSight keeps no
    state across rounds.
    """

    name = "deepsight"
    paper = "Rieger et al., NDSS 2022"
    detects = True
    server_provided = ("model_outputs",)
    needs_server_data = False  # the forward passes run on random inputs, not on a server dataset
    run_config = {
        "tau": RunKey("DeepSight: a cluster is accepted when its share of suspicious models is below tau",
                      check=lambda v: 0 < v <= 1),
        "threshold_factor": RunKey("DeepSight: threshold exceedings count NEUPs above max(factor, 1/P) * max NEUP",
                                   check=lambda v: 0 < v < 1),
        "num_seeds": RunKey("DeepSight: seeds (batches of random inputs) for the DDifs", check=lambda v: v >= 1),
        "num_samples": RunKey("DeepSight: random inputs per seed for the DDifs (server forward passes)",
                              check=lambda v: v >= 1),
        "min_cluster_size": RunKey("DeepSight: HDBSCAN min_cluster_size (capped at the number of clients)",
                                   check=lambda v: v >= 2),
    }

    def __init__(self, model_outputs: Callable[[torch.Tensor], torch.Tensor] | None = None, tau: float = 1 / 3,
                 threshold_factor: float = 0.01, num_seeds: int = 3, num_samples: int = 2000,
                 min_cluster_size: int = 2) -> None:
        self.model_outputs = model_outputs
        self.tau = tau
        self.threshold_factor = threshold_factor
        self.num_seeds = num_seeds
        self.num_samples = num_samples
        self.min_cluster_size = min_cluster_size
        self._warned = False

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """The DDifs' probe: a private model copy's outputs on seeded random inputs of the data's shape."""
        return {"model_outputs": RandomInputProbabilities(ctx.model(), ctx.spec.shape, ctx.kwargs["num_seeds"],
                                                          ctx.kwargs["num_samples"], ctx.seed)}

    def validate(self) -> None:
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not 0 < self.threshold_factor < 1:
            raise ValueError(f"threshold_factor must be in (0, 1), got {self.threshold_factor}")
        for name in ("num_seeds", "num_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.min_cluster_size, int) or self.min_cluster_size < 2:
            raise ValueError(f"min_cluster_size must be an integer >= 2, got {self.min_cluster_size!r}")
        if self.model_outputs is not None and not callable(self.model_outputs):
            raise ValueError("model_outputs must be a callable (trainable vector -> output probabilities) or None")

    def _hdbscan(self, x: np.ndarray, precomputed: bool) -> np.ndarray:
        from sklearn.cluster import HDBSCAN

        n = len(x)
        if n < 3:
            return np.full(n, -1)
        return HDBSCAN(min_cluster_size=min(self.min_cluster_size, n), min_samples=1, copy=True,
                       metric="precomputed" if precomputed else "euclidean").fit(x).labels_

    def ddifs(self, global_params: torch.Tensor, ru: RoundUpdates) -> np.ndarray:
        """DDif_{s,i,k} (num_seeds x n x P): mean over seed s's random inputs of p_i / p_G."""
        p_global = self.model_outputs(global_params).double()
        if p_global.ndim != 3 or p_global.shape[0] != self.num_seeds:
            raise ValueError(f"model_outputs must return (num_seeds={self.num_seeds}, samples, classes) "
                             f"probabilities, got shape {tuple(p_global.shape)}")
        out = np.empty((self.num_seeds, ru.n, p_global.shape[2]))
        for i in range(ru.n):
            local = global_params + ru.updates[i].to(global_params.dtype)
            out[:, i] = (self.model_outputs(local).double() / (p_global + 1e-30)).mean(dim=1).numpy()
        return out

    def cluster(self, global_params: torch.Tensor, ru: RoundUpdates, c: np.ndarray,
                bias_updates: np.ndarray) -> tuple[np.ndarray, dict]:
        """The ensemble clustering (Algorithm 2): final labels and the parts' labels."""
        parts = {"cosine": self._hdbscan(cosine_distances(bias_updates), precomputed=True),
                 "neups": self._hdbscan(c, precomputed=False)}
        merged = [cluster_distances(parts["cosine"]), cluster_distances(parts["neups"])]
        if self.model_outputs is not None:
            ddif_labels = [self._hdbscan(d, precomputed=False) for d in self.ddifs(global_params, ru)]
            parts["ddifs"] = ddif_labels
            merged.append(np.mean([cluster_distances(lab) for lab in ddif_labels], axis=0))
        labels = self._hdbscan(np.mean(merged, axis=0), precomputed=True)
        return labels, {k: (v.tolist() if isinstance(v, np.ndarray) else [x.tolist() for x in v])
                        for k, v in parts.items()}

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        if self.model_outputs is None and not self._warned:
            log.warning("DeepSight without model_outputs: DDifs are left out of the clustering (degraded mode)")
            self._warned = True
        w_sl, b_sl, p = output_layer(ru)
        b_update = ru.updates[:, b_sl].double().cpu().numpy()
        w_update = ru.updates[:, w_sl].double().cpu().numpy().reshape(ru.n, p, -1)
        c = neups(w_update, b_update)
        te = threshold_exceedings(c, self.threshold_factor)
        te_bound = float(np.median(te)) / 2
        suspicious = te <= te_bound
        labels, parts = self.cluster(global_params, ru, c, b_update)
        accepted = np.zeros(ru.n, dtype=bool)
        for lab in np.unique(labels):
            members = np.flatnonzero(labels == lab) if lab >= 0 else None
            for group in ([members] if members is not None else [[i] for i in np.flatnonzero(labels < 0)]):
                if suspicious[group].sum() < self.tau * len(group):
                    accepted[group] = True
        norms = torch.linalg.vector_norm(ru.updates, dim=1)
        bound = norms.median()
        # te-bound, top-label and top-neup say why a model was (not) labelled: its TE against the
        # bound, and whether one label (a backdoor's target) carries its energy
        info = {"threshold-exceedings": te.tolist(), "te-bound": te_bound, "suspicious": suspicious.tolist(),
                "top-label": c.argmax(axis=1).tolist(), "top-neup": np.round(c.max(axis=1), 4).tolist(),
                "clusters": labels.tolist(), "ensemble": parts, "ddifs": self.model_outputs is not None,
                "clip-bound": float(bound)}
        adm = torch.as_tensor(accepted, device=ru.device)
        if not adm.any():
            return DefenseResult(params=global_params.clone(), weights=torch.zeros(ru.n, device=ru.device),
                                 flagged=~adm, info=info)
        scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
        w = adm.to(ru.updates.dtype) / adm.sum()
        return DefenseResult(params=global_params + (w * scale) @ ru.updates, weights=w, flagged=~adm, info=info)
