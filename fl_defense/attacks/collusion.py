"""The simulation-only collusion step: between the clients' replies and the defense, the
colluding attackers' results are rewritten from what their knowledge level lets them know.

An attacker in a colluding attack trains honestly on its clean data and reports that honest
update under the reserved metrics key ``HONEST_UPDATE_KEY`` (its arrays are its honest model, or
for attacks with ``uses_poisoned`` the model it trained on poisoned data). ``collude`` reads:
- the colluders, identified by that key alone (as real colluders know each other), never by the
  simulation's ground truth;
- with ``partial`` knowledge, only the colluders' own results; with ``full`` knowledge, the other
  clients' arrays too (the round's benign updates, as the papers' omniscient attacker sees them);
and returns every result with the key removed and the colluders' arrays replaced by what the
attack crafts: exactly what real colluding clients could have sent. A defense never sees it run.

The honest update's wire format, in both Flower APIs: one flat float32 vector, the trainable
parameters in the model's state_dict order, trained minus global. The legacy API carries it as
bytes in the metrics (``encode_update``); in the Message API a MetricRecord cannot hold bytes, so
it is an ArrayRecord of that one array under the same key in the reply's RecordDict
(``attach_honest_update``). The server-side hooks live in ``server_app/collusion.py``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from ..defenses.parallel import map_in_groups, workers
from ..rounds import PARTITION_KEY, ClientResult
from ..updates import ParamLayout, reuse_rows
from ..validation import check_arrays
from .base import AttackRound, ColludingAttack

log = logging.getLogger("fl_defense")

HONEST_UPDATE_KEY = "fl-defense.honest-update"


def _flat32(update: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(update, torch.Tensor):
        update = update.detach().cpu().numpy()
    return np.ascontiguousarray(update, dtype=np.float32).reshape(-1)


def encode_update(update: np.ndarray | torch.Tensor) -> bytes:
    """A flat update (the trainable parameters, in the model's state_dict order) as float32 bytes."""
    return _flat32(update).tobytes()


def attach_honest_update(content: RecordDict, update: np.ndarray | torch.Tensor) -> RecordDict:
    """Message API: add a colluding client's honest update (the trainable parameters in the
    model's state_dict order, trained minus global; flattened and cast to float32 here) to its
    train reply's content, as an ArrayRecord of one flat float32 array under ``HONEST_UPDATE_KEY``.
    Returns ``content``. Only the simulation's collusion step reads it, and removes it::

        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord(m)})
        attach_honest_update(content, parameters_to_vector(net.parameters()) - global_vector)
    """
    content[HONEST_UPDATE_KEY] = ArrayRecord({"update": Array(_flat32(update))})
    return content


def honest_update_payload(record: object) -> bytes | None:
    """The float32 bytes (``encode_update``'s format) of a record ``attach_honest_update`` built,
    or None when ``record`` is not an ArrayRecord of one flat float32 array."""
    if not isinstance(record, ArrayRecord) or len(record) != 1:
        return None
    try:
        (arr,) = record.to_numpy_ndarrays()
    except Exception:  # an undecodable array: a malformed payload like any other
        return None
    return arr.tobytes() if arr.dtype == np.float32 and arr.ndim == 1 else None


def decode_update(payload: object, dim: int) -> np.ndarray | None:
    """The update of ``encode_update``, or None when it is not ``dim`` finite float32 values."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) != 4 * dim:
        return None
    arr = np.frombuffer(payload, dtype=np.float32)
    return arr if np.isfinite(arr).all() else None


def strip(metrics: object) -> dict:
    """The metrics without the reserved key (what reaches the defense's adapter)."""
    return {k: v for k, v in dict(metrics or {}).items() if k != HONEST_UPDATE_KEY}


def collude(results: list[ClientResult], global_arrays: list[np.ndarray], layout: ParamLayout,
            attack: ColludingAttack, knowledge: str, server_round: int, seed: int,
            workspace: torch.Tensor | None = None) -> tuple[list[ClientResult], dict, torch.Tensor | None]:
    """Rewrite the colluders' results (see the module doc). With ``partial`` knowledge the other
    results' arrays are never read. Returns (results in the input order, the round's record,
    the known-updates buffer for reuse next round)."""
    if knowledge not in ("partial", "full"):
        raise ValueError(f"knowledge must be partial or full, got {knowledge!r}")
    record = {"round": server_round, "attack": attack.name, "knowledge": knowledge,
              "target": getattr(attack, "target", "agnostic"), "colluders": 0, "known_updates": 0}
    order = sorted(range(len(results)), key=lambda i: (_partition(results[i]), str(results[i].client_id)))
    colluders, honest, others = [], [], []
    dim = layout.dim
    for i in order:
        res = results[i]
        if HONEST_UPDATE_KEY not in (res.metrics or {}):
            others.append(i)
            continue
        vec = decode_update(res.metrics[HONEST_UPDATE_KEY], dim)
        reason = "its honest update is not %d finite float32 values" % dim if vec is None else check_arrays(
            res.arrays, layout)
        if reason is not None:  # not a usable colluder: passed on (stripped) for the adapter to judge
            log.warning("round %d: colluder %s left out of the collusion: %s", server_round, res.client_id, reason)
            others.append(i)
            continue
        colluders.append(i)
        honest.append(vec)
    out = [res if HONEST_UPDATE_KEY not in (res.metrics or {}) else replace(res, metrics=strip(res.metrics))
           for res in results]
    m = len(colluders)
    record["colluders"] = m
    if m == 0:
        return out, record, workspace

    global_vec = layout.flatten(global_arrays)
    rows = m + (len(others) if knowledge == "full" else 0)
    known = reuse_rows(workspace, rows, dim)
    workspace = known
    known = known[:rows]
    for k, vec in enumerate(honest):
        known[k].numpy()[:] = vec
    k = m
    if knowledge == "full":  # the round's other updates, flattened as the server will, on the threads
        usable = [i for i in others if check_arrays(results[i].arrays, layout) is None]

        def fill(j: int) -> bool:
            row = known[m + j]
            layout.flatten_into(results[usable[j]].arrays, row, minus=global_vec)
            with np.errstate(over="ignore", invalid="ignore"):
                return bool(np.isfinite(np.dot(row.numpy(), row.numpy())))  # finite entries, no overflow

        finite = map_in_groups(fill, range(len(usable)), workers())
        for j, ok in enumerate(finite):  # close up the rows of non-finite updates, in order
            if ok:
                if k != m + j:
                    known[k].copy_(known[m + j])
                k += 1
    known = known[:k]
    record["known_updates"] = k

    poisoned = None
    if attack.uses_poisoned:  # what each trained on its poisoned data, as an update
        poisoned = torch.empty((m, dim), dtype=torch.float32)
        map_in_groups(lambda r: layout.flatten_into(results[colluders[r]].arrays, poisoned[r], minus=global_vec),
                      range(m), workers())
    rnd = AttackRound(num_clients=len(results), num_attackers=m, knowledge=knowledge, poisoned=poisoned,
                      seed=int(np.random.SeedSequence([seed, 0xC011D, server_round]).generate_state(1)[0]))
    crafted = attack.craft(known, rnd)
    for key in ("last_gamma", "last_lambda", "last_targeted"):
        if getattr(attack, key, None) is not None:
            record[key.removeprefix("last_")] = float(getattr(attack, key))
    crafted = crafted.add_(global_vec).cpu()  # the models they send (one for all, or m x d)
    for row, i in enumerate(colluders):
        res = results[i]
        vec = crafted if crafted.dim() == 1 else crafted[row]
        arrays = _arrays(layout, vec, [res.arrays[j] for j in layout.buffer_indices])  # own buffers kept
        out[i] = ClientResult(res.client_id, arrays, res.num_examples, strip(res.metrics))
    return out, record, workspace


def _arrays(layout: ParamLayout, vec: torch.Tensor, buffers: list) -> list[np.ndarray]:
    """The arrays of a crafted model: its trainable arrays are views of ``vec`` (fresh from the
    attack, never written again; copied only for another dtype), the buffers the attacker's own."""
    flat, buf = vec.numpy(), iter(buffers)
    out, slices = [], iter(layout.layer_slices)
    for shape, dtype, trainable in zip(layout.shapes, layout.dtypes, layout.trainable):
        out.append(flat[next(slices)].reshape(shape).astype(dtype, copy=False) if trainable else next(buf))
    return out


def _partition(res: ClientResult) -> tuple[int, int]:
    try:
        return (0, int((res.metrics or {}).get(PARTITION_KEY)))
    except (TypeError, ValueError):
        return (1, 0)
