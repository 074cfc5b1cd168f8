"""BackdoorIndicator (Li & Dai, USENIX Security 2024)."""

from __future__ import annotations

from typing import Protocol

import torch

from ..data import OOD_CHOICES, OOD_SOURCES, load_ood
from ..updates import RoundUpdates
from .base import Defense, DefenseResult, RunKey, ServerContext


class Indicator(Protocol):
    """What the server provides: its indicator task over trainable vectors
    (``fl_defense.server_tasks.IndicatorTask`` in the app)."""

    def plant(self, global_params: torch.Tensor, epochs: int, lr: float, mu: float) -> torch.Tensor: ...

    def label_accuracy(self, params: torch.Tensor) -> torch.Tensor: ...


class BackdoorIndicator(Defense):
    """BackdoorIndicator, Li & Dai, USENIX Security 2024 (sec. 5; the authors' ``IndicatorServer``).

    Its observation (sec. 4): a backdoor planted later with the same target label keeps an earlier
    backdoor alive, and backdoor samples are out-of-distribution (OOD) for the benign task. So
    the server plants an *indicator task* before every round and reads it back afterwards:

    1. Plant (``broadcast``): starting from the global model G, train on OOD samples x_ood with
       indicator labels y_ind (spread evenly over the classes), minimising
       CE(f_w(x_ood), y_ind) + (mu / 2) * ||w - G||_2 for ``epochs`` epochs at learning rate ``lr``
       (SGD, momentum 0.9, weight decay 5e-4, as the authors' code). The planted model W is what
       the clients receive.
    2. Read back (``aggregate``): for each returned model w_k = G + delta_k, the indicator accuracy
       per indicator label l, acc_k(l) = share of the samples labelled l that w_k classifies as l,
       and VIR_k = max_l acc_k(l) (the authors take the best-kept label: a backdoor with target t
       keeps the indicator samples labelled t). Benign training on in-distribution data erodes the
       indicator; VIR_k >= ``threshold`` flags client k.
    3. The unflagged clients are averaged (FedAvg, sample-weighted):
       G' = G + server_lr * sum_k (n_k / n) delta_k over the unflagged. Updates are taken against
       the true global model G, so with server_lr = 1 this equals the authors' W + mean(w_k - W).
       If every client is flagged, G is kept.

    Choices the paper leaves open or that differ here: the authors' defaults (800 OOD samples,
    lr 0.0008-0.005, 50-200 epochs, threshold 85 % or 95 %) are for ResNet-18 / VGG on CIFAR and
    EMNIST started from a model pre-trained for hundreds of rounds; ours (100 samples, lr 0.05,
    50 epochs, threshold 0.85) plant the indicator in the small models here within 50 epochs.
    The authors' code plants from a configured start round on; here every round. BatchNorm
    statistics: the read-back uses the server's model copy's buffers (the authors' "replace
    original BN" option). OOD sources per task: ``fl_defense.data.OOD_SOURCES``.

    Parameters
    ----------
    indicator : Indicator
        The server's indicator task (plant and per-label accuracy); built by the server app from
        ``ood`` / ``ood_samples``, constructed by a direct Flower-strategy user.
    threshold : float
        Flag a client whose best-kept indicator label is classified at least this accurately.
    epochs, lr, mu : int, float, float
        Planting: epochs over the indicator samples, SGD learning rate, weight of the L2-distance
        regulariser.
    ood : str
        Where the server app draws the OOD samples from ("auto": ``OOD_SOURCES`` of the dataset).
    ood_samples : int
        How many OOD samples the server app draws.
    server_lr : float
        Server learning rate on the averaged update.
    """

    name = "backdoor_indicator"
    paper = "Li & Dai, USENIX Security 2024"
    detects = True
    server_provided = ("indicator",)
    needs_server_data = False  # its indicator samples come from another dataset (OOD_SOURCES)
    run_config = {
        "threshold": RunKey("BackdoorIndicator: flag a client whose best-kept indicator label is classified at least "
                            "this accurately (the authors: 0.85)", check=lambda v: 0 < v <= 1),
        "epochs": RunKey("BackdoorIndicator: epochs of indicator planting per round", check=lambda v: v >= 1),
        "lr": RunKey("BackdoorIndicator: SGD learning rate of indicator planting", check=lambda v: v > 0),
        "mu": RunKey("BackdoorIndicator: weight of the L2-distance regulariser (mu / 2) ||w - G|| in planting "
                     "(the authors: 0.1)", check=lambda v: v >= 0),
        "ood": RunKey("BackdoorIndicator: out-of-distribution source of the indicator samples (auto: mnist for "
                      "fashion_mnist, fashion_mnist for mnist and usps, mnist for cifar10, cifar10 for cifar100, "
                      "noise for digits)", choices=OOD_CHOICES),
        "ood_samples": RunKey("BackdoorIndicator: number of indicator (OOD) samples", check=lambda v: v >= 1),
    }

    def __init__(self, indicator: Indicator | None = None, threshold: float = 0.85, epochs: int = 50,
                 lr: float = 0.05, mu: float = 0.1, ood: str = "auto", ood_samples: int = 100,
                 server_lr: float = 1.0) -> None:
        self.indicator = indicator
        self.threshold = threshold
        self.epochs = epochs
        self.lr = lr
        self.mu = mu
        self.ood = ood
        self.ood_samples = ood_samples
        self.server_lr = server_lr
        self._planted_vir: float | None = None

    @classmethod
    def server_parts(cls, ctx: ServerContext) -> dict:
        """The indicator task: a private model copy and ``ood_samples`` OOD samples from ``ood``
        (auto: the source paired with the dataset, ``OOD_SOURCES``), labels seeded by the run."""
        from ..server_tasks import IndicatorTask

        kw = ctx.kwargs
        source = OOD_SOURCES[ctx.cfg.dataset] if kw["ood"] == "auto" else kw["ood"]
        samples = load_ood(source, ctx.spec.shape, kw["ood_samples"], ctx.data_dir, ctx.seed)
        return {"indicator": IndicatorTask(ctx.model(), samples, ctx.spec.num_classes, seed=ctx.seed)}

    def validate(self) -> None:
        if self.indicator is None or not all(callable(getattr(self.indicator, m, None))
                                             for m in ("plant", "label_accuracy")):
            raise ValueError("indicator must provide plant(global_params, epochs, lr, mu) and label_accuracy(params) "
                             "(fl_defense.server_tasks.IndicatorTask over the server's OOD samples)")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.epochs < 1 or not self.lr > 0 or self.mu < 0 or self.ood_samples < 1:
            raise ValueError(f"epochs >= 1, lr > 0, mu >= 0 and ood_samples >= 1 needed, got epochs={self.epochs}, "
                             f"lr={self.lr}, mu={self.mu}, ood_samples={self.ood_samples}")
        if self.ood not in OOD_CHOICES:
            raise ValueError(f"ood must be one of {OOD_CHOICES}, got {self.ood!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def broadcast(self, global_params: torch.Tensor) -> torch.Tensor:
        planted = self.indicator.plant(global_params, self.epochs, self.lr, self.mu)
        self._planted_vir = float(self.indicator.label_accuracy(planted).max())
        return planted.to(global_params.device, global_params.dtype)

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        vir = torch.empty(ru.n, dtype=torch.float64)
        label = torch.empty(ru.n, dtype=torch.long)
        for k in range(ru.n):
            acc = self.indicator.label_accuracy(global_params + ru.updates[k])
            vir[k], label[k] = acc.max(), acc.argmax()
        flagged = vir >= self.threshold
        info = {"vir": vir, "vir_label": label, "planted_vir": self._planted_vir}
        kept = (~flagged).to(torch.float64) * ru.sample_weights.cpu().to(torch.float64)
        if kept.sum() <= 0:
            return DefenseResult(params=global_params.clone(), weights=torch.zeros(ru.n), flagged=flagged, info=info)
        w = kept / kept.sum()
        step = w.to(ru.device, ru.updates.dtype) @ ru.updates
        return DefenseResult(params=global_params + self.server_lr * step, weights=w, flagged=flagged, info=info)

    # Planting is seeded per call; its count travels with checkpoints (one integer) so a resumed
    # run plants exactly as the uninterrupted one would.
    def state_dict(self) -> dict:
        calls = getattr(self.indicator, "calls", None)
        return {} if calls is None else {"indicator-calls": calls}

    def load_state_dict(self, state: dict) -> None:
        if "indicator-calls" in state and hasattr(self.indicator, "calls"):
            self.indicator.calls = state["indicator-calls"]
