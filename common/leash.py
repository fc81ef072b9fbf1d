"""``python -m fedcare.common.leash --parent PID -- COMMAND...``: run COMMAND on a leash held by
PID.

A fedcare command that is SIGKILLed cannot stop what it started, and Flower's SuperLink,
its SuperExec and a simulation's Ray cluster live in sessions of their own: they kept
running, and a simulation kept training. So fedcare starts such a process through this
leash. The leash asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``),
also checks every half second that PID is still its parent, and then stops COMMAND and
everything it spawned (:func:`fedcare.common.processes.supervise_group`). SIGTERM to the leash does
the same.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from fedcare.common.processes import Child, die_with_parent, module_command, supervise_group

__all__ = ["leash_command", "main"]


def leash_command(
    command: Sequence[str], *, parent: int | None = None, grace_s: float = 10.0
) -> list[str]:
    """``command`` on a leash held by ``parent`` (default: this process); ``grace_s``: how
    long each stopped process gets between SIGTERM and SIGKILL."""
    held_by = os.getpid() if parent is None else parent
    return [
        *module_command("fedcare.common.leash"), "--parent", str(held_by),
        "--grace", f"{grace_s:g}", "--", *command,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcare.common.leash")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("give the command after --")
    die_with_parent()
    if os.getppid() != args.parent:  # the parent died before the kernel was told
        return 1
    child = Child(Path(command[0]).name, command)
    return supervise_group([child], env=os.environ, grace_s=args.grace, parent_pid=args.parent)


if __name__ == "__main__":
    raise SystemExit(main())
