"""Paired client sampling: the server samples from its clients in node-id order
(server_app/sampling.py) and the simulation registers node i under a fixed id in partition order
(simulation/engine.py), so two runs with one seed sample the same partitions in the same rounds,
whatever their defense or attack."""

import json
import random

import pytest
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from server_app.sampling import SortedClientManager


class Proxy(ClientProxy):
    def get_properties(self, *a, **k): ...
    def get_parameters(self, *a, **k): ...
    def fit(self, *a, **k): ...
    def evaluate(self, *a, **k): ...
    def reconnect(self, *a, **k): ...


def _manager(cls, cids, seed=11):
    manager = cls(random.Random(seed)) if cls is SortedClientManager else cls()
    for cid in cids:
        manager.register(Proxy(cid))
    return manager


def _draws(manager, rounds=5, k=4, seed=11):
    random.seed(seed)  # what Flower's manager draws from; ours has its own RNG, seeded alike
    return [[p.cid for p in manager.sample(k)] for _ in range(rounds)]


def test_the_draw_does_not_depend_on_the_order_clients_registered_in():
    cids = [str(10 + i) for i in range(30)]  # ids 10..39: numeric order differs from string order past 99
    shuffled = random.Random(3).sample(cids, len(cids))
    assert _draws(_manager(SortedClientManager, cids)) == _draws(_manager(SortedClientManager, shuffled))
    # Flower's own manager draws the same way over its registration order: on the sorted order, the same clients
    assert _draws(_manager(SimpleClientManager, cids)) == _draws(_manager(SortedClientManager, shuffled))
    assert _draws(_manager(SimpleClientManager, shuffled)) != _draws(_manager(SortedClientManager, shuffled))


def test_draws_from_the_random_module_meanwhile_do_not_change_the_sample():
    """Ray's driver draws from the random module while the ServerApp's thread samples."""
    cids = [str(i) for i in range(20)]

    def disturbed_draws(manager):
        random.seed(11)
        draws = []
        for _ in range(5):
            random.getrandbits(64)  # someone else's draw
            draws.append([p.cid for p in manager.sample(4)])
        return draws

    undisturbed = _draws(_manager(SortedClientManager, cids))
    assert disturbed_draws(_manager(SortedClientManager, cids)) == undisturbed
    # Flower's own manager, undisturbed, draws the same; disturbed, other clients: the flaw this fixes
    assert _draws(_manager(SimpleClientManager, cids)) == undisturbed
    assert disturbed_draws(_manager(SimpleClientManager, cids)) != undisturbed


def test_a_round_is_sized_once_every_expected_node_registered():
    import threading

    manager = SortedClientManager(random.Random(0), expected=4)
    for cid in "12":
        manager.register(Proxy(cid))
    late = threading.Timer(0.2, lambda: [manager.register(Proxy(cid)) for cid in "34"])
    late.start()
    assert manager.num_available() == 4  # waited for the two late nodes instead of answering 2
    late.join()
    assert SortedClientManager(random.Random(0)).num_available() == 0  # nothing expected: no wait


def test_the_checkpoint_keeps_the_sampling_rng(tmp_path):
    from fl_defense.checkpoint import load_checkpoint, save_checkpoint

    rng = random.Random(7)
    rng.random()
    save_checkpoint(tmp_path / "c.pkl", 3, [], {}, sampling_rng=rng)
    restored = random.Random()
    restored.setstate(load_checkpoint(tmp_path / "c.pkl", restore_rng=False)["client-sampling"])
    assert restored.random() == rng.random()
    save_checkpoint(tmp_path / "d.pkl", 3, [], {})
    assert load_checkpoint(tmp_path / "d.pkl", restore_rng=False)["client-sampling"] is None


def test_node_ids_sort_as_numbers_and_a_short_federation_samples_nothing():
    manager = _manager(SortedClientManager, ["9", "100", "20"], seed=0)
    assert {p.cid for p in manager.sample(3, min_num_clients=3)} == {"9", "20", "100"}
    assert manager.sample(4, min_num_clients=3) == []  # as Flower's: too few clients, no sample


def test_simulated_nodes_get_fixed_ids_in_partition_order(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate

    from simulation.engine import FIRST_NODE_ID, patch_node_ids

    monkeypatch.setattr(vce_api, "_register_nodes", vce_api._register_nodes)  # undone after the test
    assert patch_node_ids() and patch_node_ids()  # idempotent
    random_ids = in_memory_linkstate.generate_rand_int_from_bytes
    factory = vce_api.LinkStateFactory(vce_api.FLWR_IN_MEMORY_DB_NAME, vce_api.NoOpFederationManager(),
                                       vce_api.ObjectStoreFactory())
    mapping = vce_api._register_nodes(num_nodes=5, state_factory=factory)
    assert mapping == {FIRST_NODE_ID + i: i for i in range(5)}
    assert in_memory_linkstate.generate_rand_int_from_bytes is random_ids  # only during registration


@pytest.mark.slow
def test_two_defenses_with_one_seed_sample_the_same_partitions(tmp_path):
    import simulation.run as sr

    common = {"dataset": "digits", "num-server-rounds": 3, "local-epochs": 1, "fraction-fit": 0.3,
              "malicious-fraction": 0.3, "attack": "plus", "seed": 5, "results-dir": str(tmp_path)}

    def sampled(defense):
        folder = sr.run({**common, "defense": defense, "run-name": defense}, num_supernodes=10)
        rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
        return [(sorted(c["partition"] for c in r["clients"]), r["num_attackers_sampled"]) for r in rows[1:]]

    fedavg, median = sampled("fedavg"), sampled("median")
    assert fedavg == median
    assert len({tuple(p) for p, _ in fedavg}) > 1  # and the rounds differ from each other
