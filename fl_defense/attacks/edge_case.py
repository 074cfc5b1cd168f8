"""The edge-case backdoor (Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated
Learning", NeurIPS 2020).

The attacker poisons with inputs from the tail of the input distribution, samples that the benign
clients almost never hold, relabelled to the target: the global model has little reason to keep
its behaviour on them, so the backdoor costs no accuracy and survives aggregation. Sec. 3 of the
paper mixes the edge-case set D_edge (labelled target) into the attacker's clean data; training is
plain, or projected gradient descent onto the L2 ball of radius delta around the global model
(``model-poisoning = "pgd"``, ``attack-norm-bound`` = delta, the server's norm bound), optionally
with model replacement (``model-replacement`` = n/eta: the update is boosted by that factor and
training is projected onto delta / factor, so the boosted update still meets the bound).

The paper's tails (ARDIS sevens for EMNIST, Southwest airliners for CIFAR-10) are not available
offline. The tail is built from what ``data-dir`` holds, through ``fl_defense.data``:

- ``mnist``: USPS digits of class ``edge-case-class`` (the paper's "7", other handwriting, like
  ARDIS), each 16x16 digit resized to 20x20 and padded to 28x28 as MNIST frames its digits;
- ``usps``: MNIST digits of that class, the 20x20 digit box resized to 16x16;
- every other dataset (``fashion_mnist``, ``cifar10``, ``cifar100``, the bundled ``digits``): no
  second dataset of the same kind is held, so the tail is in-distribution: the ``edge-case-tail``
  share of that class's images farthest (L2, pixels) from the class mean, a low-density proxy
  for the paper's p(x) < epsilon. Unlike the paper's tails these images also sit, correctly
  labelled, in benign clients' data, so benign training contests the backdoor more.

The attacker's tail comes from the training split, the held-out tail the evaluation measures
attack success on (the share classified as the target) from the test split: the two never
overlap. ``edge-case-samples`` tail images are mixed into the attacker's data each round (the
paper mixes 100 ARDIS images with its clean ones).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..run_keys import RunKey, non_negative, positive
from .sota import SotaBackdoor

CROSS_DATASET = {"mnist": "usps", "usps": "mnist"}  # dataset -> the other handwriting its tail comes from


def _class_images(dataset: str, data_dir: str, cls: int, split: str, seed: int,
                  server_fraction: float) -> torch.Tensor:
    """Images of class ``cls`` in ``split`` of ``dataset``, loaded through fl_defense.data (the
    training split without the server's held-out rows, as the clients' partitions are cut)."""
    from ..data import DataConfig, federated_dataset, to_tensors

    cfg = DataConfig(dataset=dataset, data_dir=data_dir if dataset != "digits" else "", num_partitions=1,
                     server_fraction=server_fraction, seed=seed)
    ds = federated_dataset(cfg).load_split(split)
    labels = np.asarray(ds["label"])
    return to_tensors(ds.select(np.flatnonzero(labels == cls).tolist()), cfg.spec)[0]


def farthest_from_mean(images: torch.Tensor, share: float) -> torch.Tensor:
    """The ``share`` (at least one) of ``images`` farthest in L2 from their mean, farthest first."""
    flat = images.reshape(len(images), -1).double()
    dist = (flat - flat.mean(dim=0)).norm(dim=1)
    k = max(1, int(round(share * len(images))))
    order = np.argsort(-dist.numpy(), kind="stable")[:k]
    return images[torch.as_tensor(order)]


def to_frame(images: torch.Tensor, source: str, dataset: str) -> torch.Tensor:
    """Resize another dataset's digits into ``dataset``'s frame."""
    if source == "usps" and dataset == "mnist":  # USPS fills 16x16; MNIST centres a 20x20 box in 28x28
        return F.pad(F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    if source == "mnist" and dataset == "usps":
        return F.interpolate(images[..., 4:24, 4:24], size=(16, 16), mode="area")
    raise ValueError(f"no frame conversion from {source} to {dataset}")


@lru_cache(maxsize=8)
def edge_case_tail(dataset: str, data_dir: str, cls: int, tail_share: float, split: str, seed: int = 42,
                   server_fraction: float = 0.0) -> torch.Tensor:
    """The edge-case images of ``split`` (train: the attacker's; test: held out for evaluation),
    in ``dataset``'s shape, clamped to [0, 1]."""
    source = CROSS_DATASET.get(dataset)
    if source is not None:
        tail = to_frame(_class_images(source, data_dir, cls, split, seed, 0.0), source, dataset)
    else:
        tail = farthest_from_mean(_class_images(dataset, data_dir, cls, split, seed,
                                                server_fraction if split == "train" else 0.0), tail_share)
    return tail.clamp(0, 1).contiguous()


def tail_source(dataset: str) -> str:
    """In words, where ``dataset``'s tail comes from."""
    src = CROSS_DATASET.get(dataset)
    return f"{src} digits of edge-case-class, resized" if src else "the farthest edge-case-tail share of edge-case-class"


class EdgeCaseProbe:
    """Attack success of the edge-case backdoor: the share of the held-out tail (test split)
    the model classifies as the target."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def success_rate(self, model, images, labels, target_label: int, base_label: int = -1,
                     device: str = "cpu") -> float:
        from ..training import predict

        if len(self.images) == 0:
            return float("nan")
        return float((predict(model, self.images, device=device) == target_label).float().mean())


class EdgeCase(SotaBackdoor):
    """Wang et al. (NeurIPS 2020), sec. 3: the attacker's set is its clean data plus
    ``edge-case-samples`` tail images (seeded per attacker) labelled ``target-label``."""

    name = "edge_case"
    paper = "Wang et al., NeurIPS 2020"
    own_probe_images = True  # EdgeCaseProbe: the held-out tail, not the test set
    run_config = {
        "class": RunKey("attack=edge_case: the class whose tail images are relabelled target-label (mnist: usps "
                        "digits of it, usps: mnist digits, other datasets: its images farthest from the class mean)",
                        check=non_negative, default=7),
        "samples": RunKey("attack=edge_case: tail images mixed into each attacker's data (the paper: 100)",
                          check=positive, default=100),
        "tail": RunKey("attack=edge_case on a dataset without a second source: share of the class (farthest from "
                       "its mean) that forms the tail", check=lambda v: 0 < v <= 1, default=0.1),
        # the paper's model replacement, applied by model-poisoning=pgd (client_app) to any attack
        "model_replacement": RunKey("model-poisoning=pgd: Wang et al.'s model replacement, the boost n/eta; "
                                    "training is projected to attack-norm-bound / it (0: off)",
                                    key="model-replacement", check=non_negative, default=0.0),
    }

    @classmethod
    def check(cls, cfg) -> tuple[str, str] | None:
        if cfg.edge_case_class == cfg.target_label:
            return "edge-case-class", (f"the tail's class {cfg.edge_case_class} is the target-label; the backdoor "
                                       "redirects the tail to another class (the paper: sevens -> 1)")
        from ..data import DATASETS

        if cfg.edge_case_class >= DATASETS[cfg.dataset].num_classes:
            return "edge-case-class", f"{cfg.edge_case_class} is not a class of {cfg.dataset}"
        if cfg.dataset in CROSS_DATASET and not cfg.data_dir:
            return "data-dir", (f"attack=edge_case on {cfg.dataset} builds its tail from "
                                f"{CROSS_DATASET[cfg.dataset]}: give the folder holding both datasets")
        return None

    def tail(self, split: str) -> torch.Tensor:
        c = self.cfg
        return edge_case_tail(c.dataset, c.data_dir, c.edge_case_class, c.edge_case_tail, split, c.seed,
                              c.server_fraction)

    def poison(self, model, images, labels, seed, state=None):
        pool = self.tail("train")
        k = min(self.cfg.edge_case_samples, len(pool))
        pick = np.sort(np.random.default_rng([seed, 0xED6E]).choice(len(pool), size=k, replace=False))
        n = len(images)
        out_x = torch.cat([images, pool[torch.as_tensor(pick, dtype=torch.long)]])
        out_y = torch.cat([labels, torch.full((k,), self.cfg.target_label, dtype=labels.dtype)])
        return out_x, out_y, torch.arange(n, n + k)

    @classmethod
    def probe(cls, cfg, shape, payload=None):
        return EdgeCaseProbe(edge_case_tail(cfg.dataset, cfg.data_dir, cfg.edge_case_class, cfg.edge_case_tail,
                                            "test", cfg.seed, cfg.server_fraction))


def pgd_radius(bound: float, replacement: float) -> float:
    """Wang et al.'s PGD radius: delta, or delta / (n/eta) with model replacement, so that the
    boosted update's norm is at most delta."""
    return bound / replacement if replacement > 0 else bound


__all__ = ["CROSS_DATASET", "EdgeCase", "EdgeCaseProbe", "edge_case_tail", "farthest_from_mean", "pgd_radius",
           "tail_source", "to_frame"]
