"""Client sampling that does not depend on the order nodes registered in, nor on who else draws
from Python's ``random`` module.

Flower's ``SimpleClientManager.sample`` draws ``random.sample(list(self.clients), k)``: its clients
arrive in the order of a set of node ids (``flwr.server.compat.app_utils``), and the module's random
state is shared with everything else in the process. In the simulation that includes Ray's driver,
which draws from it on the main thread (``ray/_private/worker.py``, some 56 draws a run) while the
ServerApp's thread seeds and samples, so one seed sampled different clients in two runs (seen in
CI: round 1 drew partitions 0, 5, 8 in one run and 4, 5, 9 in the next).

``SortedClientManager`` samples its clients, taken in node-id order, with its own
``random.Random`` (``rng``), which nothing else draws from; the checkpoint keeps its state. The
simulation registers node i under a fixed id in partition order (``simulation.engine.patch_node_ids``),
so two runs with the same seed sample the same partitions in the same rounds, whatever their
defense or attack. With a SuperLink's random ids the order is still fixed by the ids.
"""

from __future__ import annotations

import random
from logging import INFO

from flwr.common import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


def _node_order(cid: str):
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


class SortedClientManager(SimpleClientManager):
    """Flower's SimpleClientManager sampling with its own ``rng`` (Flower's draw, ``rng.sample``)
    over its clients taken in node-id order.

    ``expected``: the number of nodes in the federation; ``num_available`` (which sizes a round's
    sample) waits until that many registered, so a round sized before the last nodes arrived does
    not draw a smaller sample than the same round of another run.
    """

    def __init__(self, rng: random.Random | None = None, expected: int = 0) -> None:
        super().__init__()
        self.rng = rng if rng is not None else random.Random()
        self.expected = expected

    def num_available(self) -> int:
        if self.expected:
            self.wait_for(self.expected)  # as Flower's sample waits for its min_num_clients
        return super().num_available()

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        available = [cid for cid in sorted(self.clients, key=_node_order)
                     if criterion is None or criterion.select(self.clients[cid])]
        if num_clients > len(available):
            log(INFO, "Sampling failed: number of available clients (%s) is less than number of "
                "requested clients (%s).", len(available), num_clients)
            return []
        return [self.clients[cid] for cid in self.rng.sample(available, num_clients)]


__all__ = ["SortedClientManager"]
