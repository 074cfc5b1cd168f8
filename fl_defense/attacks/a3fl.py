"""A3FL (Zhang et al., "A3FL: Adversarially Adaptive Backdoor Attacks to Federated Learning",
NeurIPS 2023, Alg. 1).

The trigger delta is a pattern over a fixed mask m (a square patch near the top-left corner),
stamped as x' = x (1 - m) + delta m. Every round an attacker re-optimises it against the global
model theta_t it has just received, and against an adversarially unlearned copy theta'_t of it:

    theta'_t = argmin_theta E[ L(x + delta, y; theta) ]                 (the copy un-learns the trigger:
                                                                          triggered inputs, true labels)
    delta   <- delta - alpha * sign grad_delta E[ L(x + delta, y~; theta_t)
                                                 + lambda L(x + delta, y~; theta'_t) ]   (y~: the target)
    lambda   = lambda_0 * sim(theta'_t, theta_t)                        (cosine of the parameter vectors)

so the trigger works on the model the server will hold and on one a defense has pushed away from
the backdoor, which is what makes it last once the attackers leave. The copy is refreshed every
``a3fl-adv-every`` trigger steps. Then local training on the poisoned set (``poison-rate`` of the
eligible samples stamped and relabelled), as in the paper.

The trigger persists across rounds in the node's Flower state (each attacker refines its own,
all starting from the same seeded pattern). Scaled for 2 CPU cores: the paper runs 100 trigger
epochs over the attacker's data with unlearning epochs on a GPU; here ``a3fl-steps`` sign steps on
one batch each (default 20) with ``a3fl-adv-steps`` SGD steps of unlearning (default 10) every
``a3fl-adv-every`` (default 10) steps.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from ..run_keys import RunKey, non_negative, positive
from .sota import (PatternTrigger, SotaBackdoor, choose_eligible, decode_tensor, encode_tensor, load_state,
                   relabelled, save_state)
from .poisoning import eligible

PROBE_SAMPLES = 512


def a3fl_mask(height: int, width: int, size: int) -> torch.Tensor:
    """A ``size`` x ``size`` patch (at 28x28; scaled by H/28, at least 2) two pixels from the top-left."""
    s = max(2, round(size * height / 28))
    o = max(0, round(2 * height / 28))
    mask = torch.zeros((height, width))
    mask[o:o + s, o:o + s] = 1.0
    return mask


def initial_pattern(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """The seeded starting pattern every attacker shares (uniform in [0, 1])."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed + 0xA3F1))


def target_probability(model: nn.Module, x: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return float(F.softmax(model(x), dim=1)[:, target].mean())


def unlearned_copy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: PatternTrigger, steps: int,
                   lr: float, batch_size: int, gen: torch.Generator) -> nn.Module:
    """theta'_t: a copy of the global model trained for ``steps`` SGD steps to classify triggered
    inputs as their true labels (the defender's unlearning, simulated)."""
    adv = copy.deepcopy(model).train()
    opt = torch.optim.SGD(adv.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(adv(trigger.apply(x[idx])), y[idx]).backward()
        opt.step()
    return adv.eval()


def optimise_trigger(model: nn.Module, mask: torch.Tensor, pattern: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, target: int, *, steps: int, lr: float, adv_steps: int, adv_every: int,
                     lam: float, batch_size: int, unlearn_lr: float, seed: int) -> tuple[torch.Tensor, list[float]]:
    """A3FL's trigger optimisation (Alg. 1) on samples ``x`` (true labels ``y``, none of the target).
    Returns the new pattern and the global model's mean target-class probability on the first
    ``PROBE_SAMPLES`` of ``x`` triggered, before each step and after the last."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    pattern = pattern.clone().clamp(0, 1)
    g_vec = parameters_to_vector(model.parameters()).detach()
    target_y = torch.full((min(batch_size, len(x)),), target, dtype=torch.long)
    watch = x[:PROBE_SAMPLES]  # a fixed subset: the record costs little next to the steps
    history = [target_probability(model, PatternTrigger(mask, pattern).apply(watch), target)]
    adv, weight = None, 0.0
    for step in range(steps):
        if adv_steps > 0 and lam > 0 and step % adv_every == 0:
            adv = unlearned_copy(model, x, y, PatternTrigger(mask, pattern), adv_steps, unlearn_lr, batch_size, gen)
            sim = F.cosine_similarity(parameters_to_vector(adv.parameters()).detach(), g_vec, dim=0)
            weight = lam * float(sim)
        idx = torch.randint(len(x), (len(target_y),), generator=gen)
        delta = pattern.clone().requires_grad_(True)
        xt = PatternTrigger(mask, delta).apply(x[idx])
        loss = F.cross_entropy(model(xt), target_y)
        if adv is not None:
            loss = loss + weight * F.cross_entropy(adv(xt), target_y)
        grad, = torch.autograd.grad(loss, delta)
        pattern = (pattern - lr * grad.sign() * mask).clamp(0, 1)
        history.append(target_probability(model, PatternTrigger(mask, pattern).apply(watch), target))
    model.train(was_training)
    return pattern, history


class A3FL(SotaBackdoor):
    """Zhang et al. (NeurIPS 2023): a trigger re-optimised each round against the global model and
    its adversarially unlearned copy, then poisoned training with it."""

    name = "a3fl"
    paper = "Zhang et al., NeurIPS 2023"
    run_config = {
        "trigger_size": RunKey("attack=a3fl: side of the trigger patch at 28x28 (scaled with the image)",
                               check=positive, default=5),
        "steps": RunKey("attack=a3fl: sign-gradient trigger steps per round (the paper: 100 epochs, scaled for 2 "
                        "cores)", check=positive, default=20),
        "lr": RunKey("attack=a3fl: trigger step size alpha", check=positive, default=0.05),
        "lambda": RunKey("attack=a3fl: lambda_0, weight of the unlearned copy's loss (times its cosine similarity "
                         "to the global model; 0: no copy)", check=non_negative, default=1.0),
        "adv_steps": RunKey("attack=a3fl: SGD steps that unlearn the trigger in the adversarial copy",
                            check=non_negative, default=10),
        "adv_every": RunKey("attack=a3fl: trigger steps between refreshes of the adversarial copy", check=positive,
                            default=10),
    }
    learned_probe = True
    STATE_KEY = "fl-defense.a3fl-trigger"

    @classmethod
    def check(cls, cfg) -> tuple[str, str] | None:
        from ..data import DATASETS

        h = DATASETS[cfg.dataset].shape[1]
        if max(2, round(cfg.a3fl_trigger_size * h / 28)) + max(0, round(2 * h / 28)) > h:
            return "a3fl-trigger-size", f"a {cfg.a3fl_trigger_size}-pixel patch (at 28x28) does not fit {h}x{h} images"
        return None

    @property
    def mask(self) -> torch.Tensor:
        return a3fl_mask(self.shape[1], self.shape[2], self.cfg.a3fl_trigger_size)

    def poison(self, model, images, labels, seed, state=None):
        c = self.cfg
        kept = load_state(state, self.STATE_KEY)
        pattern = kept["pattern"] if kept else initial_pattern(self.shape, c.seed)
        keep = eligible(labels, c.target_label, c.base_label)
        pattern, self.history = optimise_trigger(
            model, self.mask, pattern, images[keep], labels[keep], c.target_label, steps=c.a3fl_steps, lr=c.a3fl_lr,
            adv_steps=c.a3fl_adv_steps, adv_every=c.a3fl_adv_every, lam=c.a3fl_lambda, batch_size=c.batch_size,
            unlearn_lr=c.learning_rate, seed=seed)
        save_state(state, self.STATE_KEY, {"pattern": pattern})
        self.trigger = PatternTrigger(self.mask, pattern)
        idx = choose_eligible(labels, c.poison_rate, c.target_label, c.base_label, seed)
        x, y = relabelled(images, labels, idx, self.trigger, c.target_label)
        return x, y, idx

    def report(self) -> bytes | None:
        return encode_tensor(self.trigger.pattern)

    @classmethod
    def probe(cls, cfg, shape, payload=None):
        pattern = initial_pattern(shape, cfg.seed) if payload is None else decode_tensor(payload, shape)
        return PatternTrigger(a3fl_mask(shape[1], shape[2], cfg.a3fl_trigger_size), pattern)


__all__ = ["A3FL", "a3fl_mask", "initial_pattern", "optimise_trigger", "unlearned_copy"]
