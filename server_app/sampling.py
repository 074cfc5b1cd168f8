"""Client sampling that does not depend on the order nodes registered in.

Flower's ``SimpleClientManager.sample`` draws ``random.sample(list(self.clients), k)``, and its
clients arrive in the order of a set of node ids (``flwr.server.compat.app_utils``), so the same
random state samples different clients in two runs. ``SortedClientManager`` draws the same way
from the clients in node-id order. The simulation registers node i under a fixed id in partition
order (``simulation.engine.patch_node_ids``), so two runs with the same seed sample the same
partitions in the same rounds, whatever their defense or attack; with a SuperLink's random ids
the order is still fixed by the ids.
"""

from __future__ import annotations

import random
from logging import INFO

from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


def _node_order(cid: str):
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


class SortedClientManager(SimpleClientManager):
    """Flower's SimpleClientManager, sampling from its clients in node-id order."""

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        if min_num_clients is None:
            min_num_clients = num_clients
        self.wait_for(min_num_clients)
        available = sorted(self.clients, key=_node_order)
        if criterion is not None:
            available = [cid for cid in available if criterion.select(self.clients[cid])]
        if num_clients > len(available):
            log(INFO, "Sampling failed: number of available clients (%s) is less than number of requested "
                "clients (%s).", len(available), num_clients)
            return []
        return [self.clients[cid] for cid in random.sample(available, num_clients)]


__all__ = ["SortedClientManager"]
