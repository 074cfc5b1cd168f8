"""SDFC: self-driven Fisher calibration (Huang et al., ECCV 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..updates import RoundUpdates
from .aggregators import column_block_sums, map_column_blocks
from .base import Defense, DefenseResult, RunKey

REFERENCES = ("client", "global")


class SDFC(Defense):
    """Fisher calibration against a server validation set, Huang et al., ECCV 2024.

    The server holds a small validation set no client receives. For each client k it compares the
    Fisher the client reported on its own data, F_k, with the Fisher F_val,k of the same model on
    the validation set (``reference="client"``, the paper's D_k; ``"global"`` evaluates F_val once
    on the current global model, cheaper):

        D_k = |F_k - F_val,k|                                  (per-parameter discrepancy)
        d_k = mean over layers of sum(D_k[layer]),  d~ = min-max(d) over clients
        weight_k = softmax(-d~ / temperature)_k                (client weights; no one is dropped)

    Calibration: the paper regularises local training with lambda * sum D_k (theta - theta_prev)^2;
    under the diagonal-Fisher quadratic model of the local loss, that penalty shrinks coordinate i
    of the step by F_k,i / (F_k,i + 2 lambda D_k,i). The server applies exactly that factor to each
    update, so coordinates whose importance disagrees with the validation set (a trigger's neurons,
    important only on poisoned data) are down-weighted while agreeing ones pass unchanged.

    SDFC never drops a client. ``flagged`` is a report only: clients whose discrepancy d_k exceeds
    ``flag_ratio`` times the round's median discrepancy.

    Threat: SDFC trusts the Fisher the clients report. A client that forges a benign-looking F_k
    lowers its own D_k, raises its weight and escapes calibration; the validation Fisher limits
    this only in ``reference="client"`` mode, where F_val is computed by the server from the
    uploaded model itself.

    Parameters
    ----------
    validation_fisher : callable
        Maps a trainable-parameter vector to the diagonal Fisher of that model on the server's
        validation set (``fl_defense.fisher.ValidationFisher`` builds one).
    reference : {"client", "global"}
    calibration : float
        lambda of the calibration term (the paper's default 1.0; 0 disables calibration).
    temperature : float
        Softmax temperature of the client weights (the paper uses 1).
    """

    name = "sdfc"
    paper = "Huang et al., ECCV 2024"
    detects = True
    needs_fisher = True
    server_provided = ("validation_fisher",)
    run_config = {
        "reference": RunKey("SDFC: validation Fisher of each uploaded model (client) or of the global model once (global)",
                            choices=("client", "global")),
        "calibration": RunKey("SDFC: calibration strength lambda (0: off)", check=lambda v: v >= 0),
        "temperature": RunKey("SDFC: softmax temperature of the client weights (the paper: 1)", check=lambda v: v > 0),
        "flag_ratio": RunKey("SDFC: report a client as flagged when its discrepancy exceeds this times the round's median",
                             check=lambda v: v > 0),
    }

    def __init__(self, validation_fisher: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reference: str = "client", calibration: float = 1.0, temperature: float = 1.0,
                 server_lr: float = 1.0, flag_ratio: float = 2.0) -> None:
        self.validation_fisher = validation_fisher
        self.reference = reference
        self.calibration = calibration
        self.temperature = temperature
        self.server_lr = server_lr
        self.flag_ratio = flag_ratio

    def validate(self) -> None:
        if self.validation_fisher is None or not callable(self.validation_fisher):
            raise ValueError("validation_fisher must be a callable (the server's validation-set Fisher)")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.calibration < 0 or not self.temperature > 0 or not self.server_lr > 0:
            raise ValueError("calibration must be >= 0, temperature and server_lr > 0")

    def reference_fisher(self, global_params: torch.Tensor, ru: RoundUpdates) -> torch.Tensor:
        if self.reference == "global":
            return self.validation_fisher(global_params).to(ru.device).expand(ru.n, -1)
        return torch.stack([self.validation_fisher(global_params + ru.updates[k]).to(ru.device)
                            for k in range(ru.n)])

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        if ru.fisher is None:
            raise ValueError("SDFC needs the clients' Fisher information")
        fisher, ref = ru.fisher, self.reference_fisher(global_params, ru)
        per_layer = torch.zeros((ru.n, len(ru.layer_slices)), dtype=torch.float64, device=ru.device)
        for layer, sl in enumerate(ru.layer_slices):  # sum of D_k over each layer, block by block
            per_layer[:, layer] = column_block_sums(
                lambda cols: (fisher[:, cols] - ref[:, cols]).abs().sum(dim=1).double(), fisher, ru.n, within=sl)
        d = per_layer.mean(dim=1).to(torch.float32)
        span = d.max() - d.min()
        d_norm = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
        weights = torch.softmax(-d_norm / self.temperature, dim=0)
        weights32 = weights.to(ru.updates.dtype)
        if self.calibration > 0:  # weights @ (delta * F / (F + 2 lambda D)), block by block
            step = torch.empty(ru.d, device=ru.device)

            def calibrated(cols: slice) -> None:
                f = fisher[:, cols]
                factor = torch.sub(f, ref[:, cols]).abs_().mul_(2 * self.calibration).add_(f)
                factor = torch.div(f, factor).nan_to_num_(nan=1.0)  # 0/0 (F = D = 0): unchanged
                step[cols] = weights32 @ factor.mul_(ru.updates[:, cols])

            map_column_blocks(calibrated, fisher)
        else:
            step = weights32 @ ru.updates
        flagged = d > self.flag_ratio * d.median()
        return DefenseResult(params=global_params + self.server_lr * step, weights=weights, flagged=flagged,
                             info={"discrepancy": d})
