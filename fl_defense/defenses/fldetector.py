"""FLDetector (Zhang, Cao, Jia and Gong, "FLDetector: Defending Federated Learning Against Model
Poisoning Attacks via Detecting Malicious Clients", KDD 2022)."""

from __future__ import annotations

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import block_scratch, column_block_sums
from .base import Defense, DefenseResult, RunKey
from .rflbat import one_thread


def lbfgs_hvp(s: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """H v for the rows of ``v`` (m x d), H the L-BFGS approximation of the Hessian built from the
    pairs (s_r, y_r), rows of ``s`` and ``y`` (N x d, oldest first), in the compact form of Byrd,
    Nocedal and Schnabel (1994) that FLDetector's Algorithm 2 uses:

        H v = sigma v - [sigma S, Y] M^{-1} [sigma S^T v; Y^T v],
        M = [[sigma S^T S, L], [L^T, -D]],

    L the strictly lower triangle of S^T Y, D its diagonal and sigma = y_N^T s_N / s_N^T s_N.
    None when the pairs carry no curvature (sigma not > 0, or M singular)."""
    n_pairs = s.shape[0]
    z = torch.cat([s, y])
    zz, zv = window_products(z, v)
    sts, sty = zz[:n_pairs, :n_pairs], zz[:n_pairs, n_pairs:]
    sigma = float(sty[-1, -1] / sts[-1, -1]) if sts[-1, -1] > 0 else float("nan")
    if not sigma > 0 or not np.isfinite(sigma):
        return None
    lower = np.tril(sty, k=-1)
    m = np.block([[sigma * sts, lower], [lower.T, -np.diag(np.diag(sty))]])
    rhs = np.concatenate([sigma * zv[:n_pairs], zv[n_pairs:]])  # [sigma S^T v; Y^T v], 2N x m
    try:
        q = np.linalg.solve(m, rhs)
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(q).all():
        return None
    q[:n_pairs] *= sigma
    return sigma * v - torch.from_numpy(q).to(v.device, v.dtype).T @ z


def window_products(z: torch.Tensor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """z @ z.T and z @ v.T in float64 (a few rows of d values each), in one pass block by block
    over the columns: exact enough for the small L-BFGS system without a float64 copy."""
    k, m = z.shape[0], v.shape[0]

    def block(cols: slice) -> torch.Tensor:
        zb = z[:, cols].double()
        return torch.cat([(zb @ zb.T).reshape(-1), (zb @ v[:, cols].double().T).reshape(-1)])

    out = column_block_sums(block, z, k * k + k * m).cpu().numpy()
    return out[:k * k].reshape(k, k), out[k * k:].reshape(k, m)


def gap_statistic_k(scores: np.ndarray, k_max: int, refs: int, rng: np.random.Generator, seed: int) -> int:
    """The number of clusters of the 1-D ``scores`` by the gap statistic (``gap_statistic``)."""
    return gap_statistic(scores, k_max, refs, rng, seed)[0]


def gap_statistic(scores: np.ndarray, k_max: int, refs: int, rng: np.random.Generator,
                  seed: int) -> tuple[int, list[float], list[float]]:
    """The number of clusters of the 1-D ``scores`` by the gap statistic (Tibshirani, Walther and
    Hastie, 2001) as FLDetector uses it: scores min-max normalised to [0, 1]; for k = 1..k_max,
    W_k is K-means' within-cluster sum of squares and the reference is ``refs`` uniform samples on
    [0, 1] of the same size; Gap(k) = mean_b log W*_kb - log W_k, s_k = sd_b(log W*_kb)
    sqrt(1 + 1/refs); the answer is the smallest k with Gap(k) >= Gap(k+1) - s_{k+1}. Returns it
    with Gap(1..) and s(1..) as far as they were computed (up to the answer + 1)."""
    from sklearn.cluster import KMeans

    x = np.asarray(scores, dtype=np.float64)
    lo, hi = x.min(), x.max()
    if not hi > lo:
        return 1, [], []
    x = ((x - lo) / (hi - lo)).reshape(-1, 1)
    ks = range(1, min(k_max, len(np.unique(x))) + 1)

    def inertia(points: np.ndarray, k: int, n_init: int) -> float:
        if k == 1:
            return float(((points - points.mean()) ** 2).sum())
        return float(KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points).inertia_)

    gaps, sds = [], []
    ref_points = rng.uniform(0.0, 1.0, size=(refs, len(x), 1))
    with one_thread():  # tens of 1-D points: thread pools cost more than the work
        for k in ks:
            log_ref = np.log(np.maximum([inertia(r, k, 1) for r in ref_points], 1e-300))
            gaps.append(log_ref.mean() - np.log(max(inertia(x, k, 3), 1e-300)))
            sds.append(log_ref.std() * np.sqrt(1.0 + 1.0 / refs))
            if k > 1 and gaps[k - 2] >= gaps[k - 1] - sds[k - 1]:
                return k - 1, gaps, sds
    return len(gaps), gaps, sds


def two_means_high_cluster(scores: np.ndarray, seed: int) -> np.ndarray:
    """K-means with k = 2 on the 1-D scores; the mask of the cluster with the higher mean."""
    from sklearn.cluster import KMeans

    with one_thread():
        labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(scores.reshape(-1, 1)).labels_
    high = int(scores[labels == 1].mean() > scores[labels == 0].mean())
    return labels == high


class FLDetector(Defense):
    """FLDetector, Zhang et al., KDD 2022 (Algorithms 1 and 2, eqs. 3-6).

    Each round t the server predicts every client's update from its previous one by the
    Cauchy mean value theorem, g_hat_t^i = g_{t-1}^i + H_t (w_t - w_{t-1}), with the
    Hessian-vector product H_t v approximated by L-BFGS (``lbfgs_hvp``) from the last N pairs
    (Delta w, Delta g): differences of consecutive global models and of consecutive global
    (aggregated) updates. The suspicious score of client i is the mean over the last N rounds of
    its normalised prediction error d_t^i = ||g_hat_t^i - g_t^i||_2 / (normaliser over the round's
    clients). The gap statistic over the round's scores decides whether there are attackers (more
    than one cluster); if so K-means with k = 2 splits them and the cluster with the higher mean
    score is flagged and removed. The rest are aggregated with FedAvg (sample-weighted mean).

    Sign: our rows are model updates delta = client - global, i.e. minus a gradient times a step;
    the rule is applied to g = -delta (and the global update g_t = -(aggregated step)), so the
    pairs have positive curvature as L-BFGS needs. A constant learning rate cancels out.

    Choices where the paper leaves it open or its setting differs from a Flower federation:
    - Partial participation: a client's predicted update uses its own last received update, from
      round t' (the last round it was sampled), and the global-model change since then:
      g_hat_t^i = g_{t'}^i + H_t (w_t - w_{t'}), H_t from the current window. Its score window
      holds its last N *scored* rounds (rounds it was sampled in with a previous update), so a
      client's first round is never scored, never flagged, and aggregated.
    - Normaliser: the paper divides by the round's L1 norm of the distances; we divide by their
      mean (the same up to the constant n with a constant number of clients, and comparable
      across rounds when the number sampled varies).
    - Detection starts once the window holds N pairs (the paper warms up before detecting) and
      needs at least three scored clients in the round.
    - The paper stops the training once it detects attackers, removes them for good and restarts
      from an earlier model; in a Flower run the clients flagged in a round are dropped from that
      round's aggregate only (they are judged again when next sampled).
    - The gap statistic is Tibshirani's (mean of log W*); the authors' code uses the log of the
      mean. Its reference samples come from a generator seeded with (seed, round).
    - Aggregation after removal: FedAvg (the paper's experiments use FedAvg, trimmed mean and
      median; FedAvg is the one its detection is designed to make safe).

    State (checkpointed): the window's N pairs (2 N x d), the previous global model and update
    (2 d), every client's last update (a row of one matrix per client seen, id -> row by
    ``client_ids``), the global models that clients' last updates started from (one d-vector per
    distinct round still referenced), per-client score histories and the round count. At
    d = 1.2M, N = 10, 100 clients (float32): 96 MB + 10 MB + 480 MB + one 4.8 MB vector per
    referenced round (one with full participation; around 30 with 10 of 100 sampled).
    """

    name = "fldetector"
    paper = "Zhang et al., KDD 2022"
    detects = True
    run_config = {
        "window": RunKey("FLDetector: N, rounds in the L-BFGS window and in each client's score average",
                         check=lambda v: v >= 1),
        "gap_k_max": RunKey("FLDetector: largest number of clusters the gap statistic tries", check=lambda v: v >= 2),
        "gap_refs": RunKey("FLDetector: uniform reference samples per k in the gap statistic", check=lambda v: v >= 1),
    }

    def __init__(self, window: int = 10, gap_k_max: int = 7, gap_refs: int = 10, seed: int = 0) -> None:
        self.window = window
        self.gap_k_max = gap_k_max
        self.gap_refs = gap_refs
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self._round = 0
        self._s: list[torch.Tensor] = []  # Delta w, oldest first
        self._y: list[torch.Tensor] = []  # Delta g
        self._w_prev: torch.Tensor | None = None
        self._g_prev: torch.Tensor | None = None
        self._rows: dict[str, int] = {}  # client id -> row of _last
        self._last: torch.Tensor | None = None  # last received update per client (rows)
        self._last_round: dict[str, int] = {}  # client id -> round of its last update
        self._models: dict[int, torch.Tensor] = {}  # round -> global model it started from
        self._scores: dict[str, list[float]] = {}  # client id -> last N normalised distances

    def first_active_round(self) -> int:
        """Round N + 2: a pair needs two consecutive global models, so the window holds N pairs
        after round N + 1 (fewer when a pair lacks curvature and is skipped)."""
        return self.window + 2

    def validate(self) -> None:
        for p, lo in (("window", 1), ("gap_k_max", 2), ("gap_refs", 1)):
            v = getattr(self, p)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{p} must be an integer >= {lo}, got {v!r}")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        u, n, ids = ru.updates, ru.n, ru.client_ids
        if self._w_prev is not None and self._w_prev.shape[0] != ru.d:
            raise ValueError(f"update size {ru.d} differs from the kept history's {self._w_prev.shape[0]}")
        self._round += 1
        self._to(u.device, u.dtype)
        w = global_params.detach().to(u.device, u.dtype)
        distances = self._prediction_errors(w, u, ids)
        info: dict = {"scored": [i for i, cid in enumerate(ids) if cid in distances]}
        flagged = np.zeros(n, dtype=bool)
        if distances:
            scored = info["scored"]
            d = np.array([distances[ids[i]] for i in scored])
            mean = d.mean()
            for i, dist in zip(scored, d / mean if mean > 0 else np.ones_like(d)):
                hist = self._scores.setdefault(ids[i], [])
                hist.append(float(dist))
                del hist[:-self.window]
            scores = np.array([np.mean(self._scores[ids[i]]) for i in scored])
            info["suspicious-scores"] = scores.tolist()
            if len(self._s) >= self.window and len(scored) >= 3:
                rng = np.random.default_rng([self.seed, self._round])
                k, gaps, sds = gap_statistic(scores, self.gap_k_max, self.gap_refs, rng, self.seed)
                # Gap(k) and s_k: how far a round was from finding a second group (Gap(1) >= Gap(2) - s_2 says none)
                info.update({"gap-k": k, "gap": np.round(gaps, 4).tolist(), "gap-sd": np.round(sds, 4).tolist()})
                if k > 1:
                    flagged[np.array(scored)[two_means_high_cluster(scores, self.seed)]] = True
        keep = torch.as_tensor(~flagged, device=u.device)
        sw = ru.sample_weights * keep.to(u.dtype)
        weights = sw / sw.sum()
        step = weights @ u
        self._remember(w, step, u, ids)
        return DefenseResult(params=global_params + step, weights=weights,
                             flagged=torch.as_tensor(flagged, device=ru.device), info=info)

    def _prediction_errors(self, w: torch.Tensor, u: torch.Tensor, ids: list[str]) -> dict[str, float]:
        """||g_hat^i - g^i|| for the round's clients seen before, once the window holds a pair."""
        seen = [i for i, cid in enumerate(ids) if cid in self._rows]
        if not seen or not self._s:
            return {}
        refs = sorted({self._last_round[ids[i]] for i in seen})
        v = torch.stack([w - self._models[r].to(w.device, w.dtype) for r in refs])
        hv = lbfgs_hvp(torch.stack(self._s).to(w.device), torch.stack(self._y).to(w.device), v)
        if hv is None:
            return {}
        which = [refs.index(self._last_round[ids[i]]) for i in seen]
        rows = torch.as_tensor([self._rows[ids[i]] for i in seen], device=w.device)
        every = seen == list(range(len(ids)))
        seen_t = torch.as_tensor(seen, device=w.device)
        which_t = None if len(refs) == 1 else torch.as_tensor(which, device=w.device)
        last = self._last

        # in update terms: delta_hat = delta_prev - H v (g = -delta); errors block by block, in a
        # per-thread scratch block (full participation: no gather of u, one H v broadcast)
        def block(cols: slice) -> torch.Tensor:
            out = block_scratch(u[:len(seen), cols])
            torch.index_select(last[:, cols], 0, rows, out=out)
            out.sub_(u[:, cols] if every else u[seen_t, cols])
            out.sub_(hv[0, cols] if which_t is None else hv[which_t, cols])
            return out.square_().sum(dim=1, dtype=torch.float64)

        sq = column_block_sums(block, u, len(seen)).sqrt().cpu().numpy()
        return {ids[i]: float(x) for i, x in zip(seen, sq)}

    def _remember(self, w: torch.Tensor, step: torch.Tensor, u: torch.Tensor, ids: list[str]) -> None:
        g = -step
        if self._w_prev is not None:
            s, y = w - self._w_prev, g - self._g_prev
            # L-BFGS's curvature condition s^T y > 0 (a kept global model, or noise that outweighs
            # the change, gives none): a pair without it is skipped, as L-BFGS implementations do
            if float(torch.dot(s.double(), y.double())) > 0:
                self._s.append(s)
                self._y.append(y)
                del self._s[:-self.window], self._y[:-self.window]
        self._w_prev, self._g_prev = w.clone(), g.clone()
        new = [cid for cid in ids if cid not in self._rows]
        if new:
            start = 0 if self._last is None else self._last.shape[0]
            grown = torch.empty((start + len(new), u.shape[1]), dtype=u.dtype, device=u.device)
            if self._last is not None:
                grown[:start] = self._last
            self._last = grown
            for j, cid in enumerate(new):
                self._rows[cid] = start + j
        self._last[torch.as_tensor([self._rows[cid] for cid in ids], device=u.device)] = u
        for cid in ids:
            self._last_round[cid] = self._round
        self._models[self._round] = self._w_prev
        live = set(self._last_round.values())
        for r in [r for r in self._models if r not in live]:
            del self._models[r]

    def _to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Keep the state on the updates' device and dtype (a restored checkpoint is on the CPU)."""
        if self._w_prev is None or (self._w_prev.device == device and self._w_prev.dtype == dtype):
            return
        self._s = [t.to(device, dtype) for t in self._s]
        self._y = [t.to(device, dtype) for t in self._y]
        self._w_prev, self._g_prev = self._w_prev.to(device, dtype), self._g_prev.to(device, dtype)
        self._last = self._last.to(device, dtype)
        self._models = {r: t.to(device, dtype) for r, t in self._models.items()}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._w_prev is None:
            return {}

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().copy()

        return {
            "round": self._round,
            "s": [arr(t) for t in self._s], "y": [arr(t) for t in self._y],
            "w-prev": arr(self._w_prev), "g-prev": arr(self._g_prev),
            "clients": sorted(self._rows, key=self._rows.get), "last-updates": arr(self._last),
            "last-round": dict(self._last_round), "models": {r: arr(t) for r, t in self._models.items()},
            "scores": {k: list(v) for k, v in self._scores.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        known = {"round", "s", "y", "w-prev", "g-prev", "clients", "last-updates", "last-round", "models", "scores"}
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"FLDetector got unknown state keys {sorted(unknown)}")
        self._reset()
        if not state:
            return

        def t(a) -> torch.Tensor:
            return torch.as_tensor(np.array(a, copy=True))

        self._round = int(state["round"])
        self._s, self._y = [t(a) for a in state["s"]], [t(a) for a in state["y"]]
        self._w_prev, self._g_prev = t(state["w-prev"]), t(state["g-prev"])
        self._rows = {cid: i for i, cid in enumerate(state["clients"])}
        self._last = t(state["last-updates"])
        self._last_round = {k: int(v) for k, v in state["last-round"].items()}
        self._models = {int(r): t(a) for r, a in state["models"].items()}
        self._scores = {k: [float(x) for x in v] for k, v in state["scores"].items()}
