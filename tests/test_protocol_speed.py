"""The protocol round's free speed-ups keep the numbers: channels-last local training (same
parameters within float tolerance), partitions cached per process for a 100-client population,
and the simulation engine's message polling limited to nodes with a message (same messages)."""

import copy
import threading
from pathlib import Path
from queue import Queue
from types import SimpleNamespace

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from fl_defense.data import DataConfig, load_partition
from fl_defense.models import build_model
from fl_defense.training import train, uses_channels_last
from simulation import engine


def _data(n=256, shape=(1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name,shape", [("cnn_small", (1, 28, 28)), ("cifar_cnn", (3, 32, 32))])
def test_channels_last_training_gives_the_same_parameters(name, shape):
    x, y = _data(192, shape)
    model = build_model(name, shape, 10, seed=1)
    assert uses_channels_last(model, x, "cpu")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    loss_a = train(a, x, y, epochs=1, batch_size=64, lr=0.05, momentum=0.9, seed=3, channels_last=False)
    loss_b = train(b, x, y, epochs=1, batch_size=64, lr=0.05, momentum=0.9, seed=3, channels_last=True)
    va, vb = parameters_to_vector(a.parameters()), parameters_to_vector(b.parameters())  # needs contiguous
    assert not torch.equal(va, parameters_to_vector(model.parameters()))  # it trained
    torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-5)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert all(p.is_contiguous() for p in b.parameters())  # it leaves in the default format


def test_channels_last_keeps_parameter_identity_for_hooks():
    """Hooks (Neurotoxin's gradient mask, PGD's projection) hold the parameters: they must stay the
    model's parameters through the format change."""
    x, y = _data(64)
    model = build_model("cnn_small", (1, 28, 28), 10, seed=1)
    params = list(model.parameters())
    seen = []
    train(model, x, y, 1, 32, 0.1, before_step=lambda m: seen.append(all(p is q for p, q in zip(m.parameters(), params))))
    assert seen == [True, True] and all(p is q for p, q in zip(model.parameters(), params))


def test_channels_last_is_left_alone_where_it_does_not_pay():
    x, y = _data(16, (1, 8, 8))
    assert not uses_channels_last(build_model("mlp", (1, 8, 8), 10, seed=1), x, "cpu")
    assert not uses_channels_last(build_model("cnn_small", (1, 28, 28), 10, seed=1), _data(4)[0], "cuda")


def test_a_process_keeps_every_partition_of_a_100_client_population():
    cfg = DataConfig(dataset="digits", num_partitions=100, partitioner="iid", seed=5)
    first = [load_partition(cfg, p) for p in range(100)]
    hits = load_partition.cache_info().hits
    again = [load_partition(cfg, p) for p in range(100)]
    assert load_partition.cache_info().hits == hits + 100  # none decoded twice
    assert all(a[0] is b[0] for a, b in zip(first, again))


class _State:
    """The slice of Flower's InMemoryLinkState the polling loop reads, counting calls."""

    def __init__(self, pending: dict[int, int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {}
        for node, count in pending.items():
            for i in range(count):
                meta = SimpleNamespace(dst_node_id=node, delivered_at="")
                self.message_ins_store[f"{node}-{i}"] = SimpleNamespace(metadata=meta, name=f"{node}-{i}")
        self.calls = []

    def get_message_ins(self, node_id, limit):
        self.calls.append(node_id)
        with self.lock:
            for m in self.message_ins_store.values():
                if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == "":
                    m.metadata.delivered_at = "now"
                    return [m]
        return []


def _one_tick(loop, state, nodes) -> list:
    queue, stop = Queue(), threading.Event()

    class OneTick(threading.Event):
        def wait(self, timeout=None):
            stop.set()
            return True

        def is_set(self):
            return stop.is_set()

    loop(state, queue, {n: n for n in nodes}, OneTick())
    return [queue.get_nowait().name for _ in range(queue.qsize())]


def test_polling_only_nodes_with_messages_delivers_the_same():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue if vce_api.add_messages_to_queue is not engine.add_messages_to_queue \
        else None
    nodes = list(range(100))
    ours = _State({3: 2, 40: 1, 99: 1})
    got = _one_tick(engine.add_messages_to_queue, ours, nodes)
    assert got == ["3-0", "40-0", "99-0"]  # one per node and tick, in node order
    assert ours.calls == [3, 40, 99]  # not 100 calls
    assert _one_tick(engine.add_messages_to_queue, ours, nodes) == ["3-1"]
    if original is not None:  # Flower's own loop, on the same messages
        theirs = _State({3: 2, 40: 1, 99: 1})
        assert _one_tick(original, theirs, nodes) == ["3-0", "40-0", "99-0"]
        assert len(theirs.calls) == 100


def test_polling_falls_back_to_every_node_without_the_in_memory_store():
    calls = []
    state = SimpleNamespace(get_message_ins=lambda node_id, limit: calls.append(node_id) or [])
    assert engine.pending_nodes(state) is None
    assert _one_tick(engine.add_messages_to_queue, state, range(100)) == [] and calls == list(range(100))


def test_the_patch_is_installed_unless_flower_polling_is_asked_for(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)  # restored after
    monkeypatch.setenv("FL_DEFENSE_FLOWER_POLLING", "flower")
    before = vce_api.add_messages_to_queue
    assert engine.patch_message_polling() is False and vce_api.add_messages_to_queue is before
    monkeypatch.delenv("FL_DEFENSE_FLOWER_POLLING")
    assert engine.patch_message_polling() is True and vce_api.add_messages_to_queue is engine.add_messages_to_queue


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_cell_cpu_time_counts_processes_the_cell_never_waits_for():
    """Ray's workers are not reaped by the cell's process, so getrusage(RUSAGE_CHILDREN) misses
    them; the sampled process tree does not."""
    import resource
    import subprocess
    import sys

    from simulation.cputime import TreeCPU

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
    child = ("import subprocess, sys, time, os\n"
             f"p = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
             # until the grandchild has finished (a zombie: never waited for), then exit without reaping it
             "while open(f'/proc/{p.pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z': time.sleep(0.02)\n"
             "time.sleep(0.5)\nos._exit(0)\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", child])
    with TreeCPU(proc.pid, interval=0.1) as meter:
        proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    waited = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert meter.stop() >= waited + 0.6  # the grandchild's 0.8 s, less one sampling interval


def test_the_decoded_data_cache_gives_the_same_tensors_and_skips_decoding(tmp_path, monkeypatch):
    from fl_defense import data

    cfg = DataConfig(dataset="digits", num_partitions=7, partitioner="dirichlet", dirichlet_alpha=0.5,
                     server_fraction=0.1, seed=11)

    def fresh():
        for f in (data.load_partition, data.load_split, data._cached):
            f.cache_clear()

    monkeypatch.delenv(data.DATA_CACHE_ENV, raising=False)
    fresh()
    plain = [data.load_partition(cfg, p) for p in range(7)] + [data.load_split(cfg, "test"), data.load_split(cfg, "server")]
    monkeypatch.setenv(data.DATA_CACHE_ENV, str(tmp_path))
    fresh()
    built = [data.load_partition(cfg, p) for p in range(7)] + [data.load_split(cfg, "test"), data.load_split(cfg, "server")]
    assert len(list(tmp_path.glob("digits-*"))) == 3 + 3  # partitions, test, server (and their lock files)
    fresh()  # another process: reads the cache, never builds the dataset
    monkeypatch.setattr(data, "federated_dataset", lambda cfg: (_ for _ in ()).throw(AssertionError("decoded again")))
    cached = [data.load_partition(cfg, p) for p in range(7)] + [data.load_split(cfg, "test"), data.load_split(cfg, "server")]
    for (x0, y0), (x1, y1), (x2, y2) in zip(plain, built, cached):
        assert torch.equal(x0, x1) and torch.equal(x0, x2) and x2.dtype == torch.float32
        assert torch.equal(y0, y1) and torch.equal(y0, y2) and y2.dtype == torch.int64
    assert data._cache_key(cfg, "partitions") != data._cache_key(
        DataConfig(**{**cfg.__dict__, "seed": 12}), "partitions")  # another partition, another entry
    fresh()


def test_channels_last_prediction_gives_the_same_classes():
    from fl_defense.training import predict

    x, y = _data(700)
    model = build_model("cnn_small", (1, 28, 28), 10, seed=1)
    train(model, x, y, 1, 64, 0.1, seed=1)
    with torch.no_grad():
        reference = model.eval()(x).argmax(dim=1)  # one batch, default format
    assert torch.equal(predict(model, x), reference)
    assert torch.equal(predict(model, x, batch_size=1024), reference)
    assert all(p.is_contiguous() for p in model.parameters())
