"""Run Flower's own strategy unit tests against fl-defense's classes, only the import changed.

    python tests/run_flower_suite.py --flower-src PATH [pytest args]

PATH is a checkout of Flower's repository (its ``framework/py/flwr`` folder, or the repository
root, or a bare git directory: the files are read from its HEAD). The test files are read from
there at run time and written to a temporary folder, never into this project; beside them stand
shim modules that make each test's ``from .krum import Krum`` import our class instead of
Flower's. Test helpers Flower keeps in other test modules (``TestClientProxy``,
``create_mock_reply``) are loaded from the same checkout.

``tests/test_flower_oracle.py`` runs this when ``FLWR_SRC`` names such a checkout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# Flower's test files for the strategies we replace, and what their relative imports must see.
LEGACY_TESTS = ["fedavg_test.py", "krum_test.py", "multikrum_test.py", "bulyan_test.py", "fedmedian_test.py"]
MESSAGE_TESTS = ["multikrum_test.py", "bulyan_test.py", "fedmedian_test.py", "fedtrimmedavg_test.py"]

LEGACY_SHIMS = {
    "fedavg": "from fl_defense.strategies import FedAvg\n",
    "krum": "from fl_defense.strategies import Krum\n",
    "bulyan": "from fl_defense.strategies import Bulyan\n",
    "fedmedian": "from fl_defense.strategies import FedMedian\n",
}
MESSAGE_SHIMS = {
    "krum": "from fl_defense.strategies.message import Krum\n",
    "multikrum": "from fl_defense.strategies.message import MultiKrum\n",
    # Flower's Message-API Bulyan test exercises a module-level helper of Flower's, not the class.
    "bulyan": "from fl_defense.strategies.message import Bulyan\n"
              "from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights\n",
    "fedmedian": "from fl_defense.strategies.message import FedMedian\n",
    "fedtrimmedavg": "from fl_defense.strategies.message import FedTrimmedAvg\n",
    "strategy_utils": "from flwr.serverapp.strategy.strategy_utils import *  # noqa: F401,F403\n",
}

CONFTEST = '''
import sys, types
# Flower's legacy tests import TestClientProxy from flwr.server.client_manager_test (not shipped).
mod = types.ModuleType("flwr.server.client_manager_test")
exec(compile(open(__file__.replace("conftest.py", "client_manager_test_src.py")).read(), "client_manager_test", "exec"), mod.__dict__)
sys.modules["flwr.server.client_manager_test"] = mod
# Modules the checkout's tests import that this Flower release moved (flwr.common.parameter now
# lives in flwr.compat.common.parameter): the same module under its old name.
import importlib
for old, new in (("flwr.common.parameter", "flwr.compat.common.parameter"),):
    try:
        importlib.import_module(old)
    except ImportError:
        sys.modules[old] = importlib.import_module(new)
'''


class FlowerSource:
    """Reads files of Flower's ``framework/py/flwr`` tree from a folder or a git directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("", "framework/py/flwr", "flwr"):
            if (path / sub / "server" / "strategy").is_dir():
                self.root, self.git = path / sub, False
                return
        if (path / "HEAD").exists() or (path / ".git").exists():
            self.root, self.git = Path("framework/py/flwr"), True
            return
        raise SystemExit(f"--flower-src {path}: no framework/py/flwr folder and not a git directory")

    def read(self, rel: str) -> str:
        if not self.git:
            return (self.root / rel).read_text()
        return subprocess.run(["git", "-C", str(self.path), "show", f"HEAD:{self.root / rel}"],
                              check=True, capture_output=True, text=True).stdout


def write_suite(src: FlowerSource, out: Path) -> None:
    for pkg, tests, shims, base in (("legacy", LEGACY_TESTS, LEGACY_SHIMS, "server/strategy"),
                                    ("message", MESSAGE_TESTS, MESSAGE_SHIMS, "serverapp/strategy")):
        d = out / pkg
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
        for name, text in shims.items():
            (d / f"{name}.py").write_text(text)
        for test in tests:
            (d / f"flower_{test}").write_text(src.read(f"{base}/{test}"))
        if pkg == "message":  # create_mock_reply lives in Flower's strategy_utils_test
            (d / "strategy_utils_test.py").write_text(src.read(f"{base}/strategy_utils_test.py"))
    (out / "client_manager_test_src.py").write_text(src.read("server/client_manager_test.py"))
    (out / "conftest.py").write_text(CONFTEST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-src", type=Path, required=True)
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="flower-suite-") as tmp:
        write_suite(FlowerSource(args.flower_src), Path(tmp))
        # strategy_utils_test.py is there only for its helper (create_mock_reply); its own tests
        # test Flower's utilities, not our classes.
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", tmp, "-q",
               "-W", "ignore::DeprecationWarning", "--ignore", str(Path(tmp) / "message" / "strategy_utils_test.py"),
               *pytest_args, tmp]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    raise SystemExit(main())
