"""A failed run, however started, ends with one line saying why, and our entry points exit non-zero.

The fast tests fail before Flower starts (a bad config is checked first); the slow ones start a
real federation that fails inside it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAILED = "[fl-defense] FAILED: "


def _run(cmd, timeout=600, **env):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    return proc.returncode, proc.stdout, proc.stderr


def _one_failure_line(out: str, err: str) -> str:
    """The output's last line is our FAILED line, the only one, and no traceback came with it."""
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines and lines[-1].startswith(FAILED), out[-2000:] + err[-2000:]
    assert sum(FAILED in line for line in lines) == 1
    return lines[-1]


def _single_run(run_config: str, *extra: str):
    return _run([sys.executable, "-m", "simulation.run", "--run-config", run_config, *extra])


def _in_process(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("run_config, says", [
    ("defense='krumm'", "run-config key 'defense': 'krumm' is not one of fedavg, rlr"),
    ("num-server-round=3", "run-config key 'num-server-round' is unknown; did you mean 'num-server-rounds'?"),
    ("defence='rlr' rlr_theta=3", "run-config key 'defence' is unknown; did you mean 'defense'?; "
                                  "run-config key 'rlr_theta' is unknown; did you mean 'rlr-theta'?"),
    ("defense=rlr", "--run-config: cannot read 'defense=rlr' as TOML (strings need quotes"),
    ("rlr-theta=11", "run-config key 'rlr-theta': 11 exceeds the 10 clients sampled per round"),
])
def test_a_bad_config_is_one_line_and_exit_status_2(run_config, says, capsys):
    from simulation.run import main

    rc, out, err = _in_process(main, ["--run-config", run_config], capsys)
    assert rc == 2
    assert says in _one_failure_line(out, err)
    assert len((out + err).strip().splitlines()) == 1  # alone: no traceback, no Flower output


def test_the_entry_points_as_commands_fail_with_one_line(tmp_path):
    """``python -m simulation.run`` and the console script, as a user types them."""
    rc, out, err = _single_run("num-server-round=3")
    assert rc == 2 and "did you mean 'num-server-rounds'?" in _one_failure_line(out, err)
    assert len((out + err).strip().splitlines()) == 1 and "Traceback" not in out + err
    grid = tmp_path / "bad.toml"
    grid.write_text('[fixed]\nnum-server-round = 3\n[vary]\ndefense = ["fedavg"]\n')
    rc, out, err = _run([str(BIN / "fl-defense"), "run", str(grid), "--out", str(tmp_path / "out")])
    assert rc == 2 and "did you mean 'num-server-rounds'?" in _one_failure_line(out, err)
    assert len((out + err).strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_grid_that_asks_for_more_clients_than_it_has_fails_at_start(tmp_path, capsys):
    from simulation.__main__ import main

    grid = tmp_path / "small.toml"
    grid.write_text('[grid]\nnum-supernodes = 3\n[fixed]\ndefense = "rlr"\nrlr-theta = 4\n')
    rc, out, err = _in_process(main, ["run", str(grid), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "run-config key 'rlr-theta'" in _one_failure_line(out, err)
    grid.write_text('[fixed]\ndefense = "rlr"\nrlr-theta = \n')
    rc, out, err = _in_process(main, ["run", str(grid)], capsys)
    assert rc == 2 and f"grid file {grid}: " in _one_failure_line(out, err)


def test_usage_and_missing_files_fail_with_status(tmp_path, capsys):
    from simulation.__main__ import main

    rc, out, err = _in_process(main, [], capsys)
    assert rc == 2 and "fl-defense run <grid.toml>" in err
    rc, out, err = _in_process(main, ["report", str(tmp_path)], capsys)
    assert rc == 1 and "no runs (sub-folders with summary.json)" in _one_failure_line(out, err)
    rc, out, err = _in_process(main, ["run", str(tmp_path / "missing.toml")], capsys)
    assert rc == 1 and "missing.toml" in _one_failure_line(out, err)


# A federation that starts and then fails: every update is larger than max-update-norm, so every
# round is rejected and the global model never changes. Flower itself sees nothing wrong.
NO_PROGRESS = "defense='fedavg' num-server-rounds=1 local-epochs=1 max-update-norm=1e-9"


@pytest.mark.slow
def test_a_federation_that_fails_inside_exits_1_with_the_reason_and_the_log(tmp_path):
    rc, out, err = _single_run(f"{NO_PROGRESS} results-dir='{tmp_path}' run-name='stuck'")
    assert rc == 1
    line = _one_failure_line(out, err)
    assert "no round changed the global model in 1 rounds" in line
    assert "10 results rejected, 0 clients failed" in line and "fewer than the minimum" in line
    assert str(tmp_path / "stuck" / "flower.log") in line
    assert "Traceback" not in out + err
    log = (tmp_path / "stuck" / "flower.log").read_text()
    assert "update norm" in log or "max_update_norm" in log or "rejected" in log  # Flower's warnings, kept
    summary = json.loads((tmp_path / "stuck" / "summary.json").read_text())
    assert summary["rounds_kept_global"] == 1


@pytest.mark.slow
def test_an_exception_inside_the_federation_keeps_its_traceback_in_the_log(tmp_path):
    rc, out, err = _single_run(f"num-server-rounds=1 dataset='mnist' data-dir='{tmp_path / 'nowhere'}' "
                               f"results-dir='{tmp_path}' run-name='nodata'")
    assert rc == 1
    line = _one_failure_line(out, err)
    assert "FileNotFoundError: data-dir" in line and "flower.log" in line
    assert "Traceback" not in out + err
    assert "Traceback" in (tmp_path / "nodata" / "flower.log").read_text()


@pytest.mark.slow
def test_a_failing_grid_cell_ends_the_grid_with_one_line(tmp_path):
    grid = tmp_path / "stuck.toml"
    grid.write_text("[grid]\nname = 'stuck'\n[fixed]\n" + "\n".join(
        f"{k} = {v}" for k, v in (pair.split("=") for pair in NO_PROGRESS.split())) + "\n")
    rc, out, err = _run([str(BIN / "fl-defense"), "run", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    line = _one_failure_line(out, err)
    assert "cell 1/1" in line and "no round changed the global model" in line and "run the grid again" in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_flwr_run_ends_with_our_line_and_how_to_see_it_again(tmp_path):
    """Flower's own exit status stays 0 (its CLI's), but the stream ends with our line, without
    Flower's traceback of a config error; the SuperLink runs on ports of its own and is stopped after."""
    from simulation.superlink import stop_managed_superlink

    home = tmp_path / "flwr_home"
    env = {"FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    try:
        rc, out, err = _run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config",
                             f"defense='krumm' results-dir='{tmp_path}'", "--federation-config",
                             "num-supernodes=10"], timeout=400, **env)
        line = _one_failure_line(out, "")  # the run's stream is stdout; the CLI's own notes go to stderr
        assert FAILED not in err
        assert "run-config key 'defense': 'krumm'" in line
        run_id = line.split("(run ")[1].split(":")[0]
        assert f"`flwr log {run_id} --show`" in line and f"`flwr ls --run-id {run_id}`" in line
        assert "Traceback" not in out + err
        rc, out, err = _run([str(BIN / "flwr"), "ls", "--run-id", run_id, "--format", "json"], timeout=60, **env)
        (run,) = json.loads(out[out.index("{"):])["runs"]
        assert run["status"] == "finished:failed" and "krumm" in run["status-details"]
    finally:
        stop_managed_superlink(home)
