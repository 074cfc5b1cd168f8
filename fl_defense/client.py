"""Client-side helpers for your own Flower clients: what FDCR and SDFC need from them.

FDCR and SDFC weigh each client's update by its diagonal Fisher information, which only the
client can compute (on its own data, with its trained model). The strategies ask for it in the
round's config (``fl-defense.compute-fisher``); one line in the client answers:

Legacy API (``NumPyClient.fit``)::

    metrics.update(fisher_metrics(net, trainloader, config))
    return get_weights(net), len(trainloader.dataset), metrics

Message API (``@app.train()``)::

    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord(m)})
    add_fisher(content, net, trainloader, msg.content["config"])
    return Message(content=content, reply_to=msg)

Both compute ``fl_defense.fisher.empirical_fisher`` (per-sample squared gradients of the
log-likelihood, averaged) over up to ``max_samples`` of the client's samples, and do nothing when
the server did not ask (so the same client works with every strategy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from .fisher import FisherDecodeError, decode_fisher, empirical_fisher, encode_fisher, payload_length
from .rounds import FISHER_KEY, FISHER_REQUEST_KEY, INSTRUCTION_PREFIX, INSTRUCTIONS_KEY

__all__ = ["fisher_metrics", "add_fisher", "collect_samples", "wants_fisher", "instructions", "SDFCCalibration"]


def wants_fisher(config: Mapping | None) -> bool:
    """Whether the round's config asks for Fisher information (None: assume it does)."""
    return True if config is None else bool(config.get(FISHER_REQUEST_KEY, False))


def fisher_metrics(model: torch.nn.Module, data, config: Mapping | None = None, max_samples: int = 512,
                   half: bool = False, **loader_keys) -> dict:
    """``{"fl-defense.fisher": <bytes>}`` to merge into ``NumPyClient.fit``'s metrics, or ``{}``
    when ``config`` (the fit config) does not ask for it. ``data``: a DataLoader or iterable of
    batches (``(x, y)`` tuples or dicts; see ``collect_samples``) or an ``(inputs, labels)`` pair of
    tensors. ``half=True`` sends float16 (half the bytes)."""
    if not wants_fisher(config):
        return {}
    inputs, labels = collect_samples(data, max_samples, **loader_keys)
    return {FISHER_KEY: encode_fisher(empirical_fisher(model, inputs, labels, max_samples=max_samples), half=half)}


def add_fisher(content: RecordDict, model: torch.nn.Module, data, config: Mapping | None = None,
               max_samples: int = 512, **loader_keys) -> RecordDict:
    """Add the Fisher diagonal to a Message-API reply's content (an ArrayRecord under
    ``"fl-defense.fisher"``) when ``config`` (the train message's ConfigRecord) asks for it;
    returns ``content``."""
    if wants_fisher(config):
        inputs, labels = collect_samples(data, max_samples, **loader_keys)
        fisher = empirical_fisher(model, inputs, labels, max_samples=max_samples)
        content[FISHER_KEY] = ArrayRecord({"fisher": Array(np.ascontiguousarray(fisher))})
    return content


def collect_samples(data, max_samples: int = 512, input_key: str | None = None,
                    label_key: str = "label") -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_samples`` (inputs, labels) from a pair of tensors or from batches: ``(x, y)``
    tuples, or dicts as flwr-datasets loaders yield them (labels under ``label_key``; inputs under
    ``input_key``, by default the one other tensor in the batch)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][:max_samples], data[1][:max_samples]
    xs, ys, count = [], [], 0
    for batch in _batches(data):
        if isinstance(batch, Mapping):
            if label_key not in batch:
                raise ValueError(f"batch has no labels under {label_key!r} (keys: {sorted(batch)}); pass label_key=")
            key = input_key or _only_other_tensor(batch, label_key)
            x, y = batch[key], batch[label_key]
        else:
            x, y = batch[0], batch[1]
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        xs.append(x[: max_samples - count])
        ys.append(y[: max_samples - count])
        count += len(xs[-1])
        if count >= max_samples:
            break
    if not xs:
        raise ValueError("no samples to compute the Fisher information on")
    return torch.cat(xs), torch.cat(ys)


def _batches(data) -> Iterable:
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader, an iterable of batches or (inputs, labels), "
                        f"got {type(data).__name__}")
    return data


def _only_other_tensor(batch: Mapping, label_key: str) -> str:
    others = [k for k, v in batch.items() if k != label_key and isinstance(v, torch.Tensor)]
    if len(others) != 1:
        raise ValueError(f"cannot tell the inputs among batch keys {sorted(batch)}: pass input_key=")
    return others[0]


def instructions(received) -> dict[str, np.ndarray]:
    """The per-client instructions the server sent this client (SDFC's D_k in its authors' mode):
    from a legacy fit config (bytes under ``fl-defense.instruction.<name>``) or a Message-API
    train message's content (the ``fl-defense.instructions`` ArrayRecord). ``{}`` when none."""
    if isinstance(received, RecordDict):
        if INSTRUCTIONS_KEY not in received.array_records:
            return {}
        return {k: v.numpy() for k, v in received.array_records[INSTRUCTIONS_KEY].items()}
    out = {}
    for key, value in dict(received or {}).items():
        if key.startswith(INSTRUCTION_PREFIX) and isinstance(value, (bytes, bytearray)):
            try:
                out[key[len(INSTRUCTION_PREFIX):]] = decode_fisher(value, payload_length(value))
            except FisherDecodeError as err:
                raise ValueError(f"instruction {key!r} from the server is malformed: {err}") from None
    return out


class SDFCCalibration:
    """SDFC's calibration where the authors' code puts it, on the client: local training minimises
    cross-entropy + lambda * sum_i D_i (theta_i - theta_prev,i)^2, with D this client's discrepancy
    from the server (sent with the round when ``SDFC(calibration_mode="client")``) and theta_prev
    this client's own local model of its previous round, kept in its persistent Flower state
    (``context.state``). Without D (the client's first round, or another defense) or without
    theta_prev (first round, lost state), the penalty is zero: training is plain.

        calib = SDFCCalibration(instructions(config), context.state, model)
        loss = cross_entropy(...) + calib.penalty(model)     # every batch
        ...
        calib.remember(model, context.state)                 # after training
    """

    STATE_KEY = "fl-defense.sdfc-previous-model"

    def __init__(self, received: dict, state: RecordDict | None, model: torch.nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        dim = sum(p.numel() for p in params)
        d, lam = received.get("sdfc-discrepancy"), received.get("sdfc-lambda")
        self.discrepancy = None if d is None or len(d) != dim else torch.as_tensor(np.asarray(d, np.float32))
        self.lam = float(np.asarray(lam).reshape(-1)[0]) if lam is not None else 0.0
        self.previous = None
        if state is not None and self.STATE_KEY in state.array_records:
            prev = state.array_records[self.STATE_KEY]["theta"].numpy()
            self.previous = torch.as_tensor(prev) if prev.size == dim else None

    @property
    def active(self) -> bool:
        return self.discrepancy is not None and self.previous is not None and self.lam > 0

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """lambda * sum D (theta - theta_prev)^2 over the trainable parameters (0 when inactive)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not self.active:
            return params[0].new_zeros(())
        theta = torch.cat([p.reshape(-1) for p in params])
        diff = theta - self.previous.to(theta)
        return self.lam * (self.discrepancy.to(theta) * diff * diff).sum()

    def remember(self, model: torch.nn.Module, state: RecordDict | None) -> None:
        """Keep this round's local model as the next round's theta_prev."""
        if state is None:
            return
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).cpu().numpy()
        state[self.STATE_KEY] = ArrayRecord({"theta": Array(np.ascontiguousarray(theta, dtype=np.float32))})
