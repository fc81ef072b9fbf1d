"""The runner stops its SuperLink and Ray in the background while it writes the summary and
plots, and never returns before they are stopped, nor hides a failure of either side.

The real runs (``test_runner``, ``test_sweep_superlink``) check that nothing is left running
after ``run_experiment`` returns; these check the order and the errors with a stand-in stack.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

import pytest

from fedcare.simulations.runner import _Teardown

#: Seconds a side waits for the other before the test fails (never reached when it passes).
_PATIENCE_S = 60.0


def test_the_teardown_runs_beside_the_block_and_is_done_when_it_ends(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("", encoding="utf-8")
    block_running, stopped = threading.Event(), threading.Event()

    def stop_flower() -> None:
        # Only a teardown that runs while the block runs sees the block's mark.
        if not block_running.wait(_PATIENCE_S):
            raise AssertionError("the teardown ran before the block, not beside it")
        stopped.set()

    stack = contextlib.ExitStack()
    stack.callback(stop_flower)
    with _Teardown(stack, home=home):
        block_running.set()
    assert stopped.is_set()  # joined before the block's exit returned
    assert not home.exists()


def test_a_failed_teardown_is_raised_after_a_good_block() -> None:
    stack = contextlib.ExitStack()

    def fail() -> None:
        raise OSError("the SuperLink would not stop")

    stack.callback(fail)
    with pytest.raises(OSError, match="would not stop"), _Teardown(stack, home=None):
        pass


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes: Python 3.11")
def test_the_blocks_own_error_wins_and_names_the_teardowns() -> None:
    stack = contextlib.ExitStack()

    def fail() -> None:
        raise OSError("the SuperLink would not stop")

    stack.callback(fail)
    with pytest.raises(ValueError, match="plots failed") as raised, _Teardown(stack, home=None):
        raise ValueError("plots failed")
    assert any("would not stop" in note for note in getattr(raised.value, "__notes__", []))


def test_an_interrupted_block_still_waits_for_the_teardown() -> None:
    released, stopped = threading.Event(), threading.Event()

    def stop_flower() -> None:
        if not released.wait(_PATIENCE_S):
            raise AssertionError("never released")
        stopped.set()

    stack = contextlib.ExitStack()
    stack.callback(stop_flower)
    with pytest.raises(KeyboardInterrupt), _Teardown(stack, home=None):
        released.set()
        raise KeyboardInterrupt
    assert stopped.is_set()
