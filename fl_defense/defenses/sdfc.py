"""SDFC: self-driven Fisher calibration (Huang et al., ECCV 2024)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..updates import RoundUpdates
from .aggregators import column_block_sums, map_column_blocks
from .base import Defense, DefenseResult, RunKey, ServerContext

REFERENCES = ("client", "global")
CALIBRATION_MODES = ("server", "client")


class SDFC(Defense):
    """Fisher calibration against a server validation set, Huang et al., ECCV 2024.

    The server holds a small validation set no client receives. For each client k it compares the
    Fisher the client reported on its own data, F_k, with the Fisher F_val,k of the same model on
    the validation set (``reference="client"``, the paper's D_k; ``"global"`` evaluates F_val once
    on the current global model, cheaper):

        D_k = |F_k - F_val,k|                                  (per-parameter discrepancy)
        d_k = mean over layers of sum(D_k[layer]),  d~ = min-max(d) over clients
        weight_k = softmax(-d~ / temperature)_k                (client weights; no one is dropped)

    Calibration, two ways (``calibration_mode``):

    - ``"client"``, where the authors' released code puts it: client k trains with cross-entropy
      plus lambda * sum_i D_k,i (theta_i - theta_prev,i)^2, theta_prev its own local model of its
      previous round, D_k the discrepancy the server computed from that round. The server keeps
      each client's D_k (float16, 2 bytes per parameter per client seen) and sends it with the
      client's next training round (``client_instructions``); aggregation is then the plain
      softmax-weighted mean. A client's first round, or a client whose state was lost, trains
      without the penalty (no D_k or no theta_prev yet), as the authors' first round does. With
      plain SGD at learning rate eta, a coordinate with 2 eta lambda D_k,i >= 2 oscillates instead
      of settling (the penalty's own curvature); Fisher discrepancies are usually far below that.
    - ``"server"`` (default), a closed form on the server: under the diagonal-Fisher quadratic
      model of the local loss the penalty shrinks coordinate i of the step by F_k,i / (F_k,i +
      2 lambda D_k,i), and the server applies that factor to each update. Its anchor is the round's
      global model rather than theta_prev, it cannot push a coordinate the client finds important
      below 1 / (1 + 2 lambda) of its step (a third at lambda 1), and it nearly zeroes coordinates
      the validation set finds important and the client does not, which benign label skew
      produces. The paper's summary calls calibration server-side and free for clients; the
      released code does it on the client.

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
    calibration_mode : {"server", "client"}
        Where calibration happens (above).
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
        "calibration_mode": RunKey("SDFC: calibrate on the server (closed form) or on the client (the authors' code: "
                                   "each client trains with the penalty lambda * sum D_k (theta - theta_prev)^2)",
                                   choices=("server", "client")),
    }

    def __init__(self, validation_fisher: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reference: str = "client", calibration: float = 1.0, temperature: float = 1.0,
                 server_lr: float = 1.0, flag_ratio: float = 2.0, calibration_mode: str = "server") -> None:
        self.calibration_mode = calibration_mode
        # client id -> D_k of its last round (calibration_mode="client"), sent with its next one
        self._discrepancies: dict[str, np.ndarray] = {}
        self.validation_fisher = validation_fisher
        self.reference = reference
        self.calibration = calibration
        self.temperature = temperature
        self.server_lr = server_lr
        self.flag_ratio = flag_ratio

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """F_val: the Fisher of a private model copy (vectors are loaded into it) on the held-out split."""
        from ..fisher import ValidationFisher

        return {"validation_fisher": ValidationFisher(ctx.model(), *ctx.held_out(),
                                                      max_samples=ctx.cfg.fisher_samples)}

    def validate(self) -> None:
        if self.validation_fisher is None or not callable(self.validation_fisher):
            raise ValueError("validation_fisher must be a callable (the server's validation-set Fisher)")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.calibration < 0 or not self.temperature > 0 or not self.server_lr > 0:
            raise ValueError("calibration must be >= 0, temperature and server_lr > 0")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration_mode must be one of {CALIBRATION_MODES}, got {self.calibration_mode!r}")

    def client_instructions(self, client_id: str) -> dict:
        """Client mode: the client's own D_k and lambda for its local penalty."""
        if self.calibration_mode != "client" or self.calibration == 0 or client_id not in self._discrepancies:
            return {}
        return {"sdfc-discrepancy": self._discrepancies[client_id],
                "sdfc-lambda": np.array([self.calibration], dtype=np.float32)}

    def state_dict(self) -> dict:
        return {"discrepancies": dict(self._discrepancies)} if self._discrepancies else {}

    def load_state_dict(self, state: dict) -> None:
        self._discrepancies = dict(state.get("discrepancies", {}))

    def _keep_discrepancies(self, ru: RoundUpdates, fisher: torch.Tensor, ref: torch.Tensor) -> None:
        """D_k = |F_k - F_val,k| of every client of the round, kept (float16) by client identity."""
        rows = np.empty((ru.n, ru.d), dtype=np.float16)

        def block(cols: slice) -> None:
            rows[:, cols] = (fisher[:, cols] - ref[:, cols]).abs().clamp_max(65504.0).cpu().numpy()

        map_column_blocks(block, fisher)
        for k, cid in enumerate(ru.client_ids):
            self._discrepancies[cid] = rows[k].copy()

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
        if self.calibration_mode == "client" and self.calibration > 0:  # D_k goes back to client k
            self._keep_discrepancies(ru, fisher, ref)
        if self.calibration > 0 and self.calibration_mode == "server":  # weights @ (delta * F / (F + 2 lambda D))
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
