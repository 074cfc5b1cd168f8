"""One round of defended aggregation, shared by both Flower adapters.

The adapters translate Flower's results into ``ClientResult``s (ground truth already split off),
and this module validates them, builds the updates matrix, calls the defense, averages buffers,
and writes the per-client ``RoundRecord`` that detection metrics are computed from.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .defenses.base import Defense
from .defenses.parallel import map_in_groups, workers
from .fisher import FisherDecodeError, decode_fisher
from .updates import ParamLayout, RoundUpdates, reuse_rows
from .validation import check_arrays, check_num_examples, update_norm

log = logging.getLogger("fl_defense")

# Simulation-only ground truth travels under this metrics key. The adapters remove it before a
# defense sees the round; only the evaluation layer reads it (from RoundRecord.ground_truth).
GROUND_TRUTH_KEY = "fl-defense.malicious"
FISHER_KEY = "fl-defense.fisher"
FISHER_REQUEST_KEY = "fl-defense.compute-fisher"
PARTITION_KEY = "partition-id"
METRICS_ERROR_KEY = "fl-defense.metrics-error"
# The round's own metrics (num-valid, num-rejected, ...) sit beside Flower's under this prefix.
METRICS_PREFIX = "fl-defense."
RESERVED_METRICS = (GROUND_TRUTH_KEY, FISHER_KEY, METRICS_ERROR_KEY)
# Per-client instructions (SDFC's D_k) travel to that client only: as config bytes under
# INSTRUCTION_PREFIX + name (legacy API) or as arrays of one ArrayRecord under INSTRUCTIONS_KEY
# (Message API).
INSTRUCTION_PREFIX = "fl-defense.instruction."
INSTRUCTIONS_KEY = "fl-defense.instructions"


class MissingReferenceError(RuntimeError):
    """A round cannot be aggregated: the defense needs the current global model and none is known."""


class NoValidResultsError(RuntimeError):
    """Several consecutive rounds brought no valid client result: the run stops and says why."""


def split_ground_truth(metrics: object) -> tuple[dict, bool | None]:
    """Return (metrics without the reserved key, the ground-truth flag or None). Metrics that are
    not a mapping come back under the key ``METRICS_ERROR_KEY`` so validation rejects the result."""
    if metrics is None:
        return {}, None
    if not isinstance(metrics, Mapping):  # Flower hands legacy metrics over as a ConfigRecord
        return {METRICS_ERROR_KEY: f"metrics must be a mapping, got {type(metrics).__name__}"}, None
    clean = dict(metrics)
    gt = clean.pop(GROUND_TRUTH_KEY, None)
    return clean, (None if gt is None or not isinstance(gt, (bool, int, float)) else bool(gt))


@dataclass
class ClientResult:
    client_id: str
    arrays: list
    num_examples: object
    metrics: dict = field(default_factory=dict)
    source: object = None  # the adapter's own reply object (the Message API's Message), for its metrics


@dataclass
class RoundRecord:
    """Per-client outcome of one round: the uniform input of detection metrics and plots."""

    server_round: int
    defense: str
    detects: bool
    client_ids: list[str] = field(default_factory=list)
    partition_ids: list[int | None] = field(default_factory=list)
    num_examples: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    # ||w_k - w||_2 of each accepted update as the server received it (float32, before any
    # pre-aggregation), from the finiteness check's own dot product
    update_norms: list[float] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failures: int = 0
    kept_global: bool = False
    reason: str = ""
    info: dict = field(default_factory=dict)
    aggregation_seconds: float = 0.0
    # Evaluation only: client id -> attacker? Never passed to a defense.
    ground_truth: dict[str, bool] = field(default_factory=dict)

    def num_attackers(self) -> int:
        """Attackers among the round's replies, whether their results were accepted or rejected (a
        federation whose every update is rejected still sampled its attackers)."""
        return sum(bool(mal) for mal in self.ground_truth.values())

    def detection(self) -> dict:
        """Confusion counts of flagged vs ground truth, and TPR/FPR (None where undefined)."""
        tp = fp = fn = tn = 0
        for cid, flag in zip(self.client_ids, self.flagged):
            mal = self.ground_truth.get(cid)
            if mal is None:
                continue
            tp += flag and mal
            fp += flag and not mal
            fn += (not flag) and mal
            tn += (not flag) and not mal
        return {
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "tpr": tp / (tp + fn) if (tp + fn) and self.detects else None,
            "fpr": fp / (fp + tn) if (fp + tn) and self.detects else None,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class DefendedAggregation:
    """Validate, flatten, defend, rebuild: the adapter-independent body of aggregate_fit/_train.

    Parameters
    ----------
    defense : Defense
    trainable : list[bool] | None
        Which arrays are trainable parameters (defended); the others are buffers, averaged with
        the weights the defense gave. Default: every floating-point array is trainable.
    device : str
        Where the updates matrix lives ("cpu", "cuda", "cuda:1").
    min_clients : int
        Fewer valid results than this and the global model is kept unchanged.
    max_update_norm : float
        Reject updates whose L2 norm exceeds this (0 disables the check).
    keep_workspace : bool
        Keep the n x d updates matrix (and the Fisher matrix) allocated between rounds and refill
        it, instead of allocating fresh memory every round. A fresh 480 MB matrix costs more in
        page faults than the whole FedAvg arithmetic on it (docs/results/aggregation.md); the price
        is that the server holds the matrix while clients train. False frees it after each round.
    max_rounds_without_valid : int
        After this many consecutive rounds that received replies but not one valid result, raise
        ``NoValidResultsError`` (the run stops with the reasons instead of idling); 0 never stops.
    """

    def __init__(self, defense: Defense, trainable: list[bool] | None = None, device: str = "cpu",
                 min_clients: int = 1, max_update_norm: float = 0.0, keep_workspace: bool = True,
                 max_rounds_without_valid: int = 3) -> None:
        defense.validate()
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if max_rounds_without_valid < 0:
            raise ValueError(f"max_rounds_without_valid must be >= 0, got {max_rounds_without_valid}")
        self.max_rounds_without_valid = max_rounds_without_valid
        self.rounds_without_valid = 0
        self.defense = defense
        self.trainable = trainable
        self.device = torch.device(device)
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.keep_workspace = keep_workspace
        self.records: list[RoundRecord] = []
        # The results of the last round that passed validation, in aggregation order (their
        # weights are records[-1].weights): the adapters aggregate client metrics over them.
        self.last_valid: list[ClientResult] = []
        # node id -> the stable identity its results carried (partition id in simulation): how
        # per-client instructions find a node before it replies
        self.identities: dict[str, str] = {}
        self._workspace: dict[str, torch.Tensor] = {}

    def layout_for(self, global_arrays: list[np.ndarray]) -> ParamLayout:
        return ParamLayout.from_arrays(global_arrays, self.trainable)

    def aggregate(self, server_round: int, global_arrays: list[np.ndarray] | None, results: list[ClientResult],
                  failures: int = 0, ground_truth: dict[str, bool] | None = None) -> tuple[list[np.ndarray] | None, dict]:
        """Return (new arrays or None when the global model is kept, round metrics).

        ``global_arrays`` is the reference the updates are taken against (the current global
        model). Without it (a direct call, as Flower's strategies allow) a ``reference_free``
        defense aggregates against zeros shaped like the round's most common result; any other
        raises ``MissingReferenceError``."""
        t0 = time.perf_counter()
        if global_arrays is None:
            global_arrays = self._zero_reference(results)
        layout = self.layout_for(global_arrays)
        record = RoundRecord(server_round=server_round, defense=self.defense.name,
                             detects=self.defense.detects, failures=failures,
                             ground_truth=dict(ground_truth or {}))
        candidates, fishers = [], []
        # Results arrive in completion order; a fixed order (partition, then client id) makes the
        # floating-point sums, and so the whole run, reproducible.
        results = sorted(results, key=lambda r: (_sort_key(r.metrics.get(PARTITION_KEY)), str(r.client_id)))
        for res in results:
            reason = res.metrics.get(METRICS_ERROR_KEY) or check_num_examples(res.num_examples) or check_arrays(
                res.arrays, layout)
            fisher = None
            if reason is None and self.defense.needs_fisher:
                try:
                    fisher = decode_fisher(res.metrics.get(FISHER_KEY), layout.dim)
                except FisherDecodeError as err:
                    reason = str(err)
            if reason is not None:
                self._reject(record, res, reason)
                continue
            candidates.append(res)
            fishers.append(fisher)
        valid, updates, global_vec, norms = candidates, None, None, []
        if candidates:  # values are checked on the flattened rows, even in a round that will be kept
            valid, fishers, updates, global_vec, norms = self._flatten_checked(layout, global_arrays, candidates,
                                                                               fishers, record)

        self.last_valid = valid
        self.identities.update({str(r.client_id): stable_identity(r) for r in valid})
        record.client_ids = [r.client_id for r in valid]
        record.partition_ids = [_as_int(r.metrics.get(PARTITION_KEY)) for r in valid]
        record.num_examples = [int(r.num_examples) for r in valid]
        record.update_norms = norms
        if len(valid) < self.min_clients:
            record.kept_global = True
            record.reason = f"{len(valid)} valid results, fewer than the minimum of {self.min_clients}"
        else:
            try:
                self.defense.check_num_clients(len(valid))
            except ValueError as err:
                record.kept_global, record.reason = True, str(err)
        if record.kept_global:
            log.warning("round %d: global model kept unchanged: %s", server_round, record.reason)
            record.weights = [0.0] * len(valid)
            record.flagged = [False] * len(valid)
            if not self.keep_workspace:
                self._workspace.clear()
            record.aggregation_seconds = time.perf_counter() - t0
            self.records.append(record)
            self._count_rounds_without_valid(record, bool(results) or failures > 0)
            return None, self._metrics(record)
        self.rounds_without_valid = 0

        round_updates = self._build_round(updates, valid, fishers, layout)
        result = self.defense.aggregate(global_vec, round_updates)
        weights = result.weights.detach().to("cpu", torch.float64).numpy()
        buffers = self._average_buffers(layout, valid, weights)
        if result.selected is not None:  # the chosen client's own model, not global + delta rounded
            chosen = valid[result.selected].arrays
            buf = iter(buffers)
            new_arrays = [np.array(chosen[i], dtype=layout.dtypes[i], copy=True) if t else next(buf)
                          for i, t in enumerate(layout.trainable)]
        else:
            new_arrays = layout.unflatten(result.params, buffers)

        record.weights = [float(w) for w in weights]
        record.flagged = [bool(f) for f in result.flagged.detach().cpu().numpy()]
        record.info = {k: _plain(v) for k, v in result.info.items()}
        del round_updates, result
        if not self.keep_workspace:
            self._workspace.clear()
        record.aggregation_seconds = time.perf_counter() - t0
        self.records.append(record)
        return new_arrays, self._metrics(record)

    def broadcast(self, global_arrays: list[np.ndarray] | None) -> list[np.ndarray] | None:
        """The arrays to send the clients this round in place of ``global_arrays``, or ``None`` to
        send the global model (``Defense.broadcast``; BackdoorIndicator's planted model). Buffers
        travel unchanged; the next round's updates are still taken against ``global_arrays``."""
        if not global_arrays:
            return None
        layout = self.layout_for(global_arrays)
        sent = self.defense.broadcast(layout.flatten(global_arrays, self.device))
        if sent is None:
            return None
        return layout.unflatten(sent, [global_arrays[i] for i in layout.buffer_indices])

    def instructions_for(self, node_id: str) -> dict:
        """What the defense sends this node with its next training round (``{}`` for most)."""
        return self.defense.client_instructions(self.identities.get(str(node_id), str(node_id)))

    def skip_round(self, server_round: int, reason: str, failures: int = 0, had_replies: bool = False) -> dict:
        """Record a round that is not aggregated at all (no results, or failures Flower's
        ``accept_failures=False`` refuses); the global model is kept."""
        record = RoundRecord(server_round=server_round, defense=self.defense.name, detects=self.defense.detects,
                             failures=failures, kept_global=True, reason=reason)
        self.last_valid = []
        log.warning("round %d: global model kept unchanged: %s", server_round, reason)
        self.records.append(record)
        self._count_rounds_without_valid(record, had_replies)
        return self._metrics(record)

    def _zero_reference(self, results: list[ClientResult]) -> list[np.ndarray]:
        if not self.defense.reference_free:
            raise MissingReferenceError(
                f"{type(self.defense).__name__} needs the current global model to take updates against: "
                "call configure_fit/configure_train first, or pass initial_parameters (legacy API)")
        shapes = [tuple((a.shape, a.dtype.str) for a in r.arrays) for r in results
                  if isinstance(r.arrays, (list, tuple)) and r.arrays
                  and all(isinstance(a, np.ndarray) for a in r.arrays)]
        if not shapes:
            return []
        common = Counter(shapes).most_common(1)[0][0]  # malformed results are rejected against it
        return [np.zeros(shape, dtype=np.dtype(dt)) for shape, dt in common]

    def _count_rounds_without_valid(self, record: RoundRecord, had_replies: bool) -> None:
        """Count consecutive rounds whose every reply was rejected or failed; say why loudly, and
        stop the run after ``max_rounds_without_valid`` of them."""
        if record.client_ids:  # some valid results, too few to aggregate: the clients can do it
            self.rounds_without_valid = 0
            return
        if not had_replies:
            return
        self.rounds_without_valid += 1
        reasons = Counter(r["reason"] for r in record.rejected)
        text = "; ".join(f"{reason} ({count}x)" for reason, count in reasons.most_common(5)) or "every client failed"
        message = (f"round {record.server_round}: no valid client result ({len(record.rejected)} rejected, "
                   f"{record.failures} failed): {text}. {self.client_requirements()}")
        log.error(message)
        if self.max_rounds_without_valid and self.rounds_without_valid >= self.max_rounds_without_valid:
            raise NoValidResultsError(f"stopping after {self.rounds_without_valid} consecutive rounds without a valid "
                                      f"client result; last: {message}")

    def client_requirements(self) -> str:
        """What a client must send for its result to be accepted."""
        text = ("A client must send the global model's arrays (same count, shapes and dtype kinds) with finite "
                "values and a positive integer number of examples")
        if self.defense.needs_fisher:
            text += (f"; {type(self.defense).__name__} also needs each client's diagonal Fisher information: add it "
                     "with fl_defense.client.fisher_metrics (NumPyClient fit metrics) or fl_defense.client.add_fisher "
                     "(Message-API reply)")
        return text + "."

    def _reject(self, record: RoundRecord, res: ClientResult, reason: str) -> None:
        log.warning("round %d: rejected result of client %s: %s", record.server_round, res.client_id, reason)
        record.rejected.append({"client_id": res.client_id, "reason": reason})

    def _flatten_checked(self, layout: ParamLayout, global_arrays: list[np.ndarray], candidates: list[ClientResult],
                         fishers: list, record: RoundRecord
                         ) -> tuple[list[ClientResult], list, torch.Tensor, torch.Tensor, list[float]]:
        """Flatten each candidate's delta_k = w_k - w into its row of the updates matrix and check
        its values there (``validation.update_norm``) while the row is in cache. On the CPU the candidates
        are shared out among the threads (``parallel.map_in_groups``; each row is written and
        checked the same way whichever thread takes it). Rejected rows are then closed up, in
        order, by moving the accepted rows after them. Returns the accepted results, their
        Fisher diagonals, the matrix of their rows, the global vector and the rows' L2 norms (the
        check's own dot product: no further pass)."""
        global_vec = layout.flatten(global_arrays, self.device)
        updates = self._matrix("updates", len(candidates), layout.dim, layout.dtype)

        def fill(k: int) -> tuple[float | None, str | None]:
            layout.flatten_into(candidates[k].arrays, updates[k], minus=global_vec)  # one pass
            return update_norm(updates[k], candidates[k].arrays, layout, self.max_update_norm)

        checked = map_in_groups(fill, range(len(candidates)), workers() if self.device.type == "cpu" else 1)
        valid, kept_fishers, norms = [], [], []
        for k, (res, fisher, (norm, reason)) in enumerate(zip(candidates, fishers, checked)):
            if reason is not None:
                self._reject(record, res, reason)
                continue
            if len(valid) != k:  # close the gap a rejected row left
                updates[len(valid)].copy_(updates[k])
            valid.append(res)
            kept_fishers.append(fisher)
            norms.append(norm)
        return valid, kept_fishers, updates[:len(valid)], global_vec, norms

    def _build_round(self, updates: torch.Tensor, valid: list[ClientResult], fishers: list,
                     layout: ParamLayout) -> RoundUpdates:
        n, d = updates.shape
        fisher = None
        if self.defense.needs_fisher:
            fisher = self._matrix("fisher", n, d, updates.dtype)
            for k, f in enumerate(fishers):
                if fisher.device.type == "cpu":
                    np.copyto(fisher[k].numpy(), f, casting="same_kind")
                else:
                    fisher[k].copy_(torch.from_numpy(np.asarray(f)).to(updates.dtype))
        num_examples = torch.tensor([float(r.num_examples) for r in valid], dtype=torch.float64)
        return RoundUpdates(updates=updates, num_examples=num_examples,
                            client_ids=[stable_identity(r) for r in valid],
                            layer_slices=layout.layer_slices, fisher=fisher, layer_shapes=layout.layer_shapes)

    def _matrix(self, name: str, n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An n x d matrix from the workspace (``updates.reuse_rows``)."""
        buf = self._workspace[name] = reuse_rows(self._workspace.pop(name, None), n, d, dtype=dtype,
                                                 device=self.device)
        return buf[:n]

    @staticmethod
    def _average_buffers(layout: ParamLayout, valid: list[ClientResult], weights: np.ndarray) -> list[np.ndarray]:
        """Buffers (BatchNorm statistics) are not defended: a plain mean with the defense's weights
        (sample weights when the defense gave every client weight 0)."""
        if not layout.buffer_indices:
            return []
        w = weights if weights.sum() > 0 else np.array([float(r.num_examples) for r in valid])
        w = w / w.sum()
        out = []
        for i in layout.buffer_indices:
            acc = sum(wk * np.asarray(r.arrays[i], dtype=np.float64) for wk, r in zip(w, valid))
            dtype = np.dtype(layout.dtypes[i])
            out.append(np.rint(acc).astype(dtype) if dtype.kind in "iu" else acc.astype(dtype))
        return out

    @staticmethod
    def _metrics(record: RoundRecord) -> dict:
        return {
            f"{METRICS_PREFIX}num-valid": len(record.client_ids),
            f"{METRICS_PREFIX}num-rejected": len(record.rejected),
            f"{METRICS_PREFIX}num-failures": record.failures,
            f"{METRICS_PREFIX}num-flagged": int(sum(record.flagged)),
            f"{METRICS_PREFIX}kept-global": int(record.kept_global),
            f"{METRICS_PREFIX}aggregation-seconds": record.aggregation_seconds,
        }

    # Checkpoint support: the defense's own state across rounds.
    def state_dict(self) -> dict:
        return {"defense": self.defense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.defense.load_state_dict(state.get("defense", {}))


def stable_identity(res: ClientResult) -> str:
    """The identity a defense keys per-client state by (FoolsGold's history): the partition id in
    simulation, where node ids are drawn anew by every run (so a resumed run finds its clients
    again), else the node id. A client could claim another's partition id; in a deployment no
    partition id is reported and the node id, fixed by the SuperLink, is used."""
    pid = _as_int(res.metrics.get(PARTITION_KEY))
    return f"partition-{pid}" if pid is not None else str(res.client_id)


def _sort_key(v: object) -> tuple[int, int]:
    as_int = _as_int(v)
    return (0, as_int) if as_int is not None else (1, 0)


def _as_int(v: object) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _plain(v: object) -> object:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
