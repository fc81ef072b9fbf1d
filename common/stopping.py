"""Stop means stop: SIGTERM and SIGHUP end a fedcare command as Ctrl-C does.

By default Python dies on SIGTERM (what ``timeout``, systemd and a CI cancellation send)
and SIGHUP without running any ``finally``: the Flower and Ray processes a command started
were left running, and an orphaned simulation kept training and charging the sites'
ledgers. :func:`install` makes both raise :class:`Stopped` in the main thread instead, so
every ``with``/``finally`` that owns a process stops it
(:func:`fedcare.common.processes.stop_family`),
and the CLI prints one line: what stopped it, what was kept and how to resume
(:func:`set_resume_hint`). A second SIGTERM/SIGHUP during that cleanup is ignored, so the
cleanup finishes; a second Ctrl-C still interrupts it (the caller then kills at once).

A SIGKILL cannot be caught: for that, the processes a command starts watch their parent
(:mod:`fedcare.common.leash`, and ``PR_SET_PDEATHSIG`` in :mod:`fedcare.common.processes`).
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["Stopped", "install", "set_resume_hint", "resume_hint", "stop_message"]

_HANDLED = (signal.SIGTERM, signal.SIGHUP)
_hint: list[str] = []


class Stopped(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """The command was told to stop (SIGTERM or SIGHUP); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    for sig in _HANDLED:  # let the cleanup that follows finish
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def install() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Stopped` (main thread only)."""
    for sig in _HANDLED:
        signal.signal(sig, _raise)


def set_resume_hint(text: str) -> None:
    """What a stop keeps and how to go on, for the stop message (the latest wins)."""
    _hint[:] = [text]


def resume_hint() -> str | None:
    return _hint[0] if _hint else None


def stop_message(signum: int) -> str:
    """The one line a stopped command prints.

    >>> set_resume_hint("resume with --resume")
    >>> stop_message(15)
    'stopped by SIGTERM: every process it started was stopped; resume with --resume'
    """
    text = f"stopped by {signal.Signals(signum).name}: every process it started was stopped"
    hint = resume_hint()
    return f"{text}; {hint}" if hint else text
