"""One switch silences every progress bar: ``dmlfast.progress.progress_bars`` and the commands' ``--no-progress``."""
import argparse

import pytest

from dmlfast import _cli
from dmlfast.evaluation.knn import progress_bar as search_bar
from dmlfast.progress import bars_enabled, progress_bar, progress_bars


def test_bars_are_drawn_unless_silenced(capsys):
    for _ in progress_bar(range(3), desc="shown", mininterval=0):
        pass
    assert "shown" in capsys.readouterr().err
    with progress_bars(False):
        assert not bars_enabled()
        for _ in progress_bar(range(3), desc="silenced", mininterval=0):
            pass
        assert search_bar(10, True, "tiles") is None  # the exact search's bar too, even when asked for
    assert bars_enabled()
    assert "silenced" not in capsys.readouterr().err


def test_the_switch_is_restored_after_an_error():
    with pytest.raises(RuntimeError), progress_bars(False):
        raise RuntimeError("boom")
    assert bars_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool, got str"):
        with progress_bars("no"):
            pass


@pytest.mark.parametrize("progress", [True, False])
def test_commands_run_with_bars_as_no_progress_says(progress):
    seen = []
    assert _cli.run_command("prog", lambda args: seen.append(bars_enabled()), argparse.Namespace(progress=progress)) == 0
    assert seen == [progress] and bars_enabled()
