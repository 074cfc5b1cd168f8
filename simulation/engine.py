"""Flower's simulation engine without its per-node polling cost.

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``)
asks its link state for a message every 0.1 s for every node of the federation, and each such
``get_message_ins`` call scans and re-validates every stored message under the state's lock. With
100 simulated clients that is about 1,000 scans a second for the run's whole duration: a busy
thread whose CPU grows with the population, not with the clients sampled (measured by
``benchmarks/protocol_round.py``). ``patch_message_polling`` replaces that loop by one that first
reads which nodes have an undelivered message (one pass over the stored messages) and asks the
state only for those, in the same node order and through the same ``get_message_ins`` call, so
what reaches the clients, and when, is unchanged. A link state without the in-memory layout
(another Flower version) keeps Flower's own loop.

``patch_node_ids`` gives the simulated nodes fixed ids in partition order (Flower draws random
ones each run). With the server sampling from its clients in node-id order
(``server_app.sampling.SortedClientManager``), two runs with the same seed sample the same
partitions in the same rounds, whatever their defense or attack: the leaderboard's cells of one
seed are paired.
"""

from __future__ import annotations

import os
import threading
from queue import Queue


def pending_nodes(state) -> set[int] | None:
    """Destination nodes of the state's undelivered messages; None when the state does not keep
    them in an in-memory ``message_ins_store`` (then every node must be asked)."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        return {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Flower's loop (put every node's next undelivered message in the queue, every 0.1 s), asking
    only the nodes that have one."""
    while not f_stop.is_set():
        pending = pending_nodes(state)
        for node_id in nodes_mapping.keys():
            if pending is not None and node_id not in pending:
                continue
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def patch_message_polling() -> bool:
    """Install ``add_messages_to_queue`` in Flower's simulation engine (idempotent); False when this
    Flower has no such loop to replace, or when the environment asks for Flower's own
    (``FL_DEFENSE_FLOWER_POLLING=flower``: benchmarks/protocol_round.py compares the two)."""
    if os.environ.get("FL_DEFENSE_FLOWER_POLLING") == "flower":
        return False
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    if not hasattr(vce_api, "add_messages_to_queue"):
        return False
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


# The first simulated node's id; node i (partition i) gets FIRST_NODE_ID + i. Far from Flower's
# reserved ids (0 and the SuperLink's 1).
FIRST_NODE_ID = 1 << 32


def patch_node_ids() -> bool:
    """Register the simulation's nodes under ids FIRST_NODE_ID + partition id instead of random
    ones (idempotent); False when this Flower has no such registration to wrap."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate import in_memory_linkstate
    except ImportError:
        return False
    original = getattr(vce_api, "_register_nodes", None)
    if original is None or not hasattr(in_memory_linkstate, "generate_rand_int_from_bytes"):
        return False
    if getattr(original, "fl_defense_fixed_ids", False):
        return True

    def register_nodes(num_nodes, state_factory):
        random_ids = in_memory_linkstate.generate_rand_int_from_bytes
        ids = iter(range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes))
        in_memory_linkstate.generate_rand_int_from_bytes = lambda num_bytes, exclude=None: next(ids)
        try:
            return original(num_nodes, state_factory)
        finally:
            in_memory_linkstate.generate_rand_int_from_bytes = random_ids

    register_nodes.fl_defense_fixed_ids = True
    vce_api._register_nodes = register_nodes
    return True


__all__ = ["FIRST_NODE_ID", "add_messages_to_queue", "patch_message_polling", "patch_node_ids", "pending_nodes"]
