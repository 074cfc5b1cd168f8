"""The strategy classes' type stubs (for IDEs and type checkers) match the generated classes."""

from fl_defense.strategies import stubs


def test_stubs_are_up_to_date():
    stale = [path.name for path, text in stubs.stub_files().items() if not path.exists() or path.read_text() != text]
    assert not stale, f"{stale} are out of date: run python -m fl_defense.strategies.stubs"


def test_stub_lists_every_argument_with_its_default():
    from fl_defense.strategies import legacy
    text = stubs.render(legacy)
    rlr = next(line for line in text.splitlines() if line.startswith("    def __init__") and "theta: int = 4" in line)
    for name in ("fraction_fit: float = 1.0", "server_lr: float = 1.0", "max_update_norm: float = 0.0",
                 "max_rounds_without_valid: int = 3"):
        assert name in rlr
    assert "FedMedian = Median" in text
