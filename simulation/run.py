"""Run one simulated federation through Flower's simulation engine.

    python -m simulation.run --run-config "defense='rlr' num-server-rounds=5"

The same ServerApp and ClientApp as ``flwr run .``, without a SuperLink. Run-config values are TOML,
as in ``flwr run --run-config`` (strings in quotes). The configuration is checked before anything
starts: a bad value or an unknown key (with the closest valid one) ends the run at once.

What it prints: our per-round lines and a progress bar over rounds. Flower's and Ray's own output
goes to ``flower.log`` in the run's results folder (``--verbose`` prints it here instead of the
bar). A run ends with one line: ``[fl-defense] done: ...`` or ``[fl-defense] FAILED: <reason>``.
Exit status: 0 done, 1 the federation failed, 2 a bad configuration, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from fl_defense.config import ConfigError, ExperimentConfig

PREFIX = "[fl-defense]"
ROUND_LINE = re.compile(r"\[fl-defense\] round\s+(\d+)")
FAILED = f"{PREFIX} FAILED: "
EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def parse_run_config(text: str) -> dict:
    """'k1=v1 k2=v2' with TOML values, as ``flwr run --run-config`` accepts."""
    out = {}
    for pair in shlex.split(text, posix=False):
        try:
            out.update(tomllib.loads(pair))
        except tomllib.TOMLDecodeError as err:
            hint = " (strings need quotes: key='value')" if "=" in pair else " (pairs are key=value)"
            raise ConfigError(f"--run-config: cannot read {pair!r} as TOML{hint}: {err}") from None
    return out


def prepare(overrides: dict, num_supernodes: int) -> tuple[ExperimentConfig, dict]:
    """Check the run config as the ServerApp will (values, keys, the federation's size) and fix the
    results folder's name; returns the config and the overrides that name it."""
    cfg = ExperimentConfig.from_run_config(overrides)
    cfg.check_federation(num_supernodes)
    if not cfg.run_name:
        name = f"{cfg.defense}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        overrides = {**overrides, "run-name": name}
        cfg = ExperimentConfig.from_run_config(overrides)
    return cfg, overrides


def results_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.results_dir).expanduser().resolve() / cfg.run_name


def ensure_pretrained(cfg: ExperimentConfig, num_supernodes: int, num_cpus: float = 1,
                      num_gpus: float = 0.0) -> tuple[Path, bool] | None:
    """With ``pretrain-rounds``: the pre-training cache folder this run starts from, built first
    (clean FedAvg, a federation of its own) unless another run already did; returns (folder,
    whether it was built now), or None without pre-training. A lock file makes concurrent runs
    (the shards of a grid) wait for one build instead of repeating it."""
    if cfg.pretrain_rounds <= 0:
        return None
    import fcntl

    from fl_defense.pretrain import cache_folder, is_cached, pretrain_run_config

    folder = cache_folder(cfg, num_supernodes)
    if is_cached(folder):
        print(f"{PREFIX} pre-trained model from the cache: {folder}", flush=True)
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_cached(folder):  # built by another run while this one waited
            print(f"{PREFIX} pre-trained model from the cache: {folder}", flush=True)
            return folder, False
        print(f"{PREFIX} pre-training: {cfg.pretrain_rounds} rounds of clean FedAvg, cached in {folder}", flush=True)
        _federation(pretrain_run_config(cfg, num_supernodes), num_supernodes, num_cpus, num_gpus)
    print(f"{PREFIX} pre-training done; the run starts from it", flush=True)
    return folder, True


def run(overrides: dict, num_supernodes: int = 10, num_cpus: float = 1, num_gpus: float = 0.0) -> Path:
    """The federation in this process, Flower's output as it comes; returns the results folder.
    Raises ``ConfigError`` for a bad config and ``RunFailed`` for a run without a full result.
    With ``pretrain-rounds`` the pre-training cache is built first when missing."""
    cfg, overrides = prepare(overrides, num_supernodes)
    ensure_pretrained(cfg, num_supernodes, num_cpus, num_gpus)
    return _federation(overrides, num_supernodes, num_cpus, num_gpus)


RAY_CPUS_ENV = "FL_DEFENSE_RAY_CPUS"


def backend_config(num_cpus: float, num_gpus: float) -> dict:
    """Flower's Ray backend: each virtual client's resources; the Ray instance it starts gets the CPUs
    in FL_DEFENSE_RAY_CPUS when set (a cell run as a task of simulation.cluster), else all of them."""
    config = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if os.environ.get(RAY_CPUS_ENV):
        config["init_args"] = {"num_cpus": int(os.environ[RAY_CPUS_ENV])}
    return config


def _federation(overrides: dict, num_supernodes: int, num_cpus: float, num_gpus: float) -> Path:
    """One federation through Flower's simulation engine; raises ``RunFailed`` without a full result."""
    cfg = ExperimentConfig.from_run_config(overrides)
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    import client_app.app as ca
    import server_app.app as sa
    from server_app.recorder import RunFailed, run_failure

    from .engine import patch_message_polling, patch_node_ids

    patch_message_polling()  # Flower's engine would poll every node 10 times a second (simulation/engine.py)
    patch_node_ids()  # node i is partition i, so a seed samples the same partitions in every run
    import torch

    # This process is the ServerApp's: its torch work is the central evaluation between rounds, on one
    # thread; with two, the second spun as long as the first worked (6-8 CPU s a protocol round for
    # 2-3 s of evaluation: benchmarks/protocol_round.py). The clients train in Ray's actors, whose
    # threads Ray sets from their CPUs.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FL_DEFENSE_SERVER_THREADS", "1")))

    def server_fn(context):
        return sa.build_components({**context.run_config, **overrides}, num_nodes=num_supernodes)

    def client_fn(context):
        return ca.build_client({**context.run_config, **overrides}, context.node_config)

    try:
        run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                       num_supernodes=num_supernodes,
                       backend_config=backend_config(num_cpus, num_gpus))
    finally:
        torch.set_num_threads(threads)  # a caller running federations in its own process keeps its setting
    folder = results_dir(cfg)
    reason = run_failure(folder, cfg.num_server_rounds)
    if reason:
        raise RunFailed(reason)
    return folder


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _in_process(overrides: dict, args) -> int:
    """The federation here; our lines, Flower's output and, at the end, one line saying how it went."""
    from server_app.recorder import RunFailed, done_line, failure_line, failure_reason

    try:
        folder = run(overrides, args.num_supernodes, args.num_cpus, args.num_gpus)
    except (ConfigError, RunFailed) as exc:
        print(failure_line(failure_reason(exc)), flush=True)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(failure_line(failure_reason(exc)), flush=True)
        return EXIT_FAILED
    print(done_line(folder), flush=True)
    return 0


def supervise(cfg: ExperimentConfig, overrides: dict, args) -> int:
    """The federation in a child process (``--in-process``): its whole output goes to flower.log in
    the results folder; ours (lines starting ``[fl-defense]``) is shown, with a progress bar, or
    everything with ``--verbose``. The last line is the child's verdict, or ours if it died."""
    from tqdm import tqdm

    folder = results_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "flower.log"
    cmd = [sys.executable, "-m", "simulation.run", "--in-process", "--run-config-json", json.dumps(overrides),
           "--num-supernodes", str(args.num_supernodes), "--num-cpus", str(args.num_cpus),
           "--num-gpus", str(args.num_gpus)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = 0
    if cfg.resume and (folder / "rounds.jsonl").exists():
        start = sum(1 for line in (folder / "rounds.jsonl").read_text().splitlines() if line.strip()) - 1
    bar = None  # from round 0 on: Ray's start-up would count as the first round's time
    verdict = None
    print(f"{PREFIX} starting a simulated federation of {args.num_supernodes} clients, {cfg.num_server_rounds} "
          f"rounds (Flower and Ray take a few seconds to start); Flower's output goes to {_shown(log_path)}"
          + ("" if args.verbose else " (--verbose shows it here)"), flush=True)
    with log_path.open("a") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C reaches us alone, and we stop it once, with what it started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1, start_new_session=True)
        previous_term = signal.signal(signal.SIGTERM, _interrupt)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                if text.startswith(FAILED) or text.startswith(f"{PREFIX} done:"):
                    verdict = text  # printed last, below the bar
                    continue
                if args.verbose:
                    print(text, flush=True)
                elif text.startswith(PREFIX):
                    tqdm.write(text, file=sys.stdout)
                    sys.stdout.flush()
                m = ROUND_LINE.match(text)
                if m:
                    if bar is None:
                        bar = tqdm(total=cfg.num_server_rounds, initial=max(start, 0), unit="round", desc="rounds",
                                   disable=args.verbose or args.no_progress, dynamic_ncols=True, file=sys.stderr)
                    bar.n = int(m.group(1))
                    bar.refresh()
            rc = proc.wait()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _stop(proc)
            log.write(f"==== interrupted: the federation's process ended with status {proc.returncode}\n")
            if bar is not None:
                bar.close()
            resume = f"resume=true run-name='{cfg.run_name}'"
            if cfg.results_dir != ExperimentConfig().results_dir:
                resume += f" results-dir='{cfg.results_dir}'"
            print(f"{FAILED}interrupted; Flower's output is in {_shown(log_path)}; to continue from the last "
                  f"checkpoint add: {resume}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        finally:
            if signal.getsignal(signal.SIGTERM) is _interrupt:
                signal.signal(signal.SIGTERM, previous_term)
    if bar is not None:
        bar.close()
    if rc == 0 and verdict and not verdict.startswith(FAILED):
        print(verdict, flush=True)
        return 0
    reason = verdict[len(FAILED):] if verdict and verdict.startswith(FAILED) else \
        f"the federation's process exited with status {rc} before saying why"
    print(f"{FAILED}{reason} (Flower's output: {_shown(log_path)})", file=sys.stderr, flush=True)
    return EXIT_CONFIG if rc == EXIT_CONFIG else EXIT_FAILED


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Ask the federation's process to stop (SIGINT, as a Ctrl-C would); after ``grace`` seconds
    end its whole session (Ray's workers with it)."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulation.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", help="TOML key=value pairs, space separated")
    parser.add_argument("--run-config-json", help=argparse.SUPPRESS)  # how the supervisor hands it over
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per virtual client")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="share of a GPU per virtual client")
    parser.add_argument("--verbose", action="store_true", help="print Flower's and Ray's output instead of the bar")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--in-process", action="store_true",
                        help="run Flower in this process, its output as it comes, no log file (grids use this)")
    args = parser.parse_args(argv)
    from server_app.recorder import failure_line

    try:
        overrides = json.loads(args.run_config_json) if args.run_config_json else parse_run_config(args.run_config)
        cfg, overrides = prepare(overrides, args.num_supernodes)
    except ConfigError as exc:
        print(failure_line(str(exc)), file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(_in_process(overrides, args) if args.in_process else supervise(cfg, overrides, args))


if __name__ == "__main__":
    main()
