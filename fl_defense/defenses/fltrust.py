"""FLTrust (Cao, Fang, Liu and Gong, NDSS 2021)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult, ServerContext


class FLTrust(Defense):
    """FLTrust, Cao et al., NDSS 2021 (sec. III, Algorithm 2).

    The server trains the current global model on its own small root dataset (no client has it),
    giving the server update g_0. Each client's trust score is TS_k = ReLU(cos(delta_k, g_0));
    its update is rescaled to the server update's norm, ||g_0|| / ||delta_k|| * delta_k; the step
    is sum_k TS_k * rescaled_k / sum_k TS_k. Clients with trust 0 are flagged. If every trust score
    is 0 the global model is kept.

    Parameters
    ----------
    server_update : callable
        Maps the global trainable vector to the server's update on the root dataset.
    """

    name = "fltrust"
    paper = "Cao et al., NDSS 2021"
    detects = True
    server_provided = ("server_update",)

    def __init__(self, server_update: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 server_lr: float = 1.0) -> None:
        self.server_update = server_update
        self.server_lr = server_lr

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """g_0: a private model copy trained on the held-out split (the root dataset) like a client."""
        from ..training import ServerUpdate

        cfg = ctx.cfg
        return {"server_update": ServerUpdate(ctx.model(), *ctx.held_out(), cfg.local_epochs, cfg.batch_size,
                                              cfg.learning_rate, cfg.momentum, ctx.seed)}

    def validate(self) -> None:
        if self.server_update is None or not callable(self.server_update):
            raise ValueError("server_update must be a callable (training on the server's root dataset)")

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        g0 = self.server_update(global_params).to(ru.device, ru.updates.dtype)
        g0_norm = torch.linalg.vector_norm(g0)
        norms = torch.linalg.vector_norm(ru.updates, dim=1).clamp_min(1e-12)
        cos = (ru.updates @ g0) / (norms * g0_norm.clamp_min(1e-12))
        trust = torch.relu(cos)
        if trust.sum() <= 0:
            return DefenseResult(params=global_params.clone(), weights=torch.zeros(ru.n), flagged=trust <= 0,
                                 info={"trust": trust})
        w = trust / trust.sum()
        step = (w * (g0_norm / norms)) @ ru.updates
        return DefenseResult(params=global_params + self.server_lr * step, weights=w, flagged=trust <= 0,
                             info={"trust": trust})

    # The server's own training is seeded per call; its call count travels with checkpoints so a
    # resumed run trains on the root dataset exactly as the uninterrupted one would.
    def state_dict(self) -> dict:
        calls = getattr(self.server_update, "calls", None)
        return {} if calls is None else {"server-update-calls": calls}

    def load_state_dict(self, state: dict) -> None:
        if "server-update-calls" in state and hasattr(self.server_update, "calls"):
            self.server_update.calls = state["server-update-calls"]
