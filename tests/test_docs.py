"""The documentation: the MkDocs site builds in strict mode (a broken link, anchor, nav entry or API
reference fails), its generated tables cover the registries, and the README's links resolve."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('mkdocs is not installed (pip install -e ".[docs]")')
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return out


def test_site_builds_strict_and_lists_every_key_and_defense(site):
    from fl_defense.config import ExperimentConfig
    from fl_defense.defenses import DEFENSES
    from fl_defense.strategies import STRATEGIES

    config = (site / "configuration" / "index.html").read_text()
    missing = [k for k in ExperimentConfig.keys() if f"<code>{k}</code>" not in config]
    assert not missing, f"run-config keys missing from the configuration page: {missing}"
    defenses = (site / "defenses" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in defenses for name in DEFENSES)
    api = (site / "api" / "strategies" / "index.html").read_text()
    for cls in STRATEGIES.values():
        assert f'id="fl_defense.strategies.legacy.{cls.__name__}"' in api
        assert f'id="fl_defense.strategies.message.{cls.__name__}"' in api
    assert (site / "results" / "fdcr_dirichlet" / "index.html").exists()  # generated reports are published


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t and not t.startswith("#")]
    assert targets, "the README links to the docs"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"
