"""The ServerApp executor's command line, refused settings and task-process command, without
a SuperLink (``tests/security/test_centre_port.py`` runs the real one).

Every refusal must come before the executor connects anywhere or starts a task: ``main``
returns 2 with one ``error:`` line, and ``run_executor`` / ``run_task`` are replaced by
stand-ins that fail the test if reached.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

from fedcare.common.processes import module_command
from fedcare.server import executor


@pytest.fixture(autouse=True)
def _nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching the executor loop or a task would be a refusal that did not happen."""

    def unreachable(**kwargs: Any) -> NoReturn:
        raise AssertionError(f"the executor went on to run with {kwargs}")

    monkeypatch.setattr(executor, "run_executor", unreachable)
    monkeypatch.setattr(executor, "run_task", unreachable)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert executor.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


ADDRESS = ["--runtime-api-address", "127.0.0.1:9093"]


@pytest.mark.parametrize(
    "extra",
    [[], ["--insecure", "--root-certificates", "ca.crt"]],
    ids=["neither", "both"],
)
def test_exactly_one_of_tls_and_plain_text(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused([*ADDRESS, *extra, "--superexec-auth-secret-file", "s"], capsys)
    assert "give exactly one of --root-certificates CA_CERT and --insecure" in err


def test_a_missing_ca_certificate_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.crt"
    err = _refused([*ADDRESS, "--root-certificates", str(ca)], capsys)
    assert f"--root-certificates {ca}: no such file" in err


def test_the_secret_file_is_required_and_must_hold_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused([*ADDRESS, "--insecure"], capsys)
    assert "--superexec-auth-secret-file is required" in err
    missing = tmp_path / "superlink.superexec-secret"
    err = _refused([*ADDRESS, "--insecure", "--superexec-auth-secret-file", str(missing)], capsys)
    assert str(missing) in err and "fedcare server start` writes it" in err
    empty = tmp_path / "empty-secret"
    empty.write_text("", encoding="ascii")
    err = _refused([*ADDRESS, "--insecure", "--superexec-auth-secret-file", str(empty)], capsys)
    assert str(empty) in err


@pytest.mark.parametrize(
    "stdin",
    [
        "",
        "\n",
        "not-hex-at-all\n",
        "abc\n",
        "0123456789abcdeg\n",
        "A" * 20 + "\n",
        "f" * 257 + "\n",
    ],
    ids=["closed", "empty", "words", "short", "non-hex", "uppercase", "too-long"],
)
def test_a_task_process_refuses_anything_but_a_hex_token_on_stdin(
    stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    err = _refused([*ADDRESS, "--insecure", "--run-task"], capsys)
    assert "reads the task's token (hex) on its standard input" in err


def test_a_well_formed_token_is_read_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "0123456789abcdef" * 4
    monkeypatch.setattr("sys.stdin", io.StringIO(f"  {token}\nignored\n"))
    assert executor._read_token() == token


@pytest.mark.parametrize("ca", [None, Path("/etc/fedcare/ca.crt")])
def test_each_task_runs_in_its_own_process_watching_the_executor(ca: Path | None) -> None:
    cmd = executor._task_command(runtime_api_address="127.0.0.1:9093", root_certificates=ca)
    prefix = module_command("fedcare.server.executor")
    assert cmd[: len(prefix)] == prefix
    rest = cmd[len(prefix) :]
    assert rest[:5] == [
        "--run-task",
        "--runtime-api-address",
        "127.0.0.1:9093",
        "--parent-pid",
        str(os.getpid()),
    ]
    assert rest[5:] == (["--insecure"] if ca is None else ["--root-certificates", str(ca)])
