"""Client sampling that does not depend on the order nodes registered in.

Flower's ``SimpleClientManager.sample`` draws ``random.sample(list(self.clients), k)``, and its
clients arrive in the order of a set of node ids (``flwr.server.compat.app_utils``), so the same
random state samples different clients in two runs. ``SortedClientManager`` keeps its clients in
node-id order, so Flower's own draw takes them in that order. The simulation registers node i under a fixed id in partition
order (``simulation.engine.patch_node_ids``), so two runs with the same seed sample the same
partitions in the same rounds, whatever their defense or attack; with a SuperLink's random ids
the order is still fixed by the ids.
"""

from __future__ import annotations

from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


def _node_order(cid: str):
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


class SortedClientManager(SimpleClientManager):
    """Flower's SimpleClientManager whose clients are kept in node-id order, so its own ``sample``
    (``random.sample`` over ``list(self.clients)``) draws from that order."""

    def register(self, client: ClientProxy) -> bool:
        if not super().register(client):
            return False
        # a new dict swapped in whole: a sample running meanwhile reads the old one intact
        self.clients = dict(sorted(self.clients.items(), key=lambda item: _node_order(item[0])))
        return True


__all__ = ["SortedClientManager"]
