"""ClientApp: local SGD on the client's partition; attackers poison their data and/or update.

Who attacks in a round is a seeded schedule (``malicious-fraction`` of the partitions, a fixed or
fresh pool, from ``attack-start-round`` every ``attack-every`` rounds). The client reports, for
evaluation only, whether it attacked under the reserved metrics key ``fl-defense.malicious``; the
server's adapter strips it before any defense runs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fl_defense.attacks import (COLLUDING_ATTACKS, AttackSchedule, TrainingTerms, boost, gaussian_update, neurotoxin_mask,
                                poison_data, project_to_ball, scale_to_bound, sign_flip)
from fl_defense.attacks.adaptive import (ADAPTIVE_LOCAL_ATTACKS, HonestShadow, adaptive_report, adaptive_terms,
                                         mimic_fisher, noise_fisher)
from fl_defense.attacks.collusion import HONEST_UPDATE_KEY, encode_update
from fl_defense.attacks import PROBE_KEY, SOTA_BACKDOORS
from fl_defense.attacks.edge_case import pgd_radius
from fl_defense.client import SDFCCalibration, instructions
from fl_defense.config import ExperimentConfig
from fl_defense.data import load_partition
from fl_defense.fisher import empirical_fisher, encode_fisher
from fl_defense.metrics import accuracy
from fl_defense.models import build_model, get_arrays, set_arrays, trainable_mask
from fl_defense.rounds import FISHER_KEY, FISHER_REQUEST_KEY, GROUND_TRUTH_KEY, PARTITION_KEY
from fl_defense.training import train


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def attack_schedule(cfg: ExperimentConfig, num_partitions: int) -> AttackSchedule:
    fraction = cfg.malicious_fraction if (cfg.attack != "none" or cfg.model_poisoning != "none") else 0.0
    return AttackSchedule(num_partitions, fraction, cfg.seed, cfg.attacker_pool, cfg.attack_start_round,
                          cfg.attack_every, cfg.attack_stop_round)


class DefenseClient(NumPyClient):
    """Trains locally; when the schedule says so, attacks as configured."""

    def __init__(self, cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                 state: RecordDict | None = None) -> None:
        self.cfg = cfg
        self.state = state  # the node's persistent Flower state (SDFC's previous local model)
        self.calibration: SDFCCalibration | None = None
        self.partition_id = partition_id
        data_cfg = cfg.data_config(num_partitions)
        self.shape = data_cfg.spec.shape
        self.num_classes = data_cfg.spec.num_classes
        self.model = build_model(cfg.model_name, self.shape, data_cfg.spec.num_classes, seed=cfg.seed)
        self.device = cfg.device if cfg.device == "cpu" or torch.cuda.is_available() else "cpu"
        self.images, self.labels = load_partition(data_cfg, partition_id)
        self.schedule = attack_schedule(cfg, num_partitions)
        self.epochs = cfg.local_epochs  # this round's own training (fit sets it: attackers may train longer)

    def get_parameters(self, config):
        return get_arrays(self.model)

    def _train(self, images, labels, seed, terms: TrainingTerms = TrainingTerms()) -> float:
        """Local training with the model poisoning's ``terms`` (and SDFC's client-side calibration,
        when on, as for any client) in every stage: a state-of-the-art backdoor trains in its own
        way (attacks.sota), the client's SGD its ``trainer``."""
        calibration = self.calibration.penalty if self.calibration is not None and self.calibration.active else None
        terms = terms.plus_penalty(calibration)
        if getattr(self, "backdoor", None) is not None:
            def trainer(x, y, s, before_step=None, after_step=None, epochs=None):  # the stage's hooks after the terms'
                return self._sgd(x, y, s, terms.around(before_step, after_step), epochs)

            return self.backdoor.train(self.model, images, labels, self.poisoned, trainer, seed, terms)
        return self._sgd(images, labels, seed, terms)

    def _sgd(self, images, labels, seed, terms: TrainingTerms = TrainingTerms(), epochs=None) -> float:
        torch.manual_seed(seed)  # dropout masks
        loss = train(self.model, images, labels, epochs or self.epochs, self.cfg.batch_size,
                     self.cfg.learning_rate * terms.lr_scale, self.cfg.momentum, self.device, seed,
                     before_step=terms.before_step, after_step=terms.after_step, penalty=terms.penalty)
        self.model.to("cpu")
        return loss

    def fit(self, parameters, config):
        cfg = self.cfg
        set_arrays(self.model, parameters)  # copies: the global arrays are never aliased
        self.calibration = SDFCCalibration(instructions(config), self.state, self.model)
        server_round = int(config.get("server-round", 0))
        seed = _seed(cfg.seed, self.partition_id, server_round)
        rank = self.schedule.rank(self.partition_id, server_round)
        # an attacker's own training may run longer (attacker-local-epochs); every honest model, its shadows' too, local-epochs
        self.epochs = (cfg.attacker_local_epochs or cfg.local_epochs) if rank is not None else cfg.local_epochs
        # A colluding attacker trains honestly and reports that update under a reserved key; the
        # server's simulation-only collusion step crafts what it sends (fl_defense.attacks.collusion).
        colluding = COLLUDING_ATTACKS.get(cfg.model_poisoning) if rank is not None else None
        # what it would have sent honestly, trained on first use (fl_defense.attacks.adaptive)
        self.shadow = HonestShadow(self.model, self.images, self.labels, cfg, seed, self.device) if rank is not None and (
            cfg.model_poisoning in ADAPTIVE_LOCAL_ATTACKS or cfg.fisher_forgery == "mimic") else None
        images, labels, poisoned = self.images, self.labels, torch.empty(0, dtype=torch.long)
        self.backdoor = (SOTA_BACKDOORS[cfg.attack](cfg, self.shape, self.num_classes, self.partition_id)
                         if rank is not None and cfg.attack in SOTA_BACKDOORS
                         and (colluding is None or colluding.uses_poisoned) else None)
        if self.backdoor is not None:  # poison shaped against the global model just loaded (attacks.sota)
            images, labels, poisoned = self.backdoor.poison(self.model, self.images, self.labels,
                                                            _seed(cfg.seed, self.partition_id), self.state)
        elif rank is not None and (colluding is None or colluding.uses_poisoned):
            images, labels, poisoned = poison_data(
                self.images, self.labels, cfg.attack, self.shape, poison_rate=cfg.poison_rate,
                target_label=cfg.target_label, base_label=cfg.base_label, seed=_seed(cfg.seed, self.partition_id),
                rank=rank, dba_pieces=cfg.dba_pieces, dba_trigger=cfg.dba_trigger, blend_ratio=cfg.blend_ratio,
                trigger_file=cfg.trigger_file, trigger_seed=cfg.seed, num_classes=self.num_classes)
        self.poisoned = poisoned
        loss = self._fit_model(parameters, images, labels, seed, rank is not None and colluding is None)
        if "sdfc" in (cfg.defense, cfg.rlr_aggregator) and cfg.sdfc_calibration_mode == "client":
            self.calibration.remember(self.model, self.state)  # theta_prev of this node's next round
        metrics = {PARTITION_KEY: self.partition_id, "train-loss": loss, "num-poisoned": len(poisoned),
                   GROUND_TRUTH_KEY: int(rank is not None)}
        if self.backdoor is not None and self.backdoor.report() is not None:  # its learned trigger, for evaluation only
            metrics[PROBE_KEY] = self.backdoor.report()
        if colluding is not None:
            honest = self._honest_update(parameters, seed) if colluding.uses_poisoned else self._update(parameters)
            metrics[HONEST_UPDATE_KEY] = encode_update(honest)
        if config.get(FISHER_REQUEST_KEY):
            fx, fy = images, labels
            forgery = cfg.fisher_forgery if rank is not None else "none"
            if forgery in ("clean", "mimic"):  # report a benign-looking Fisher
                clean = torch.ones(len(self.labels), dtype=torch.bool)
                clean[poisoned[poisoned < len(clean)]] = False  # edge-case tail images are appended
                fx, fy = self.images[clean], self.labels[clean]
            if forgery == "noise":
                dim = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                fisher = noise_fisher(dim, _seed(cfg.seed, self.partition_id, server_round, 0xF15))
            else:
                fisher = empirical_fisher(self.model, fx, fy, max_samples=cfg.fisher_samples)
            if forgery == "mimic":
                fisher = mimic_fisher(fisher, self.shadow.fisher)
            metrics[FISHER_KEY] = encode_fisher(fisher, half=cfg.fisher_half)
        return get_arrays(self.model), len(self.images), metrics

    def _fit_model(self, parameters, images, labels, seed: int, attacking: bool) -> float:
        """Train, applying the configured model poisoning when ``attacking``: what it adds to
        training (``TrainingTerms``) reaches every stage of it, a backdoor's own included, and
        what it does to the trained update follows (attacks.sota says how the two compose)."""
        cfg, params = self.cfg, [p for p in self.model.parameters() if p.requires_grad]
        global_vec = parameters_to_vector(params).detach().clone()
        mode = cfg.model_poisoning if attacking else "none"
        terms = TrainingTerms()
        if mode == "pgd":
            def project(model):  # reshape, not view: training may hold the weights channels-last
                with torch.no_grad():
                    vector_to_parameters(project_to_ball(global_vec, torch.cat([p.detach().reshape(-1) for p in params]),
                                                         pgd_radius(cfg.attack_norm_bound, cfg.model_replacement)).clone(), params)
            terms = TrainingTerms(after_step=project)
        if mode == "neurotoxin":
            allowed = neurotoxin_mask(self._benign_update(parameters, seed), cfg.neurotoxin_ratio)

            def mask(model):
                offset = 0
                for p in params:
                    n = p.numel()
                    if p.grad is not None:
                        p.grad.mul_(allowed[offset:offset + n].view_as(p).to(p.grad))
                    offset += n
            terms = TrainingTerms(before_step=mask)
        if mode in ADAPTIVE_LOCAL_ATTACKS:  # a term in the loss of every stage, then its last step
            terms = adaptive_terms(mode, params, global_vec, cfg, self.shadow)
        loss = self._train(images, labels, seed, terms)
        trained = parameters_to_vector(params).detach().clone()
        reported = {
            "none": lambda: trained, "pgd": lambda: (boost(global_vec, trained, cfg.model_replacement) if cfg.model_replacement > 0
                           else scale_to_bound(global_vec, trained, cfg.attack_norm_bound)),
            "neurotoxin": lambda: trained, "boost": lambda: boost(global_vec, trained, cfg.boost_factor),
            "signflip": lambda: sign_flip(global_vec, trained, cfg.boost_factor),
            "gaussian": lambda: gaussian_update(global_vec, cfg.gaussian_std, seed),
            **{m: (lambda: adaptive_report(mode, global_vec, trained, cfg, self.shadow)) for m in ADAPTIVE_LOCAL_ATTACKS},
        }[mode]()
        with torch.no_grad():
            vector_to_parameters(reported.clone(), params)
        return loss

    def _update(self, parameters, model: torch.nn.Module | None = None) -> np.ndarray:
        """The trained model's trainable arrays minus ``parameters``', flat in state_dict order (the
        server's layout of the updates)."""
        model = model or self.model
        mask = trainable_mask(model)
        trained = [a for a, t in zip(get_arrays(model), mask) if t]
        start = [np.asarray(a) for a, t in zip(parameters, mask) if t]
        return np.concatenate([(a.astype(np.float32) - b.astype(np.float32)).reshape(-1)
                               for a, b in zip(trained, start)])

    def _honest_update(self, parameters, seed: int) -> np.ndarray:
        """The update of an honest round on the clean data (same epochs and seed), trained beside
        the model the attacker sends."""
        shadow = copy.deepcopy(self.model)
        set_arrays(shadow, parameters)
        torch.manual_seed(seed)
        train(shadow, self.images, self.labels, self.cfg.local_epochs, self.cfg.batch_size, self.cfg.learning_rate,
              self.cfg.momentum, self.device, seed)
        shadow.to("cpu")
        return self._update(parameters, shadow)

    def _benign_update(self, parameters, seed: int) -> torch.Tensor:
        """What an honest round on the clean data would change: Neurotoxin's proxy for the
        coordinates benign clients keep rewriting."""
        shadow = copy.deepcopy(self.model)
        set_arrays(shadow, parameters)
        start = parameters_to_vector([p for p in shadow.parameters() if p.requires_grad]).detach().clone()
        train(shadow, self.images, self.labels, 1, self.cfg.batch_size, self.cfg.learning_rate, self.cfg.momentum,
              "cpu", seed)
        return parameters_to_vector([p for p in shadow.parameters() if p.requires_grad]).detach() - start

    def evaluate(self, parameters, config):
        set_arrays(self.model, parameters)
        acc = accuracy(self.model, self.images, self.labels)
        return 1.0 - acc, len(self.images), {"accuracy": acc}


def client_fn(context: Context):
    return build_client(dict(context.run_config), context.node_config, context.state)


def build_client(run_config: dict, node_config: dict, state: RecordDict | None = None):
    """The client for one node: ``node_config`` names its partition (``partition-id``, ``num-partitions``);
    ``state`` is the node's persistent Flower state."""
    cfg = ExperimentConfig.from_run_config(run_config)
    partition_id = int(node_config["partition-id"])
    num_partitions = int(node_config["num-partitions"])
    return DefenseClient(cfg, partition_id, num_partitions, state).to_client()


app = ClientApp(client_fn=client_fn)
