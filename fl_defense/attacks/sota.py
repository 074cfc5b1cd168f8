"""State-of-the-art backdoors: what an attack that shapes its own poison (and training) implements.

The data attacks of ``poisoning.py`` stamp a fixed trigger. The backdoors here need more from the
client: the current global model (A3FL and IBA optimise their trigger against it), a tail of data
the client does not hold (the edge-case backdoor), their own local training (Chameleon's
contrastive stages), and state across rounds (the trigger kept in the node's Flower state). Each
is a run-config choice of ``attack`` (``SOTA_BACKDOORS`` in ``fl_defense.attacks``) and a class with

- ``check(cfg)``: (key, message) of a bad configuration, or None (start-up validation);
- ``composes_with``: the one-attacker ``model-poisoning`` choices it runs together with (the
  rule is ``check_model_poisoning``, below, checked at start-up beside ``check``);
- ``poison(model, images, labels, seed, state)``: the attacker's training set for this round,
  with the global model loaded in ``model``: (images, labels, indices of the poisoned samples);
- ``train(model, images, labels, poisoned, trainer, seed, terms)``: its local training (default:
  the client's ordinary SGD, ``trainer``), carrying the model poisoning's ``terms`` into every
  stage;
- ``report()``: bytes the attacker hands the evaluation layer (a learned trigger; simulation only,
  stripped before any defense runs), and ``probe(cfg, shape, payload)``: what the central
  evaluation measures attack success with (``payload``: the latest report, None before any).

How model poisoning composes with a backdoor (docs/attacks.md has the table): what acts on
training (``model_poisoning.TrainingTerms``: PGD's projection, Neurotoxin's mask, the evasion
term, the Fisher penalty) reaches every stage of the backdoor's training, and what acts on the
trained update (boosting, PGD's final scaling or model replacement, evasion's norm matching)
follows it; the colluding attacks that craft from the attackers' poisoned updates
(``uses_poisoned``) take the backdoor's. The rest would send an update the backdoor never reaches
(Gaussian noise, an untargeted colluding attack crafted from honest updates) or reverse it (sign
flipping), and are refused at start-up.

Nothing here reads who else is malicious. Scaling: the papers optimise triggers for hundreds of
steps on GPUs; here every per-round budget is a run-config key whose default fits 2 CPU cores
(each module's docstring says by how much it is scaled).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .model_poisoning import TrainingTerms

# One-attacker model poisoning every backdoor here runs together with (``SotaBackdoor.composes_with``)
COMPOSES_WITH = frozenset({"none", "boost", "pgd", "neurotoxin", "evasion", "fisher_penalty"})
# Why the other one-attacker choices do not: what the attacker would send (the start-up error says it)
WONT_COMPOSE = {
    "signflip": "sends minus the trained update, which unlearns the backdoor it trained",
    "gaussian": "sends Gaussian noise in place of the trained update, so the backdoor never reaches it",
}

# Simulation only: the learned trigger an attacker reports for the central evaluation; the
# server's probe step (server_app/backdoor_probe.py) removes it before the defense sees the round.
PROBE_KEY = "fl-defense.backdoor-probe"


class SotaBackdoor:
    """Base class: subclasses set ``name``, ``paper`` and ``run_config`` (their run-config keys:
    name -> ``RunKey`` with its default, key ``<name>-<name in run_config>`` unless it says
    otherwise; read as ``cfg.<key with underscores>``) and override what differs from a plain
    data attack."""

    name: str = "backdoor"
    paper: str = ""
    run_config: dict = {}
    learned_probe: bool = False  # the probe follows what attackers report each round
    # the probe measures images of its own (the edge case's held-out tail), not the test images
    # that the recorded floor (clean_target_rate) counts: that floor is not its attack success's
    own_probe_images: bool = False
    # one-attacker model poisoning it composes with (a backdoor whose own stage cannot carry a
    # TrainingTerms hook narrows it); colluding attacks compose when they use the poisoned update
    composes_with: frozenset[str] = COMPOSES_WITH

    def __init__(self, cfg, shape: tuple[int, int, int], num_classes: int, partition_id: int = 0) -> None:
        self.cfg = cfg
        self.shape = shape
        self.num_classes = num_classes
        self.partition_id = partition_id

    @classmethod
    def check(cls, cfg) -> tuple[str, str] | None:
        return None

    @classmethod
    def check_model_poisoning(cls, cfg) -> tuple[str, str] | None:
        """("model-poisoning", why) when ``cfg.model_poisoning`` cannot run together with this
        backdoor, else None: the one rule of how the two compose (the module docstring)."""
        from . import COLLUDING_ATTACKS, MODEL_ATTACKS

        mode = cfg.model_poisoning
        colluding = COLLUDING_ATTACKS.get(mode)
        if (colluding.uses_poisoned if colluding is not None else mode in cls.composes_with):
            return None
        why = ("crafts its update from the attackers' honest updates alone, so the backdoor is never trained"
               if colluding is not None else WONT_COMPOSE.get(mode, f"{cls.name}'s training cannot carry it"))
        accepted = [m for m in MODEL_ATTACKS if m in cls.composes_with
                    or (m in COLLUDING_ATTACKS and COLLUDING_ATTACKS[m].uses_poisoned)]
        return "model-poisoning", (f"{mode} with attack={cls.name}: it {why}; with attack={cls.name} use one of "
                                   f"{', '.join(accepted)}")

    def poison(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
               state=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def train(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor,
              trainer, seed: int, terms: TrainingTerms = TrainingTerms()) -> float:
        """Local training on the poisoned set; ``trainer(images, labels, seed, before_step=None,
        after_step=None, epochs=None) -> loss`` is the client's own SGD (its epochs, batch size,
        learning rate), which applies the model poisoning's ``terms`` and then the stage's own
        hooks. A stage trained with the backdoor's own loop must apply ``terms`` itself (its
        hooks, penalty and learning-rate factor), or the backdoor narrows ``composes_with``."""
        return trainer(images, labels, seed)

    def report(self) -> bytes | None:
        return None

    @classmethod
    def probe(cls, cfg, shape: tuple[int, int, int], payload: bytes | None = None):
        raise NotImplementedError


class PatternTrigger:
    """A trigger stamped as x * (1 - mask) + pattern * mask (``pattern`` C x H x W in [0, 1],
    ``mask`` H x W): A3FL's patch, and Chameleon's fixed triggers in the same form."""

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        self.mask = mask.to(torch.float32)
        self.pattern = pattern.to(torch.float32)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(images)
        return images * (1 - m) + self.pattern.to(images) * m


def relabelled(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, trigger, target: int):
    """Copies of ``images``/``labels`` with the trigger applied to rows ``idx`` relabelled ``target``."""
    images, labels = images.clone(), labels.clone()
    if len(idx):
        with torch.no_grad():
            images[idx] = trigger.apply(images[idx])
        labels[idx] = target
    return images, labels


def choose_eligible(labels: torch.Tensor, rate: float, target: int, base: int, seed: int) -> torch.Tensor:
    """``poisoning.choose``: floor(rate * #eligible) seeded eligible indices."""
    from .poisoning import choose

    return choose(labels, rate, target, base, seed)


def save_state(state, key: str, values: dict[str, torch.Tensor]) -> None:
    """Keep tensors in the node's persistent Flower state (a RecordDict; None: nowhere)."""
    if state is None:
        return
    from flwr.app import Array, ArrayRecord

    state[key] = ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32))
                              for k, v in values.items()})


def load_state(state, key: str) -> dict[str, torch.Tensor] | None:
    if state is None or key not in state.array_records:
        return None
    rec = state.array_records[key]
    return {k: torch.as_tensor(rec[k].numpy().copy()) for k in rec.keys()}


def encode_tensor(x: torch.Tensor) -> bytes:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32).tobytes()


def decode_tensor(payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    arr = np.frombuffer(payload, dtype=np.float32)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"backdoor probe: {arr.size} values, expected {int(np.prod(shape))}")
    return torch.as_tensor(arr.copy()).reshape(shape)


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier: the model's last ``nn.Linear`` (every model in ``fl_defense.models`` ends in one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier")
    return linears[-1]


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The representation entering the classifier (the encoder's output) and the logits."""
    head, seen = last_linear(model), {}
    hook = head.register_forward_hook(lambda mod, inp, out: seen.__setitem__("z", inp[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return seen["z"], logits


__all__ = ["COMPOSES_WITH", "PROBE_KEY", "WONT_COMPOSE", "PatternTrigger", "SotaBackdoor", "choose_eligible",
           "decode_tensor", "encode_tensor", "features_and_logits", "last_linear", "load_state", "relabelled", "save_state"]
