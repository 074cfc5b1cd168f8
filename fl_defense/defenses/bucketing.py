"""Bucketing (Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022): a pre-aggregation step in front of any other defense."""

from __future__ import annotations

from dataclasses import replace

import math

import torch

from ..updates import RoundUpdates
from .base import Defense, DefenseResult
from .sampling import SeededGenerator


def bucket_means(x: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """The mean row of every group, by row additions (one pass over the rows; a (n/s) x n
    mixing product would cost n/s times more)."""
    out = torch.empty((len(groups), x.shape[1]), dtype=x.dtype, device=x.device)
    for b, members in enumerate(groups):
        row = out[b]
        row.copy_(x[members[0]])
        for k in members[1:]:
            row.add_(x[k])
        row.mul_(1.0 / len(members))
    return out


class Bucketing(SeededGenerator, Defense):
    """Bucketing, Karimireddy et al., ICLR 2022 (Algorithm 1): the n updates are shuffled by a
    random permutation pi, cut into ceil(n / s) buckets of ``bucket_size`` s consecutive ones
    (the last may be smaller), and each bucket's mean y_i = (1/|B_i|) sum_{k in B_i} x_pi(k) is
    handed to the ``inner`` defense in place of the clients. Averaging s heterogeneous benign
    updates shrinks their spread, so the inner rule (Krum, median, ...) stops mistaking
    heterogeneity for attack; at most f of the buckets hold an attacker.

    The permutation is drawn from a generator seeded with ``seed`` and checkpointed. A bucket
    reports the members' total sample count, their mean Fisher (if any) and the id
    "id1+id2+...": an inner defense that keeps per-client state across rounds would key it by
    buckets, which change every round, so wrap stateless rules. Back out of the inner rule,
    each client gets its bucket's weight divided by the bucket's size (exact for every rule
    that returns a weighted mean of its inputs) and its bucket's flag.
    """

    paper = "Karimireddy et al., ICLR 2022"

    def __init__(self, inner: Defense, bucket_size: int = 2, seed: int = 0) -> None:
        self.inner = inner
        self.bucket_size = bucket_size
        self.seed = seed
        self.detects = inner.detects
        self.needs_fisher = inner.needs_fisher

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.inner.name}+bucketing"

    def validate(self) -> None:
        self.inner.validate()
        if not isinstance(self.bucket_size, int) or self.bucket_size < 1:
            raise ValueError(f"bucket_size must be an integer >= 1, got {self.bucket_size!r}")

    def check_num_clients(self, n: int) -> None:
        self.inner.check_num_clients(math.ceil(n / self.bucket_size))

    def buckets(self, n: int) -> list[list[int]]:
        """This round's buckets of row indices (advances the generator)."""
        perm = self._rng().permutation(n).tolist()
        return [perm[i:i + self.bucket_size] for i in range(0, n, self.bucket_size)]

    def aggregate(self, global_params: torch.Tensor, round_updates: RoundUpdates) -> DefenseResult:
        ru = round_updates
        groups = self.buckets(ru.n)
        mix = torch.zeros((len(groups), ru.n), dtype=ru.updates.dtype, device=ru.device)
        member_of = torch.empty(ru.n, dtype=torch.long)
        for b, members in enumerate(groups):
            mix[b, members] = 1.0 / len(members)
            member_of[members] = b
        bucketed = replace(  # the layout, extras and any later field carry over
            ru,
            updates=bucket_means(ru.updates, groups),
            num_examples=torch.stack([ru.num_examples[m].sum() for m in groups]),
            client_ids=["+".join(ru.client_ids[k] for k in m) for m in groups],
            fisher=None if ru.fisher is None else bucket_means(ru.fisher, groups),
        )
        res = self.inner.aggregate(global_params, bucketed)
        # a rule that picks one row (Krum) picked a bucket's mean, no client's own model (and its
        # index is a bucket's, not a client's): the new model is res.params
        res.selected = None
        idx = member_of.to(res.weights.device)
        sizes = torch.tensor([len(m) for m in groups], dtype=res.weights.dtype, device=res.weights.device)
        res.weights = res.weights[idx] / sizes[idx]
        res.flagged = res.flagged[idx.to(res.flagged.device)]
        res.info = {**res.info, "buckets": [[ru.client_ids[k] for k in m] for m in groups]}
        return res

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        super().load_state_dict({k: v for k, v in state.items() if k != "inner"})

    def get_params(self) -> dict:
        return {"inner": self.inner, "bucket_size": self.bucket_size, "seed": self.seed}
