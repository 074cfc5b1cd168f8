"""The benchmark protocol's round through the real simulation path against a plain PyTorch loop
doing the same training, in one run (issue 20's cost target: at most 1.2x).

    python benchmarks/protocol_round.py [--rounds 8] [--warmup 3] [--compare-flower-polling]

1. Simulation: ``python -m simulation.run --in-process`` (Flower's simulation engine, Ray actors, our
   ServerApp and ClientApp) with the protocol's population: Fashion-MNIST, 100 clients, Dirichlet
   0.5, 10 sampled per round, cnn_small, one local epoch, batch 64, FedAvg, no attack. The round
   time is the recorder's ``round_seconds`` (training of the sampled clients, aggregation and the
   central evaluation), median over the rounds after ``--warmup``; CPU: user + system of the whole
   process tree (the run's process, Ray and its actors) over the run, start-up included.
2. Plain loop: in this process, the same rounds' sampled clients (read from the run's
   ``rounds.jsonl``), their partitions decoded once up front, trained one after another with a
   hand-written SGD loop (same model, epochs, batch size, learning rate, memory format; one torch
   thread, as each simulation actor has), averaged (FedAvg) and, for the "+ evaluation" figure, evaluated as the server does
   (accuracy, attack success with the plus trigger, the same images without it).

Two ratios: CPU time per round (every process of the simulation against the plain loop's process:
the cost the leaderboard pays, and the figure that holds on a shared machine) and wall clock per
round (the simulation's two actors train in parallel, the plain loop on one thread). ``--compare-flower-polling`` also runs the simulation
with Flower's own message polling (simulation/engine.py explains what is replaced), to show that
cost, which grows with the population. Writes a JSON record (default results/perf/protocol_round.json)
and prints the figures with ``torch.backends.cpu.get_cpu_capability()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTOCOL = {"dataset": "fashion_mnist", "data-dir": "../shared/data", "model": "cnn_small", "partitioner": "dirichlet",
            "dirichlet-alpha": 0.5, "fraction-fit": 0.1, "local-epochs": 1, "batch-size": 64, "learning-rate": 0.1,
            "defense": "fedavg", "attack": "none", "model-poisoning": "none", "malicious-fraction": 0.0,
            "server-fraction": 0.02, "checkpoint": False, "seed": 1}
NUM_CLIENTS = 100


def run_simulation(rounds: int, out: Path, flower_polling: bool) -> dict:
    """One protocol run through simulation.run; its round times and the process tree's CPU time."""
    name = "flower-polling" if flower_polling else "simulation"
    overrides = {**PROTOCOL, "num-server-rounds": rounds, "results-dir": str(out), "run-name": name}
    # as the leaderboard runs its cells: decoded partitions shared through the data cache
    env = {"FL_DEFENSE_DATA_CACHE": str(ROOT / "results" / "data-cache"), **os.environ, "PYTHONUNBUFFERED": "1"}
    if flower_polling:
        env["FL_DEFENSE_FLOWER_POLLING"] = "flower"
    from simulation.cputime import TreeCPU

    t0 = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "simulation.run", "--in-process", "--num-supernodes",
                                 str(NUM_CLIENTS), "--run-config-json", json.dumps(overrides)], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
        marks: dict[int, float] = {}  # round -> CPU seconds of the whole tree when it was recorded
        timings_path = out / name / "timings.jsonl"
        with TreeCPU(proc.pid, interval=0.25) as meter:  # the run's process and its Ray workers
            while proc.poll() is None:
                if timings_path.exists():
                    for line in timings_path.read_text().splitlines():
                        if line.endswith("}"):
                            marks.setdefault(json.loads(line)["round"], meter.seconds)
                time.sleep(0.1)
    cpu, wall = meter.stop(), time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the simulation failed:\n{log.read_text()[-3000:]}")
    folder = out / name
    timings = [json.loads(line) for line in (folder / "timings.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return {"round_seconds": {t["round"]: t["round_seconds"] for t in timings if t["round"] > 0},
            "sampled": {r["round"]: [c["partition"] for c in r["clients"]] for r in rows if r["round"] > 0},
            "cpu_seconds": cpu, "wall_seconds": wall,
            "round_cpu_seconds": {r: marks[r] - marks[r - 1] for r in marks if r - 1 in marks}}


def plain_loop(sampled: dict[int, list[int]], measured: list[int], threads: int) -> dict:
    """The same rounds' training (and evaluation) in a hand-written loop, in this process."""
    import torch
    from torch import nn

    from fl_defense.config import ExperimentConfig
    from fl_defense.data import load_partition, load_split
    from fl_defense.metrics import accuracy, attack_success_rate
    from fl_defense.models import build_model
    from fl_defense.attacks import make_trigger

    torch.set_num_threads(threads)
    cfg = ExperimentConfig.from_run_config(PROTOCOL)
    data_cfg = cfg.data_config(NUM_CLIENTS)
    spec = data_cfg.spec
    parts = {p: load_partition(data_cfg, p) for r in measured for p in sampled[r]}  # decoded before timing
    test_x, test_y = load_split(data_cfg, "test")
    trigger = make_trigger("plus", spec.shape, seed=cfg.seed)
    model = build_model("cnn_small", spec.shape, spec.num_classes, seed=cfg.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    train_s, eval_s, cpu_s = [], [], []
    for r in measured:
        t0, c0 = time.perf_counter(), time.process_time()
        total, acc_state = 0, None
        for p in sampled[r]:
            x_all, y_all = parts[p]
            model.load_state_dict(global_state)
            model.train().to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
            gen = torch.Generator().manual_seed(p + 1000 * r)
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(x_all), generator=gen)
                for s in range(0, len(order), cfg.batch_size):
                    idx = order[s:s + cfg.batch_size]
                    x = x_all[idx].contiguous(memory_format=torch.channels_last)
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x), y_all[idx]).backward()
                    opt.step()
            model.to(memory_format=torch.contiguous_format)
            n = len(x_all)
            state = model.state_dict()
            acc_state = {k: v.double() * n for k, v in state.items()} if acc_state is None else \
                {k: acc_state[k] + state[k].double() * n for k in state}
            total += n
        global_state = {k: (v / total).to(global_state[k].dtype) for k, v in acc_state.items()}
        t1 = time.perf_counter()
        model.load_state_dict(global_state)
        accuracy(model, test_x, test_y)
        attack_success_rate(model, test_x, test_y, trigger, cfg.target_label, cfg.base_label)
        attack_success_rate(model, test_x, test_y, None, cfg.target_label, cfg.base_label)
        eval_s.append(time.perf_counter() - t1)
        train_s.append(t1 - t0)
        cpu_s.append(time.process_time() - c0)
    samples = sum(len(parts[p][0]) for r in measured for p in sampled[r])
    return {"train_seconds": train_s, "eval_seconds": eval_s, "cpu_seconds": cpu_s, "samples": samples,
            "samples_per_second": samples * cfg.local_epochs / sum(train_s), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="rounds left out of the median (actor start, first data)")
    parser.add_argument("--compare-flower-polling", action="store_true")
    parser.add_argument("--plain-threads", type=int, default=1,
                        help="torch threads of the plain loop (1, as each simulation actor has; its CPU time is "
                             "the comparison that holds on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "results" / "perf" / "protocol_round.json"))
    args = parser.parse_args()
    import torch

    measured = list(range(args.warmup + 1, args.rounds + 1))
    with tempfile.TemporaryDirectory() as tmp:
        sim = run_simulation(args.rounds, Path(tmp), flower_polling=False)
        flower = run_simulation(args.rounds, Path(tmp), flower_polling=True) if args.compare_flower_polling else None
    plain = plain_loop(sim["sampled"], measured, args.plain_threads)
    sim_round = statistics.median(sim["round_seconds"][r] for r in measured)
    train_round = statistics.median(plain["train_seconds"])
    full_round = statistics.median(t + e for t, e in zip(plain["train_seconds"], plain["eval_seconds"]))
    sim_round_cpu = statistics.median(sim["round_cpu_seconds"][r] for r in measured if r in sim["round_cpu_seconds"])
    plain_round_cpu = statistics.median(plain["cpu_seconds"])
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(), "protocol": PROTOCOL, "clients": NUM_CLIENTS,
        "rounds": args.rounds, "measured_rounds": measured,
        "simulation_round_seconds": sim["round_seconds"], "simulation_round_median": sim_round,
        "simulation_cpu_seconds": sim["cpu_seconds"], "simulation_wall_seconds": sim["wall_seconds"],
        "plain_train_round_median": train_round, "plain_round_with_evaluation_median": full_round,
        "plain_samples_per_second": plain["samples_per_second"], "plain_threads": plain["threads"],
        "ratio_to_plain_training": sim_round / train_round, "ratio_to_plain_round_with_evaluation": sim_round / full_round,
        "simulation_round_cpu_seconds": sim["round_cpu_seconds"], "simulation_round_cpu_median": sim_round_cpu,
        "plain_round_cpu_median": plain_round_cpu, "cpu_ratio": sim_round_cpu / plain_round_cpu,
    }
    if flower:
        record.update({"flower_polling_round_seconds": flower["round_seconds"],
                       "flower_polling_round_cpu_seconds": flower["round_cpu_seconds"],
                       "flower_polling_round_cpu_median": statistics.median(
                           flower["round_cpu_seconds"][r] for r in measured if r in flower["round_cpu_seconds"]),
                       "flower_polling_round_median": statistics.median(flower["round_seconds"][r] for r in measured),
                       "flower_polling_cpu_seconds": flower["cpu_seconds"],
                       "flower_polling_wall_seconds": flower["wall_seconds"]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"cpu capability {record['cpu_capability']}, {record['cores']} cores, load average at the end "
          f"{', '.join(f'{x:.1f}' for x in record['load_average_at_end'])}")
    print(f"simulation ({NUM_CLIENTS} clients, 10 a round): round {sim_round:.2f} s (median of rounds "
          f"{measured[0]}-{measured[-1]}); {sim['cpu_seconds']:.0f} CPU s over {sim['wall_seconds']:.0f} s wall "
          f"for {args.rounds} rounds, start-up included")
    if flower:
        print(f"  with Flower's own polling: round {record['flower_polling_round_median']:.2f} s; "
              f"{flower['cpu_seconds']:.0f} CPU s over {flower['wall_seconds']:.0f} s wall")
    print(f"plain loop, same clients and training: {train_round:.2f} s ({plain['samples_per_second']:.0f} samples/s, "
          f"{plain['threads']} threads); with the same evaluation: {full_round:.2f} s")
    print(f"ratio: {record['ratio_to_plain_round_with_evaluation']:.2f}x the plain round with evaluation, "
          f"{record['ratio_to_plain_training']:.2f}x its training alone (wall clock)")
    print(f"CPU per round: simulation {sim_round_cpu:.2f} s (every process), plain loop with evaluation "
          f"{plain_round_cpu:.2f} s: {record['cpu_ratio']:.2f}x"
          + (f"; with Flower's own polling {record['flower_polling_round_cpu_median']:.2f} s" if flower else "")
          + f" -> {args.out}")


if __name__ == "__main__":
    main()
