"""``fedcare audit verify``: clean runs verify; tampering, forging and cutting are found.

The unit tests drive the real server side (GuardedStrategy + ServerAudit, inside Flower's
own ``Strategy.start`` loop) against stand-in sites that write their real audit log
(SiteAudit) and answer like the ClientApp does, without training; one slow test runs a real
two-site simulation and tampers with what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from fedcare.client.accounting import Mechanism, independent_epsilon, merge_mechanisms
from fedcare.client.audit import AUDIT_KEY_NAME, AUDIT_LOG_NAME, SiteAudit, record_sha256
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import EvaluationResult, RoundResult
from fedcare.common import keys
from fedcare.common.audit import (
    AuditLog,
    AuditLogError,
    canonical_json,
    check_log,
    line_hash,
    load_or_create_signing_key,
    public_key_fingerprint,
    public_key_raw,
    read_entries,
)
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.run_files import RECORD_NAME
from fedcare.common.run_record import write_run_record
from fedcare.server.audit import SERVER_KEY, SERVER_LOG, ServerAudit
from fedcare.server.guard import GuardedStrategy
from fedcare.simulations.audit.findings import VerifyResult
from fedcare.simulations.audit.verify import run_config, run_dir_problems, verify_paths
from fedcare.simulations.audit.verify_cli import audit_verify
from tests._flower import task_identity

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; the test plays every role."""
    with task_identity(run_id=7):
        yield


# ------------------------------------------------------------------ a small federation


class FakeSite:
    """Answers train/evaluate like the ClientApp (same records, same audit calls), no data.

    ``under_report`` is subtracted from the ε it logs and reports; ``lie_to_server`` is
    further subtracted from the ε it reports to the server only.
    """

    def __init__(
        self,
        folder: Path,
        site_id: str,
        node: int,
        mechanism: Mechanism,
        *,
        under_report: float = 0.0,
        lie_to_server: float = 0.0,
    ) -> None:
        self.folder, self.site_id, self.node, self.mechanism = folder, site_id, node, mechanism
        self.under_report, self.lie_to_server = under_report, lie_to_server
        self.history: list[Mechanism] = []  # the dataset's whole history, across runs
        folder.mkdir(parents=True, exist_ok=True)
        self.audit = SiteAudit.open(
            folder / ".fedcare", site_id=site_id, dataset_fingerprint=f"fp-{site_id}"
        )

    @property
    def log(self) -> Path:
        return self.folder / ".fedcare" / AUDIT_LOG_NAME

    def _evaluate(
        self, msg: Message, rnd: int | None = None
    ) -> tuple[MetricRecord, dict[str, Any]]:
        """An exact evaluation, logged (under ``rnd`` where a train message carried it)."""
        exact = EvaluationResult({}, keys.EVAL_EXACT, None, None, None)
        self.audit.evaluate(msg, exact, delta=DELTA, accountant="prv", round=rnd)
        metrics = MetricRecord({keys.M_NUM_EXAMPLES: 20, "test.auroc": 0.7, "test.n": 20.0})
        return metrics, {keys.S_SITE_ID: self.site_id, keys.S_AUDIT_KEY: self.audit.key_fingerprint}

    def handle(self, msg: Message, run_config: dict[str, Any]) -> Message:
        TaskIdentity.node_id = self.node
        self.audit.start_run(msg, run_config=run_config)
        if msg.metadata.message_type == MessageType.EVALUATE:
            metrics, site = self._evaluate(msg)
            return Message(
                RecordDict({"metrics": metrics, "site": ConfigRecord(site)}), reply_to=msg
            )
        folded: dict[str, Any] = {}  # the round before's evaluation, first, where asked for
        if keys.CFG_EVALUATE_ROUND in msg.content[keys.REC_CONFIG]:
            before = int(msg.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND])  # type: ignore[arg-type]
            metrics, site = self._evaluate(msg, before)
            folded[keys.REC_EVAL_METRICS] = metrics
            folded[keys.REC_EVAL_SITE] = ConfigRecord({**site, keys.S_EVALUATED_ROUND: before})
        received = msg.content[keys.REC_ARRAYS]["w"].numpy()
        state = {"w": torch.from_numpy(received + np.float32(self.node / 100))}
        self.history.append(self.mechanism)
        eps = independent_epsilon(merge_mechanisms(self.history), delta=DELTA)
        eps += 0.004 - self.under_report  # a PRV-like upper bound, less any under-reporting
        result = RoundResult(state, 20, self.mechanism.steps, 0.5, self.mechanism, eps, DELTA, None)
        arrays = ArrayRecord(state)
        head = self.audit.train(msg, result, sent_sha256=record_sha256(arrays), accountant="prv")
        info = {
            keys.S_SITE_ID: self.site_id,
            keys.S_DP: True,
            keys.S_REPLAYED: False,
            keys.S_AUDIT_KEY: self.audit.key_fingerprint,
            keys.S_AUDIT_HEAD: str(head),
            keys.S_EPSILON: eps - self.lie_to_server,
            keys.S_DELTA: DELTA,
            keys.S_ACCOUNTANT: "prv",
            keys.S_NOISE_MULTIPLIER: self.mechanism.noise_multiplier,
            keys.S_SAMPLE_RATE: self.mechanism.sample_rate,
            keys.S_STEPS: self.mechanism.steps,
        }
        metrics = MetricRecord(
            {keys.M_NUM_EXAMPLES: 20, keys.M_TRAIN_LOSS: 0.5, keys.M_STEPS: self.mechanism.steps}
        )
        content = RecordDict(
            {"arrays": arrays, "metrics": metrics, "site": ConfigRecord(info), **folded}
        )
        return Message(content, reply_to=msg)


class FakeGrid:
    """Delivers each message to its site at once."""

    def __init__(self, sites: Sequence[FakeSite], run_config: dict[str, Any]) -> None:
        self.sites = {s.node: s for s in sites}
        self.run_config = run_config

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = [self.sites[m.metadata.dst_node_id].handle(m, self.run_config) for m in messages]
        TaskIdentity.node_id = 1
        return replies


def make_sites(
    root: Path, *specs: tuple[str, Mechanism], options: dict[str, dict[str, float]] | None = None
) -> list[FakeSite]:
    """Stand-in sites (site id, mechanism), with per-site FakeSite options."""
    return [
        FakeSite(root / site_id, site_id, 11 + i, mechanism, **(options or {}).get(site_id, {}))
        for i, (site_id, mechanism) in enumerate(specs)
    ]


def run_federation(run_dir: Path, sites: Sequence[FakeSite], *, run_id: str, rounds: int) -> Path:
    """What server/app.py's run_federation does, with the stand-in sites; returns run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sites.json").write_text(json.dumps([str(s.folder) for s in sites]))
    cfg = FederationConfig.from_run_config(
        {"run-id": run_id, "run-dir": str(run_dir), "num-server-rounds": rounds, "min-sites": 1}
    )
    n = len(sites)
    initial = ArrayRecord({"w": torch.zeros((2, 2))})
    audit = ServerAudit.open(run_dir, cfg, run_id=run_id)
    audit.run_start(cfg, model="m", model_sha256=record_sha256(initial))
    guard = GuardedStrategy(
        FedAvg(min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n),
        cfg=cfg,
        run_dir=run_dir,
        run_id=run_id,
        audit=audit,
    )
    grid = FakeGrid(sites, cfg.to_run_config())
    guard.evaluate_initial(grid, initial)  # type: ignore[arg-type]
    result = guard.start(
        grid=grid,  # type: ignore[arg-type]
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=60.0,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
        evaluate_fn=guard.after_round,
    )
    audit.run_end(rounds_completed=rounds, model_sha256=record_sha256(result.arrays))
    torch.save({"state_dict": result.arrays.to_torch_state_dict()}, run_dir / "final_model.pt")
    guard.record.finish()  # server_record.json, as the ServerApp writes it after run-end
    write_run_record(run_dir / RECORD_NAME, guard.record)
    return run_dir


MECH_A = Mechanism(1.1, 0.05, 40)
MECH_B = Mechanism(0.9, 0.08, 25)


@pytest.fixture(scope="module")
def _built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit-run")
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    try:
        sites = make_sites(root / "sites", ("site-a", MECH_A), ("site-b", MECH_B))
        run_federation(root / "run", sites, run_id="r1", rounds=2)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return root


@pytest.fixture()
def run(_built: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A fresh copy of a finished two-site, two-round run: (run dir, site folders)."""
    shutil.copytree(_built, tmp_path / "copy")
    run_dir, folders = (
        tmp_path / "copy" / "run",
        [tmp_path / "copy" / "sites" / "site-a", tmp_path / "copy" / "sites" / "site-b"],
    )
    (run_dir / "sites.json").write_text(json.dumps([str(f) for f in folders]))
    return run_dir, folders


def _site_log(folder: Path) -> Path:
    return folder / ".fedcare" / AUDIT_LOG_NAME


def _cli(*args: str) -> Any:
    app = typer.Typer()
    app.command()(audit_verify)
    return CliRunner().invoke(app, list(args))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def _line_of_kind(path: Path, kind: str, occurrence: int = -1) -> int:
    found = [i for i, ln in enumerate(_lines(path), 1) if json.loads(ln)["kind"] == kind]
    return found[occurrence]


def resign(path: Path, key: Ed25519PrivateKey, edit: Any = None) -> None:
    """Rewrite a whole log consistently with ``key``, as its writer (or a thief) could."""
    import base64

    prev, out = "0" * 64, []
    for line in _lines(path):
        entry = json.loads(line)
        if entry["kind"] == "log-open":
            entry["data"]["public_key"] = base64.b64encode(public_key_raw(key)).decode()
            entry["data"]["key_fingerprint"] = public_key_fingerprint(key)
        if edit is not None:
            edit(entry)
        entry["prev"] = prev
        body = {k: v for k, v in entry.items() if k != "sig"}
        entry["sig"] = base64.b64encode(key.sign(canonical_json(body))).decode()
        out.append(canonical_json(entry))
        prev = line_hash(out[-1])
    _write_lines(path, out)


# ------------------------------------------------------------------ tests


def test_a_clean_run_verifies(run: tuple[Path, list[Path]]) -> None:
    run_dir, sites = run
    result = verify_paths([run_dir])
    assert result.ok, result.cross_check_problems
    assert sorted(log.writer for log in result.logs) == ["server", "site-a", "site-b"]
    server = next(log for log in result.logs if log.writer == "server")
    kinds = [json.loads(ln)["kind"] for ln in _lines(run_dir / SERVER_LOG)]
    assert server.entries == len(kinds)
    # 1 open + start + 2 x (round-start, 2 updates, aggregate) + end; refusals: none
    assert kinds == ["log-open", "run-start"] + [
        "round-start",
        "update",
        "update",
        "aggregate",
    ] * 2 + ["run-end"]
    site_kinds = [json.loads(ln)["kind"] for ln in _lines(_site_log(sites[0]))]
    assert site_kinds == ["log-open", "run-start", "evaluate"] + ["train", "evaluate"] * 2
    out = _cli(str(run_dir))
    assert out.exit_code == 0, out.output
    assert out.output.count(", OK") == 3 and "verified: OK" in out.output
    # The same logs given one by one verify the same way.
    assert verify_paths([run_dir / SERVER_LOG, _site_log(sites[0]), _site_log(sites[1])]).ok


def test_a_flipped_byte_in_any_log_fails_naming_its_line(
    run: tuple[Path, list[Path]],
) -> None:
    run_dir, sites = run
    for path in (_site_log(sites[1]), run_dir / SERVER_LOG):
        original = path.read_bytes()
        line = _line_of_kind(path, "update" if path.name == "server.jsonl" else "train")
        start = sum(len(ln) + 1 for ln in _lines(path)[: line - 1])
        altered = bytearray(original)
        altered[start + 40] ^= 0x04
        path.write_bytes(bytes(altered))
        out = _cli(str(run_dir))
        assert out.exit_code == 1, out.output
        assert f"FIRST BAD LINE {line}: line {line} " in out.output, out.output
        assert "verified: FAILED" in out.output
        path.write_bytes(original)
    assert _cli(str(run_dir)).exit_code == 0


def test_a_site_log_cut_after_an_update_is_found_by_the_server_anchor(
    run: tuple[Path, list[Path]],
) -> None:
    run_dir, sites = run
    log = _site_log(sites[0])
    cut = _line_of_kind(log, "train")  # drop the last update and everything after it
    _write_lines(log, _lines(log)[: cut - 1])
    assert check_log(log).ok  # the shorter chain is valid on its own...
    result = verify_paths([run_dir])
    assert not result.ok  # ...but the server recorded the site's head and its update
    text = "\n".join(result.cross_check_problems)
    assert "entries were cut off the site site-a log" in text
    assert "does not record sending" in text


def test_a_damaged_run_record_is_named_not_compared(
    run: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    run_dir, _ = run
    record = run_dir / "server_record.json"
    good = record.read_text()
    try:
        raw = json.loads(good)
        raw["rounds_completed"] = "three"
        record.write_text(json.dumps(raw))
        problems = run_dir_problems(run_dir, check_log(run_dir / SERVER_LOG))
    finally:
        record.write_text(good)
    assert len(problems) == 1, problems
    assert f"{record}: field rounds_completed: Input should be a valid integer" in problems[0]
    assert "cannot be compared with the audit log" in problems[0]


def test_a_server_log_cut_is_found_by_the_sites_and_the_run_record(
    run: tuple[Path, list[Path]],
) -> None:
    run_dir, _ = run
    log = run_dir / SERVER_LOG
    lines = _lines(log)
    _write_lines(log, lines[:-1])  # run-end gone
    problems = verify_paths([run_dir]).cross_check_problems
    assert any("no run-end entry" in p for p in problems), problems
    _write_lines(log, lines[: _line_of_kind(log, "aggregate") - 1])  # last aggregate gone too
    problems = verify_paths([run_dir]).cross_check_problems
    assert any("entries were cut off the server log" in p for p in problems), problems


def test_a_server_rewriting_its_own_log_is_caught_by_the_sites(
    run: tuple[Path, list[Path]],
) -> None:
    run_dir, _ = run
    key = serialization.load_pem_private_key((run_dir / SERVER_KEY).read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)

    def forge(entry: dict[str, Any]) -> None:
        if entry["kind"] == "update" and entry["data"]["site_id"] == "site-b":
            entry["data"]["sha256"] = "0" * 64  # claim site-b sent something else

    resign(run_dir / SERVER_LOG, key, forge)
    result = verify_paths([run_dir])
    assert all(log.ok for log in result.logs)  # signed with the server's own key: valid alone
    text = "\n".join(result.cross_check_problems)
    assert "that the site's log does not record sending" in text
    assert "the server's log does not record receiving" in text


def test_a_server_log_replaced_and_re_signed_with_a_new_key_is_caught(
    run: tuple[Path, list[Path]],
) -> None:
    """A forger without the server's key rewrites the whole log under a key of their own."""
    run_dir, _ = run

    def forge(entry: dict[str, Any]) -> None:
        if entry["kind"] == "update":
            entry["data"]["sha256"] = "0" * 64
            entry["data"].get("site", {}).pop("key_fingerprint", None)

    resign(run_dir / SERVER_LOG, Ed25519PrivateKey.generate(), forge)
    result = verify_paths([run_dir])
    assert all(log.ok for log in result.logs)  # each log is internally consistent
    assert not result.ok
    assert any("replaced or re-keyed" in p for p in result.cross_check_problems)


def test_a_site_log_re_signed_with_another_key(
    run: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    run_dir, sites = run
    original_key = sites[0] / ".fedcare" / AUDIT_KEY_NAME
    resign(_site_log(sites[0]), Ed25519PrivateKey.generate())
    result = verify_paths([run_dir])
    assert all(log.ok for log in result.logs)
    assert any("reported audit key" in p for p in result.cross_check_problems)
    out = _cli(str(_site_log(sites[0])), "--key", f"site-a={original_key}")
    assert out.exit_code == 1 and "FIRST BAD LINE 1" in out.output, out.output
    assert "trusted key" in out.output


def test_trusted_keys_pass_and_a_key_for_a_missing_writer_fails(
    run: tuple[Path, list[Path]],
) -> None:
    run_dir, sites = run
    server_key = run_dir / SERVER_KEY
    site_key = sites[1] / ".fedcare" / AUDIT_KEY_NAME
    out = _cli(str(run_dir), "--key", f"server={server_key}", "--key", f"site-b={site_key}")
    assert out.exit_code == 0, out.output
    result = verify_paths([run_dir], trusted_keys={"site-z": b"\x01" * 32})
    assert not result.ok and "site-z" in result.cross_check_problems[0]


def test_a_site_telling_the_server_a_lower_epsilon_than_it_logged(tmp_path: Path) -> None:
    sites = make_sites(
        tmp_path / "sites",
        ("site-a", MECH_A),
        ("site-b", MECH_B),
        options={"site-b": {"lie_to_server": 0.5}},
    )
    run_dir = run_federation(tmp_path / "run", sites, run_id="r1", rounds=1)
    problems = verify_paths([run_dir]).cross_check_problems
    assert len(problems) == 1 and "site site-b" in problems[0] and "epsilon" in problems[0]


def test_a_run_started_again_in_the_same_folder_with_fresh_sites_verifies(
    tmp_path: Path,
) -> None:
    first = make_sites(tmp_path / "first", ("site-a", MECH_A), ("site-b", MECH_B))
    run_dir = run_federation(tmp_path / "run", first, run_id="r1", rounds=1)
    # Same run id and server key, new site folders (new keys, empty logs): a new session.
    second = make_sites(tmp_path / "second", ("site-a", MECH_A), ("site-b", MECH_B))
    run_federation(run_dir, second, run_id="r1", rounds=2)
    result = verify_paths([run_dir])
    assert result.ok, result.cross_check_problems
    old_logs = [s.log for s in first]
    assert verify_paths([run_dir, *old_logs]).ok  # each site log checked in its own session
    # A forger who re-signs site-a's current log drops nothing: its entries are in the
    # session, so the key the server logged gives it away.
    resign(second[0].log, Ed25519PrivateKey.generate())
    problems = verify_paths([run_dir]).cross_check_problems
    assert any("reported audit key" in p for p in problems), problems


def test_a_replaced_final_model_is_found(run: tuple[Path, list[Path]]) -> None:
    run_dir, _ = run
    torch.save({"state_dict": {"w": torch.ones((2, 2))}}, run_dir / "final_model.pt")
    problems = verify_paths([run_dir]).cross_check_problems
    assert any("final_model.pt is not the final model" in p for p in problems)


def test_json_output_and_user_errors(run: tuple[Path, list[Path]], tmp_path: Path) -> None:
    run_dir, _ = run
    out = _cli(str(run_dir), "--json")
    assert out.exit_code == 0
    assert VerifyResult.model_validate_json(out.output).ok
    with pytest.raises(ConfigError, match="no such file"):
        verify_paths([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no audit log found"):
        verify_paths([tmp_path / "empty"])
    out = _cli(str(run_dir), "--key", str(run_dir / SERVER_KEY))
    assert isinstance(out.exception, ConfigError) and "WRITER=KEYFILE" in str(out.exception)


# ------------------------------------------------------------------ hostile run directories

# What an auditor receives may hold anything; each file gives one clear error or a named
# verification problem, never a traceback. ``json.loads`` raises ValueError on an integer
# over Python's digit limit and RecursionError on nesting deeper than its stack.
_LONG_INT = "9" * 5000
_DEEP_ARRAY = "[" * 200_000
_DEEP_OBJECT = '{"a":' * 200_000


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(_DEEP_ARRAY.encode(), "not valid JSON (it nests too deeply)", id="deep-array"),
        pytest.param(
            _DEEP_OBJECT.encode(), "not valid JSON (it nests too deeply)", id="deep-object"
        ),
        pytest.param(f"[{_LONG_INT}]".encode(), "not valid JSON (Exceeds the limit", id="long-int"),
        pytest.param(b"\xff\xfe[]", "not valid JSON ('utf-8' codec", id="not-utf8"),
        pytest.param(b'{"site-a": "x"}', "not a JSON list of site folder names", id="object"),
        pytest.param(b'["a", 3]', "not a JSON list of site folder names", id="not-names"),
    ],
)
def test_a_hostile_sites_manifest_is_one_clear_error(
    run: tuple[Path, list[Path]], content: bytes, reason: str
) -> None:
    run_dir, _ = run
    manifest = run_dir / "sites.json"
    manifest.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        verify_paths([run_dir])
    message = str(info.value)
    assert message.startswith(f"{manifest}: {reason}"), message
    assert message.endswith(
        "the file is damaged or is not a fedcare run's: give the site logs as paths instead"
    )


def test_the_command_prints_one_line_for_a_hostile_run_directory(
    run: tuple[Path, list[Path]],
) -> None:
    run_dir, _ = run
    (run_dir / "sites.json").write_text(_DEEP_ARRAY)
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "audit", "verify", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1"},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    expected = f"error: {run_dir / 'sites.json'}: not valid JSON (it nests too deeply)"
    assert lines[0].startswith(expected)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param('{"rounds_planned": ' + _LONG_INT + "}", "Exceeds the limit", id="long-int"),
        pytest.param(_DEEP_ARRAY, "it nests too deeply", id="deep-array"),
    ],
)
def test_a_hostile_run_record_is_named_not_compared(
    run: tuple[Path, list[Path]], content: str, reason: str
) -> None:
    run_dir, _ = run
    record = run_dir / RECORD_NAME
    record.write_text(content)
    result = verify_paths([run_dir])
    assert not result.ok and all(log.ok for log in result.logs)
    assert any(
        p.startswith(f"{record}: not valid JSON ({reason}")
        and "not a fedcare run's" in p
        and p.endswith("cannot be compared with the audit log")
        for p in result.cross_check_problems
    ), result.cross_check_problems
    # Without the server's log, the run config (to locate logs) would come from the record.
    (run_dir / SERVER_LOG).unlink()
    assert run_config(run_dir) == {}
    assert verify_paths([run_dir]).ok  # the sites' logs, on their own


@pytest.mark.parametrize(
    ("which", "line", "content"),
    [
        pytest.param("server", 3, _DEEP_ARRAY, id="server-deep-array"),
        pytest.param("site", 1, _DEEP_OBJECT, id="site-first-line-deep-object"),
        pytest.param("server", None, '{"seq":' + _LONG_INT + "}", id="server-long-int-appended"),
        pytest.param("site", 4, "[" * 5_000 + "]" * 5_000, id="site-deep-closed-array"),
    ],
)
def test_a_hostile_audit_log_line_is_the_first_bad_line(
    run: tuple[Path, list[Path]], which: str, line: int | None, content: str
) -> None:
    run_dir, sites = run
    path = run_dir / SERVER_LOG if which == "server" else _site_log(sites[0])
    lines = _lines(path)
    if line is None:
        lines.append(content.encode())
        line = len(lines)
    else:
        lines[line - 1] = content.encode()
    _write_lines(path, lines)
    result = verify_paths([run_dir])
    bad = next(log for log in result.logs if Path(log.path).resolve() == path.resolve())
    assert not result.ok and bad.first_bad_line == line
    assert (
        bad.problem == f"line {line} not a JSON entry: its bytes were altered or the line was cut"
    )
    out = _cli(str(run_dir))
    assert out.exit_code == 1 and f"FIRST BAD LINE {line}: " in out.output, out.output
    with pytest.raises(AuditLogError, match=f"line {line} is not an audit entry"):
        read_entries(path)  # the unverified reader (the ε recomputation's)


def _retype(kind: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit for :func:`resign`: set ``field`` (``a.b`` inside an object) of the first
    ``kind`` entry's data to ``value``."""
    done: list[bool] = []

    def edit(entry: dict[str, Any]) -> None:
        if entry["kind"] != kind or done:
            return
        *outer, name = field.split(".")
        data = entry["data"]
        for key in outer:
            data = data[key]
        data[name] = value
        done.append(True)

    return edit


@pytest.mark.parametrize(
    ("which", "kind", "field", "value", "problem"),
    [
        ("server", "round-start", "round", "one", "round is 'one', not an integer or null"),
        ("server", "aggregate", "round", True, "round is True, not an integer or null"),
        ("server", "update", "round", [1], "round is a list, not an integer or null"),
        ("server", "update", "site", "not-a-dict", "site is 'not-a-dict', not an object or null"),
        ("server", "update", "site_id", 7, "site_id is 7, not a string"),
        ("server", "update", "sha256", {"a": 1}, "sha256 is an object, not a string or null"),
        (
            "server",
            "update",
            "site.key_fingerprint",
            ["k"],
            "site.key_fingerprint is a list, not a string or null",
        ),
        ("server", "run-end", "rounds_completed", "2", "rounds_completed is '2', not an integer"),
        ("site", "train", "round", "one", "round is 'one', not an integer or null"),
        ("site", "train", "mechanism", "dp", "mechanism is 'dp', not an object or null"),
        ("site", "train", "received_sha256", ["x"], "received_sha256 is a list, not a string"),
        ("site", "evaluate", "round", 1.0, "round is 1.0, not an integer or null"),
        ("site", "run-start", "config_sha256", {}, "config_sha256 is an object, not a string"),
        ("site", "train", "server_head", 3, "server_head is 3, not a string or null"),
    ],
)
def test_a_signed_entry_of_the_wrong_type_fails_verification_naming_it(
    run: tuple[Path, list[Path]], which: str, kind: str, field: str, value: Any, problem: str
) -> None:
    """The log's own key signed it, so the log verifies; no fedcare wrote it, so the run
    does not."""
    run_dir, sites = run
    if which == "server":
        path, key_file, who = run_dir / SERVER_LOG, run_dir / SERVER_KEY, "server"
    else:
        path, key_file = _site_log(sites[0]), sites[0] / ".fedcare" / AUDIT_KEY_NAME
        who = "site site-a"
    line = _line_of_kind(path, kind, 0)
    resign(path, load_or_create_signing_key(key_file), _retype(kind, field, value))
    result = verify_paths([run_dir])
    assert all(log.ok for log in result.logs)
    assert not result.ok
    named = f"{who} log line {line}: its {kind!r} entry's {problem}"
    assert any(p.startswith(named) for p in result.cross_check_problems), (
        result.cross_check_problems
    )
    out = _cli(str(run_dir))
    assert out.exit_code == 1 and "verified: FAILED" in out.output, out.output


def test_a_resume_entry_of_the_wrong_type_appended_by_the_real_writer(
    run: tuple[Path, list[Path]],
) -> None:
    import fedcare

    run_dir, _ = run
    key = load_or_create_signing_key(run_dir / SERVER_KEY)
    log = AuditLog(run_dir / SERVER_LOG, writer="server", key=key)
    data = {"config_sha256": "c", "model_sha256": "m", "config": {}, "after_round": [1]}
    log.append("run-resume", data, run_id="r1")
    line = len(_lines(run_dir / SERVER_LOG))
    result = fedcare.verify_run(run_dir)
    assert all(log.ok for log in result.logs) and not result.ok
    assert any(
        p.startswith(
            f"server log line {line}: its 'run-resume' entry's after_round is a list, not an "
            "integer: fedcare never writes that"
        )
        for p in result.cross_check_problems
    ), result.cross_check_problems


# ------------------------------------------------------------------ the real ClientApp


def test_the_client_app_logs_what_it_receives_sends_and_refuses(tmp_path: Path) -> None:
    from fedcare.client.app import handle_evaluate, handle_train
    from fedcare.client.data.loaders import load_site
    from fedcare.common.audit import code_hash, config_hash, load_or_create_signing_key
    from fedcare.simulations.synth import SynthConfig, synthesize
    from tests.client.test_app import _context, _message

    sites = tmp_path / "sites"
    synthesize(
        sites,
        n_sites=1,
        seed=5,
        config=SynthConfig(patients_per_site=120, n_genes=12, image_size=16),
    )
    # A fixed noise (no calibration) and the RDP accountant keep this test fast.
    ctx = _context(sites, tmp_path / "state", **{"noise-multiplier": 1.0, "accountant": "rdp"})
    server_head = "3:" + "ab" * 32

    def message(kind: str, rnd: int = 1) -> Message:
        msg = _message(sites, kind, rnd=rnd)
        msg.content[keys.REC_CONFIG][keys.CFG_AUDIT_HEAD] = server_head
        msg.content[keys.REC_CONFIG][keys.CFG_AUDIT_KEY] = "cd" * 32
        return msg

    msg = message("train")
    reply = handle_train(msg, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    handle_evaluate(message("evaluate"), ctx)
    bad = message("train", rnd=2)
    bad.content[keys.REC_CONFIG][keys.CFG_SCHEMA_FINGERPRINT] = "0" * 64
    assert handle_train(bad, ctx).has_error()

    state = tmp_path / "state" / "site-0"
    log = state / AUDIT_LOG_NAME
    check = check_log(log)
    assert check.ok and check.writer == "site-0"
    assert [e.kind for e in check.entries] == [
        "log-open",
        "run-start",
        "train",
        "evaluate",
        "refused",
    ]
    key = load_or_create_signing_key(state / AUDIT_KEY_NAME)  # 0600, or this raises
    site = reply.content[keys.REC_SITE]
    assert site[keys.S_AUDIT_KEY] == public_key_fingerprint(key) == check.key_fingerprint
    train = check.entries[2]
    assert site[keys.S_AUDIT_HEAD] == f"3:{train.sha256}"
    start, data = check.entries[1].data, train.data
    assert start["config_sha256"] == config_hash(
        FederationConfig.from_run_config(ctx.run_config).to_run_config()
    )
    assert start["code_sha256"] == code_hash() and start["server_key"] == "cd" * 32
    # The ledger's cohort key (site-salted hash of the patient ids), not the files' bytes.
    ledger = PrivacyLedger(state / "ledger.sqlite", create=False)
    patients = load_site(sites / "site-0").patient_ids
    assert start["dataset_fingerprint"] == ledger.cohort_key(patients)
    assert data["received_sha256"] == record_sha256(msg.content[keys.REC_ARRAYS])
    assert data["sent_sha256"] == record_sha256(reply.content[keys.REC_ARRAYS])
    assert data["server_head"] == server_head and train.run_id == "run-a"
    assert data["epsilon"] == site[keys.S_EPSILON] and data["delta"] == site[keys.S_DELTA]
    assert data["mechanism"] == {
        "noise_multiplier": site[keys.S_NOISE_MULTIPLIER],
        "sample_rate": site[keys.S_SAMPLE_RATE],
        "steps": site[keys.S_STEPS],
    }
    refused = check.entries[4].data
    assert refused["round"] == 2 and refused["code"] == keys.ERR_CONFIG
    assert "schema" in refused["reason"] and refused["phase"] == "train"


# ------------------------------------------------------------------ a real simulation


# The same checks on a real federation's logs: tests/integration/test_audit.py.
