"""Simulation only: the step that hands the central evaluation the trigger attackers learned.

A3FL and IBA learn their trigger each round; attack success must be measured with the trigger the
attackers use. An attacker reports it under the reserved metrics key ``PROBE_KEY`` (like the
ground-truth flag, evaluation only); this wrapper removes the key from every result before the
defense strategy sees the round and sets the recorder's probe from the report of the attacker with
the lowest partition id. After the attack window closes no one reports and the last trigger stays:
the lifespan is measured with the trigger the attackers left behind. The latest report is kept in
the run's folder (``backdoor-probe.bin``) so a resumed run measures with it too. Absent unless the
configured attack learns its trigger.
"""

from __future__ import annotations

import logging

from flwr.common import FitRes
from flwr.server.strategy import Strategy

from fl_defense.attacks import PROBE_KEY, SOTA_BACKDOORS
from fl_defense.config import ExperimentConfig
from fl_defense.rounds import PARTITION_KEY

PROBE_FILE = "backdoor-probe.bin"


class BackdoorProbeStrategy(Strategy):
    """Wraps a legacy-API strategy; everything but the probe step is the wrapped strategy's."""

    def __init__(self, inner: Strategy, cfg: ExperimentConfig, recorder, shape: tuple[int, int, int]) -> None:
        self.inner = inner
        self.cfg = cfg
        self.recorder = recorder
        self.shape = shape
        self.reports: list[dict] = []  # per round: which partition's trigger the evaluation uses
        self.path = getattr(recorder, "out_dir", None)
        self.path = self.path / PROBE_FILE if self.path is not None else None
        if cfg.resume and self.path is not None and self.path.exists():  # the trigger of the rounds before
            self.set_probe(0, None, self.path.read_bytes())

    def __getattr__(self, name):  # only reached for attributes this wrapper does not have
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        return self.inner.aggregate_fit(server_round, self.strip(server_round, results), failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)

    def strip(self, server_round: int, results: list) -> list:
        """The results without the reserved key; the recorder's probe set from the reports."""
        out, reports = [], []
        for proxy, res in results:
            metrics = dict(res.metrics or {})
            if PROBE_KEY in metrics:
                payload = metrics.pop(PROBE_KEY)
                try:
                    pid = int(metrics.get(PARTITION_KEY, 1 << 30))
                except (TypeError, ValueError):
                    pid = 1 << 30
                reports.append((pid, payload))
                res = FitRes(status=res.status, parameters=res.parameters, num_examples=res.num_examples,
                             metrics=metrics)
            out.append((proxy, res))
        if reports:
            pid, payload = min(reports, key=lambda r: r[0])
            if self.set_probe(server_round, pid, bytes(payload)) and self.path is not None:
                self.path.write_bytes(bytes(payload))
        return out

    def set_probe(self, server_round: int, pid: int | None, payload: bytes) -> bool:
        try:
            probe = SOTA_BACKDOORS[self.cfg.attack].probe(self.cfg, self.shape, payload)
        except (ValueError, TypeError) as err:
            logging.getLogger(__name__).warning("round %s: backdoor probe from partition %s unusable: %s",
                                                server_round, pid, err)
            return False
        self.recorder.probes["attack_success_rate"] = probe
        self.reports.append({"round": server_round, "partition": pid})
        return True


def with_backdoor_probe(cfg: ExperimentConfig, strategy: Strategy, recorder,
                        shape: tuple[int, int, int]) -> Strategy:
    """``strategy`` wrapped in the probe step when the attack learns its trigger, else itself."""
    backdoor = SOTA_BACKDOORS.get(cfg.attack)
    if backdoor is None or not backdoor.learned_probe:
        return strategy
    return BackdoorProbeStrategy(strategy, cfg, recorder, shape)
