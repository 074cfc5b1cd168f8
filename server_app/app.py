"""ServerApp: build the configured defense strategy and evaluate centrally every round."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.compat import start_grid
from flwr.serverapp import Grid

from fl_defense.checkpoint import load_checkpoint
from fl_defense.config import ConfigError, ExperimentConfig
from fl_defense.data import DATASETS, load_split
from fl_defense.defenses import DEFENSES, PRE_AGGREGATIONS, ClipNoise, Defense, ServerContext
from fl_defense.pretrain import cache_folder, is_cached, pretrain_id
from fl_defense.models import build_model, get_arrays, set_arrays, trainable_mask
from fl_defense.strategies import DefenseStrategy

from .backdoor_probe import with_backdoor_probe
from .collusion import with_collusion
from .recorder import RunFailed, RunRecorder, done_line, failure_line, failure_reason, run_failure
from .sampling import SortedClientManager


def build_defense(cfg: ExperimentConfig, model: torch.nn.Module,
                  server_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Defense:
    """The configured defense: its run-config values plus what its class's ``server_parts``
    builds (SDFC's validation Fisher, FLTrust's root-dataset update, FLARE's PLRs on
    ``server_data``; DeepSight's probe, BackdoorIndicator's indicator task; RLR's base defense,
    built here through ``ctx.build``), then the pre-aggregation step (bucketing, NNM) and the
    clip/noise wrapper when asked for."""

    def make(name: str) -> Defense:
        cls, kwargs = DEFENSES[name], cfg.defense_kwargs(name)
        kwargs.update(cls.server_parts(replace(ctx, kwargs=MappingProxyType(dict(kwargs)))))
        return cls(**kwargs)

    ctx = ServerContext(cfg=cfg, model=lambda: copy.deepcopy(model), server_data=server_data,
                        spec=DATASETS[cfg.dataset], data_dir=cfg.data_dir, seed=cfg.seed, build=make)
    defense = make(cfg.defense)
    if cfg.pre_aggregation == "bucketing":
        defense = PRE_AGGREGATIONS["bucketing"](defense, bucket_size=cfg.bucket_size, seed=cfg.seed)
    elif cfg.pre_aggregation == "nnm":
        defense = PRE_AGGREGATIONS["nnm"](defense, num_malicious=cfg.num_malicious)
    if cfg.wraps_clip_noise:
        defense = ClipNoise(defense, clip_norm=cfg.clip_norm, noise=cfg.noise, seed=cfg.seed)
    return defense


def build_strategy(cfg: ExperimentConfig, model: torch.nn.Module, evaluate_fn=None, min_available: int = 0,
                   server_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                   checkpoint_path: Path | None = None, round_offset: int = 0,
                   sampling_rng: random.Random | None = None) -> DefenseStrategy:
    """The legacy-API strategy running the configured defense from ``model``'s parameters."""
    return DefenseStrategy(
        defense=build_defense(cfg, model, server_data),
        checkpoint_path=str(checkpoint_path) if checkpoint_path else None,
        round_offset=round_offset,
        sampling_rng=sampling_rng,
        fraction_fit=cfg.fraction_fit,
        fraction_evaluate=0.0,  # evaluation is central, on the server's test split
        min_fit_clients=cfg.min_fit_clients,
        min_available_clients=max(min_available, cfg.min_fit_clients),
        initial_parameters=ndarrays_to_parameters(get_arrays(model)),
        evaluate_fn=evaluate_fn,
        trainable=trainable_mask(model),
        device=_device(cfg.device),
        min_valid_clients=cfg.min_valid_clients,
        max_update_norm=cfg.max_update_norm,
        keep_workspace=cfg.keep_workspace,
        max_rounds_without_valid=cfg.max_rounds_without_valid,
    )


def undefended_window(cfg: ExperimentConfig, first: int) -> tuple[str, bool] | None:
    """What the attack window meets when the defense acts from round ``first``
    (``Defense.first_active_round``): "the attack window is rounds a-b, so ..." and whether the
    whole window is undefended; None when the defense acts from the attack's first round or no
    attack is configured. The start-up note and the leaderboard pages both say it."""
    if (cfg.attack == "none" and cfg.model_poisoning == "none") or first <= cfg.attack_start_round:
        return None
    start, stop = cfg.attack_start_round, cfg.attack_stop_round or cfg.num_server_rounds
    if first > stop:
        meets = "it cannot act at all while the attack lasts"
    elif first - 1 == start:
        meets = f"round {start} of the attack meets the undefended aggregate"
    else:
        meets = f"rounds {start}-{first - 1} of the attack meet the undefended aggregate"
    return f"the attack window is rounds {start}-{stop}, so {meets}", first > stop


def warmup_notice(cfg: ExperimentConfig, defense: Defense, offset: int = 0) -> str | None:
    """A line for the start-up output when the defense cannot act for part or all of the attack
    window (``undefended_window``): its rounds before then aggregate undefended. None when it can
    act from the attack's first round, when no attack is configured, or when the run resumes
    (``offset``: the restored state is warmed up)."""
    first = defense.first_active_round()
    missed = None if offset else undefended_window(cfg, first)
    if missed is None:
        return None
    return (f"[fl-defense] note: {cfg.defense} acts from round {first} of this run (it needs the earlier "
            f"rounds' history first); {missed[0]} (attack-start-round delays the attack)")


def results_folder(cfg: ExperimentConfig) -> Path:
    """Where the run writes; a relative results-dir resolves against this process's directory."""
    name = cfg.run_name or f"{cfg.defense}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.results_dir).expanduser().resolve() / name


def _device(device: str) -> str:
    return device if device == "cpu" or torch.cuda.is_available() else "cpu"


def build_components(run_config: dict, num_nodes: int) -> ServerAppComponents:
    """Everything the ServerApp runs, from a run-config dict (validated here, at start-up) and the
    number of nodes in the federation."""
    cfg = ExperimentConfig.from_run_config(run_config)
    cfg.check_federation(num_nodes)
    min_available = cfg.min_available_clients or num_nodes
    # client sampling draws from its own RNG: Ray's driver draws from the random module meanwhile
    sampling = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    data_cfg = cfg.data_config(num_partitions=1)  # the server needs only the test split
    spec = data_cfg.spec
    model = build_model(cfg.model_name, spec.shape, spec.num_classes, seed=cfg.seed)
    out_dir = results_folder(cfg)
    checkpoint_path = out_dir / "checkpoint.pkl"
    state = None
    if cfg.resume:
        if not checkpoint_path.exists():
            raise ConfigError(f"run-config key 'resume': no checkpoint at {checkpoint_path}")
        state = load_checkpoint(checkpoint_path)  # also restores the process RNGs
        # a checkpoint from before the sampling RNG of its own: its sampling drew from the random module's
        sampling.setstate(state.get("client-sampling") or state["python-random"])
        set_arrays(model, state["arrays"])
    pretrained = None
    if cfg.pretrain_rounds > 0 and state is None:
        pretrained = cache_folder(cfg, num_nodes)
        if not is_cached(pretrained):
            raise ConfigError(f"run-config key 'pretrain-rounds': no pre-trained model at {pretrained}; "
                              "python -m simulation.run and grids build it first (flwr run . only reuses one)")
        set_arrays(model, load_checkpoint(pretrained / "checkpoint.pkl", restore_rng=False)["arrays"])
        # client sampling that does not repeat the pre-training's sequence of sampled clients
        sampling.seed(f"{cfg.seed}:after-pretraining:{cfg.pretrain_rounds}")
    offset = state["round"] if state else 0
    recorder = RunRecorder(cfg, model, load_split(data_cfg, "test"), out_dir, resume_round=offset if state else None)
    server_data = load_split(data_cfg, "server") if cfg.server_fraction > 0 else None
    strategy = build_strategy(cfg, model, evaluate_fn=recorder.evaluate, min_available=min_available,
                              server_data=server_data, checkpoint_path=checkpoint_path if cfg.checkpoint else None,
                              round_offset=offset, sampling_rng=sampling)
    notice = warmup_notice(cfg, strategy.aggregation.defense, offset)
    strategy = with_collusion(cfg, strategy, trainable_mask(model))  # simulation only; absent unless configured
    strategy = with_backdoor_probe(cfg, strategy, recorder, spec.shape)  # simulation only: learned triggers
    if state:
        strategy.aggregation.load_state_dict(state["defense"])
    recorder.strategy = strategy
    if cfg.pretrain_rounds > 0:
        recorder.pretrained_from = pretrain_id(cfg, num_nodes)
    print(f"[fl-defense] {strategy!r} on {cfg.dataset}; results in {recorder.out_dir}", flush=True)
    if notice:
        print(notice, flush=True)
    # clients sampled in node-id order with the run's own RNG: with the simulation's fixed node ids,
    # the same partitions in the same rounds for every run of a seed (server_app/sampling.py)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.num_server_rounds - offset),
                               client_manager=SortedClientManager(sampling, expected=min_available))


def connected_nodes(grid: Grid, settle_seconds: float = 3.0) -> int:
    """Nodes connected now, after waiting until the count stops growing for ``settle_seconds``."""
    count, stable_since = len(list(grid.get_node_ids())), time.monotonic()
    while time.monotonic() - stable_since < settle_seconds or count == 0:
        time.sleep(0.5)
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
    return count


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_config = dict(context.run_config)
        cfg = ExperimentConfig.from_run_config(run_config)
        run_config["run-name"] = results_folder(cfg).name  # the timestamped default, fixed once
        components = build_components(run_config, connected_nodes(grid))
        start_grid(grid=grid, strategy=components.strategy, config=components.config,
                   client_manager=components.client_manager)
        out_dir = results_folder(ExperimentConfig.from_run_config(run_config))
        reason = run_failure(out_dir, cfg.num_server_rounds)
        if reason:
            raise RunFailed(reason)
        print(done_line(out_dir), flush=True)
    except Exception as exc:
        _report_failure(exc, context.run_id)
        raise  # Flower marks the run failed (flwr ls) and exits its process non-zero


def _report_failure(exc: Exception, run_id: int) -> None:
    """One line, the last of the run's output: Flower logs the exception and its exit code after
    the ServerApp returns, so the line is printed from Flower's exit handlers when they exist
    (flwr-simulation and flwr-serverapp call them), else now. For our own errors (a bad config,
    a run without progress) the message is the whole story: Flower's traceback of them is dropped."""
    line = failure_line(f"{failure_reason(exc)} (run {run_id}: `flwr log {run_id} --show` prints this output "
                        f"again, `flwr ls --run-id {run_id}` its status)")
    if isinstance(exc, (ConfigError, RunFailed)):
        logging.getLogger("flwr").addFilter(_DropTraceback(exc))
    try:
        from flwr.supercore.exit import add_exit_handler

        add_exit_handler(lambda: print(line, flush=True), run_before_force_exit=True)
    except (ImportError, TypeError):  # another Flower version: say it now
        print(line, flush=True)


class _DropTraceback(logging.Filter):
    """Logs ``exc`` without its traceback (the record's message stays)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.exc:
            record.exc_info, record.exc_text = None, None
        return True
