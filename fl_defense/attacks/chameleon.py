"""Chameleon (Dai & Li, "Chameleon: Adapting to Peer Images for Planting Durable Backdoors in
Federated Learning", ICML 2023, sec. 4).

A backdoor fades when benign clients' updates on "peer images" undo it: the poisoned images'
original-class peers (obstructers) pull their representation back, while target-class peers
(facilitators) would hold it in place. Chameleon trains the attacker's model in two stages so the
backdoor leans on the facilitators:

1. contrastive encoder training (supervised contrastive loss, temperature tau, on the encoder's
   normalised representations z): each poisoned image (trigger stamped, label target) is an anchor
   whose positives are the target-class images and the other poisoned images, and whose negatives
   are all other images, its original-class images (obstructers) weighted ``chameleon-push``
   times in the denominator, which pushes it from them harder;

       L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} w_ia exp(z_i.z_a / tau) )

   (w_ia = ``chameleon-push`` when i is poisoned and a is of i's original class and clean, else 1);
   benign anchors follow SupCon (positives: their class);
2. classifier fine-tuning: the encoder frozen, the last linear layer trained with cross-entropy
   on the same poisoned set.

Model poisoning acts in both stages (``model_poisoning.TrainingTerms``): PGD projects the whole
model after every step of either, Neurotoxin masks the gradients of either, and the evasion term
or the Fisher penalty is added to either stage's loss (alpha L_con + (1 - alpha) L_ano in stage 1,
alpha L_class + (1 - alpha) L_ano in stage 2), so each constrains the encoder stage 1 moves as
well as the classifier.

The trigger is a fixed stamp (``chameleon-trigger``). Scaled for 2 CPU cores: the paper trains
the encoder with a projection head for several local epochs per stage on ResNet-18; here the
representation entering the model's classifier is used directly (no projection head) for
``chameleon-encoder-epochs`` and ``chameleon-classifier-epochs`` epochs (default: ``local-epochs``
each, so each stage has the plain attacker's budget), temperature 0.1 (SupCon's scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..run_keys import RunKey, non_negative, positive
from .model_poisoning import TrainingTerms
from .sota import SotaBackdoor, choose_eligible, features_and_logits, last_linear, relabelled
from .triggers import make_trigger

CHAMELEON_TRIGGERS = ("plus", "square", "pixel", "corner", "blend")


def chameleon_loss(z: torch.Tensor, labels: torch.Tensor, original: torch.Tensor, poisoned: torch.Tensor,
                   temperature: float, push: float) -> torch.Tensor:
    """The stage-1 contrastive loss above over one batch: ``z`` representations (normalised here),
    ``labels`` as trained (poisoned rows: the target), ``original`` their true labels, ``poisoned``
    a bool row mask. Anchors without a positive in the batch are skipped."""
    z = F.normalize(z.reshape(len(z), -1), dim=1)
    n = len(z)
    logits = z @ z.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    weight = torch.ones((n, n), device=z.device)
    obstructer = poisoned[:, None] & ~poisoned[None, :] & (original[:, None] == original[None, :])
    weight[obstructer] = push
    logits = logits - logits.detach().max(dim=1, keepdim=True).values  # stability; cancels in the ratio
    denom = (weight * torch.exp(logits)).masked_fill(eye, 0).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(denom)
    count = positive.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return z.sum() * 0
    return -((log_prob * positive).sum(dim=1)[has] / count[has]).mean()


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in last_linear(model).parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]


def contrastive_stage(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, original: torch.Tensor,
                      poisoned: torch.Tensor, *, epochs: int, batch_size: int, lr: float, momentum: float,
                      temperature: float, push: float, seed: int, terms: TrainingTerms = TrainingTerms()) -> float:
    """Stage 1: SGD on the encoder's parameters only (the classifier is untouched), with the model
    poisoning's ``terms`` as in any training: their penalty added to the contrastive loss, their
    learning-rate factor, their hooks around each step. Returns the last epoch's mean loss
    (contrastive loss plus penalty)."""
    params = encoder_parameters(model)
    opt = torch.optim.SGD(params, lr=lr * terms.lr_scale, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = 0.0
    for _ in range(epochs):
        order, total = torch.randperm(len(images), generator=gen), 0.0
        for s in range(0, len(images), batch_size):
            idx = order[s:s + batch_size]
            if len(idx) < 2:
                continue
            z, _ = features_and_logits(model, images[idx])
            loss = chameleon_loss(z, labels[idx], original[idx], poisoned[idx], temperature, push)
            if terms.penalty is not None:
                loss = loss + terms.penalty(model)
            model.zero_grad(set_to_none=True)  # a penalty reaches the classifier too; it is not stepped here
            loss.backward()
            if terms.before_step is not None:
                terms.before_step(model)
            opt.step()
            if terms.after_step is not None:
                terms.after_step(model)
            total += float(loss.detach()) * len(idx)
        last = total / max(1, len(images))
    return last


class Chameleon(SotaBackdoor):
    """Dai & Li (ICML 2023): contrastive encoder training that ties poisoned images to the target
    class's representations, then classifier fine-tuning with the encoder frozen."""

    name = "chameleon"
    paper = "Dai & Li, ICML 2023"
    run_config = {
        "trigger": RunKey("attack=chameleon: the stamped trigger", choices=CHAMELEON_TRIGGERS, default="plus"),
        "encoder_epochs": RunKey("attack=chameleon: epochs of contrastive encoder training (stage 1; 0: "
                                 "local-epochs)", check=non_negative, default=0),
        "classifier_epochs": RunKey("attack=chameleon: epochs of classifier fine-tuning, encoder frozen (stage 2; "
                                    "0: local-epochs)", check=non_negative, default=0),
        "temperature": RunKey("attack=chameleon: contrastive temperature tau (SupCon's scale)", check=positive,
                              default=0.1),
        "push": RunKey("attack=chameleon: weight of a poisoned image's original-class peers in the contrastive "
                       "denominator (1: plain SupCon)", check=positive, default=2.0),
    }

    def poison(self, model, images, labels, seed, state=None):
        c = self.cfg
        self.original = labels
        trigger = make_trigger(c.chameleon_trigger, self.shape, seed=c.seed, blend_ratio=c.blend_ratio)
        idx = choose_eligible(labels, c.poison_rate, c.target_label, c.base_label, seed)
        x, y = relabelled(images, labels, idx, trigger, c.target_label)
        return x, y, idx

    def train(self, model, images, labels, poisoned, trainer, seed, terms=TrainingTerms()):
        c = self.cfg
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[poisoned] = True
        original = getattr(self, "original", labels)
        contrastive_stage(model, images, labels, original, mask, epochs=c.chameleon_encoder_epochs or c.local_epochs,
                          batch_size=c.batch_size, lr=c.learning_rate, momentum=c.momentum,
                          temperature=c.chameleon_temperature, push=c.chameleon_push, seed=seed, terms=terms)
        encoder = encoder_parameters(model)

        def freeze(m):  # stage 2: only the classifier learns
            for p in encoder:
                p.grad = None

        return trainer(images, labels, seed, before_step=freeze, epochs=c.chameleon_classifier_epochs or c.local_epochs)

    @classmethod
    def probe(cls, cfg, shape, payload=None):
        return make_trigger(cfg.chameleon_trigger, shape, seed=cfg.seed, blend_ratio=cfg.blend_ratio)


__all__ = ["CHAMELEON_TRIGGERS", "Chameleon", "chameleon_loss", "contrastive_stage", "encoder_parameters"]
