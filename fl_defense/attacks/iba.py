"""IBA (Nguyen et al., "IBA: Towards Irreversible Backdoor Attacks in Federated Learning", NeurIPS
2023, sec. 3).

Chosen among IBA, CerP and 3DFed because it brings what no other attack here has: a learned,
input-specific, imperceptible trigger (a generator), where A3FL optimises one patch and CerP and
3DFed are model-side (CerP: trigger and update constrained jointly; 3DFed: feedback-driven
indicators and decoy models), whose model-side parts this project already covers with PGD,
Neurotoxin and the colluding attacks. IBA's own model-side step (projected training near the
global model) is ``model-poisoning = "pgd"`` here.

The trigger generator G maps each input to its own perturbation, bounded in the L-infinity norm
by epsilon: T(x) = clip(x + epsilon * tanh(G(x)), 0, 1). Every round the attacker (1) trains G
against the global model it received (the classifier fixed) to minimise L(f(T(x)), target), so the
trigger exploits what the global model already does, and (2) trains its model on the poisoned
set (``poison-rate`` of the eligible samples through T, relabelled). G persists across rounds in
the node's Flower state.

Scaled for 2 CPU cores: the paper's generator is a U-Net-style autoencoder trained for several
epochs per round on a GPU; here a three-layer convolutional generator (8 channels) trained for
``iba-steps`` Adam steps of one batch each (default 20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..run_keys import RunKey, positive
from .poisoning import eligible
from .sota import SotaBackdoor, choose_eligible, decode_tensor, encode_tensor, load_state, relabelled, save_state


class TriggerGenerator(nn.Module):
    """G: a small convolutional encoder-decoder, input-shaped output."""

    def __init__(self, channels: int, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GeneratedTrigger:
    """T(x) = clip(x + epsilon * tanh(G(x)), 0, 1): a different perturbation for every input, each
    at most epsilon per pixel."""

    def __init__(self, generator: TriggerGenerator, epsilon: float) -> None:
        self.generator = generator
        self.epsilon = epsilon

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        gen = self.generator.to(images.device)
        return (images + self.epsilon * torch.tanh(gen(images))).clamp(0, 1)


def make_generator(shape: tuple[int, int, int], seed: int) -> TriggerGenerator:
    """The seeded initial generator every attacker starts from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 0x1BA)
        return TriggerGenerator(shape[0])


def train_generator(model: nn.Module, trigger: GeneratedTrigger, x: torch.Tensor, target: int, *, steps: int,
                    lr: float, batch_size: int, seed: int) -> list[float]:
    """Step (1): Adam on G's parameters, the classifier fixed, minimising the cross-entropy of the
    triggered inputs against the target. Returns the classifier's mean target-class probability on
    the first 512 of ``x`` triggered, before each step and after the last."""
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(trigger.generator.parameters(), lr=lr)
    target_y = torch.full((min(batch_size, len(x)),), target, dtype=torch.long)

    def prob() -> float:
        with torch.no_grad():
            return float(F.softmax(model(trigger.apply(x[:512])), dim=1)[:, target].mean())

    history = [prob()]
    try:
        for _ in range(steps):
            idx = torch.randint(len(x), (len(target_y),), generator=gen)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(trigger.apply(x[idx])), target_y).backward()
            opt.step()
            history.append(prob())
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return history


class IBA(SotaBackdoor):
    """Nguyen et al. (NeurIPS 2023): a trigger generator trained against the global model each
    round, then poisoned training with its input-specific triggers."""

    name = "iba"
    paper = "Nguyen et al., NeurIPS 2023"
    run_config = {
        "epsilon": RunKey("attack=iba: L-infinity bound of the generated trigger", check=lambda v: 0 < v <= 1,
                          default=0.2),
        "steps": RunKey("attack=iba: Adam steps of the trigger generator per round", check=positive, default=20),
        "lr": RunKey("attack=iba: the generator's learning rate", check=positive, default=0.01),
    }
    learned_probe = True
    STATE_KEY = "fl-defense.iba-generator"

    def generator(self, state=None) -> TriggerGenerator:
        g = make_generator(self.shape, self.cfg.seed)
        kept = load_state(state, self.STATE_KEY)
        if kept is not None:
            vector_to_parameters(kept["theta"].clone(), g.parameters())
        return g

    def poison(self, model, images, labels, seed, state=None):
        c = self.cfg
        self.trigger = GeneratedTrigger(self.generator(state), c.iba_epsilon)
        keep = eligible(labels, c.target_label, c.base_label)
        self.history = train_generator(model, self.trigger, images[keep], c.target_label, steps=c.iba_steps,
                                       lr=c.iba_lr, batch_size=c.batch_size, seed=seed)
        self.trigger.generator.requires_grad_(False)
        save_state(state, self.STATE_KEY, {"theta": parameters_to_vector(self.trigger.generator.parameters())})
        idx = choose_eligible(labels, c.poison_rate, c.target_label, c.base_label, seed)
        x, y = relabelled(images, labels, idx, self.trigger, c.target_label)
        return x, y, idx

    def report(self) -> bytes | None:
        return encode_tensor(parameters_to_vector(self.trigger.generator.parameters()))

    @classmethod
    def probe(cls, cfg, shape, payload=None):
        g = make_generator(shape, cfg.seed)
        if payload is not None:
            size = sum(p.numel() for p in g.parameters())
            vector_to_parameters(decode_tensor(payload, (size,)), g.parameters())
        g.requires_grad_(False)
        return GeneratedTrigger(g.eval(), cfg.iba_epsilon)


__all__ = ["IBA", "GeneratedTrigger", "TriggerGenerator", "make_generator", "train_generator"]
