"""Adapter for Flower's legacy strategy API (``flwr.server.strategy``, ``aggregate_fit``)."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.common import FitIns, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as FlowerFedAvg

from .. import defenses
from ..checkpoint import save_checkpoint
from ..defenses.base import Defense
from ..rounds import FISHER_REQUEST_KEY, ClientResult, split_ground_truth
from ._common import DefenseAdapter, split_kwargs


class DefenseStrategy(DefenseAdapter, FlowerFedAvg):
    """A Flower ``FedAvg`` whose ``aggregate_fit`` runs a defense from ``fl_defense.defenses``.

    Accepts every argument of ``flwr.server.strategy.FedAvg``, the defense's own parameters (for
    the concrete subclasses), and: ``defense`` (an instance, for this generic class),
    ``trainable`` (mask of arrays that are trainable parameters; the rest are buffers),
    ``device`` ("cpu" or "cuda[:i]"), ``min_valid_clients`` and ``max_update_norm``.

    After each round ``self.records`` holds the per-client ``RoundRecord``s.
    """

    defense_class: type[Defense] | None = None

    def __init__(self, *, defense: Defense | None = None, checkpoint_path: str | None = None,
                 round_offset: int = 0, **kwargs) -> None:
        self.aggregation, fedavg_kwargs = split_kwargs(self.defense_class, defense, kwargs)
        super().__init__(**fedavg_kwargs)
        self._global: list[np.ndarray] | None = None
        # After a resume Flower counts rounds from 1 again; round_offset maps them to the run's.
        self.checkpoint_path = checkpoint_path
        self.round_offset = round_offset

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        params = super().initialize_parameters(client_manager)
        if params is not None:
            self._global = parameters_to_ndarrays(params)
        return params

    def evaluate(self, server_round: int, parameters: Parameters):
        # A resumed run evaluates its checkpoint as the checkpoint's round (the recorder skips rounds
        # it already has).
        return super().evaluate(server_round + self.round_offset, parameters)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        self._global = parameters_to_ndarrays(parameters)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self._check_sample_size(len(pairs))
        # Like the Message API, tell clients the round (seeds and attack schedules depend on it).
        extra = {"server-round": server_round}
        if self.defense.needs_fisher:
            extra[FISHER_REQUEST_KEY] = True
        for _, ins in pairs:
            ins.config = {**ins.config, **extra}
        return pairs

    def aggregate_fit(self, server_round: int, results, failures) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        if self._global is None:
            raise RuntimeError("aggregate_fit called before configure_fit: no global parameters known")
        client_results, ground_truth = [], {}
        for proxy, fit_res in results:
            metrics, gt = split_ground_truth(fit_res.metrics)
            if gt is not None:
                ground_truth[str(proxy.cid)] = gt
            try:
                arrays = parameters_to_ndarrays(fit_res.parameters)
            except Exception as err:  # a malformed payload is the client's fault, not the round's
                arrays = f"undecodable parameters ({err})"
            client_results.append(ClientResult(str(proxy.cid), arrays, fit_res.num_examples, metrics))
        if failures:
            log(WARNING, "round %d: %d clients failed: %s", server_round, len(failures),
                "; ".join(_failure_text(f) for f in failures[:5]))
        new_arrays, metrics = self.aggregation.aggregate(
            server_round, self._global, client_results, failures=len(failures), ground_truth=ground_truth)
        if new_arrays is not None:
            self._global = new_arrays
        # else: keep the model; hand Flower the current parameters back so it does not stall.
        if self.checkpoint_path:
            save_checkpoint(self.checkpoint_path, server_round, self._global, self.aggregation.state_dict())
        return ndarrays_to_parameters(self._global), metrics


def _failure_text(f) -> str:
    if isinstance(f, BaseException):
        return f"{type(f).__name__}: {f}"
    return f"client {getattr(f[0], 'cid', '?')}"


class FedAvg(DefenseStrategy):
    """FedAvg through the defense core (no defense); same result as Flower's FedAvg."""

    defense_class = defenses.FedAvg


class RLR(DefenseStrategy):
    """Robust learning rate (Ozdayi et al., AAAI 2021); see ``fl_defense.defenses.RLR``.

    ``RLR(theta=4, server_lr=1.0, aggregator="mean", clip_norm=0.0, noise=0.0, **fedavg_kwargs)``.
    """

    defense_class = defenses.RLR


class Fedward(DefenseStrategy):
    """Fedward (Chen et al., arXiv 2307.00356); see ``fl_defense.defenses.Fedward``."""

    defense_class = defenses.Fedward


class FDCR(DefenseStrategy):
    """FDCR (Huang et al., NeurIPS 2024); asks clients for Fisher; see ``fl_defense.defenses.FDCR``."""

    defense_class = defenses.FDCR


class SDFC(DefenseStrategy):
    """SDFC (Huang et al., ECCV 2024); asks clients for Fisher and needs ``validation_fisher``
    (``fl_defense.fisher.ValidationFisher(model, images, labels)``); see ``fl_defense.defenses.SDFC``."""

    defense_class = defenses.SDFC


class Krum(DefenseStrategy):
    """Krum / Multi-Krum (Blanchard et al. 2017): ``Krum(num_malicious=f, to_keep=m)``."""

    defense_class = defenses.Krum


class Bulyan(DefenseStrategy):
    """Bulyan (El Mhamdi et al. 2018) over Krum: ``Bulyan(num_malicious=f)``."""

    defense_class = defenses.Bulyan


class Median(DefenseStrategy):
    """Coordinate-wise median (Yin et al. 2018)."""

    defense_class = defenses.Median


class TrimmedMean(DefenseStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): ``TrimmedMean(beta=0.2)``."""

    defense_class = defenses.TrimmedMean


class NormClipping(DefenseStrategy):
    """Norm clipping with Gaussian noise (Sun et al. 2019)."""

    defense_class = defenses.NormClipping


class SignSGD(DefenseStrategy):
    """signSGD with majority vote (Bernstein et al. 2019)."""

    defense_class = defenses.SignSGD


class FoolsGold(DefenseStrategy):
    """FoolsGold (Fung et al. 2020); keeps per-client histories across rounds."""

    defense_class = defenses.FoolsGold


class FLAME(DefenseStrategy):
    """FLAME (Nguyen et al. 2022): HDBSCAN on cosine distances, median-norm clipping, noise."""

    defense_class = defenses.FLAME


class FLTrust(DefenseStrategy):
    """FLTrust (Cao et al. 2021); needs ``server_update`` (``fl_defense.training.ServerUpdate``)."""

    defense_class = defenses.FLTrust


STRATEGIES: dict[str, type[DefenseStrategy]] = {
    "fedavg": FedAvg, "rlr": RLR, "fedward": Fedward, "fdcr": FDCR, "sdfc": SDFC,
    "krum": Krum, "bulyan": Bulyan, "median": Median, "trimmed_mean": TrimmedMean,
    "norm_clipping": NormClipping, "signsgd": SignSGD, "foolsgold": FoolsGold, "flame": FLAME, "fltrust": FLTrust,
}
