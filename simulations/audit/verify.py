"""Check a run's audit logs and cross-check server against sites (``fedcare audit verify``).

Each log is verified on its own (:func:`fedcare.common.audit.check_log`: every line intact, in
sequence, chained and signed by the key its log-open entry declares, or by the trusted key
given for its writer). A ``recovery`` entry (the writer cut an incomplete last line that a
crash or a full disk left, and recorded the cut) is printed as a notice, not an error.
When the server's log and a site's log are both at hand, they are checked against each
other. A server log is read as sessions (each ``run-start`` of a run,
with its ``run-resume`` entries); a site entry belongs to the session of the server-log head
it recorded. For every session a site's log has entries in:

* the key the site signs its log with is the key the server logged for that site;
* every update the site logged as sent reached the server's log (as accepted or rejected)
  with the same hash and the same privacy report, unless the server logged the site as
  dropped in that round; every update the server logged from the site is in the site's log;
* every global model the site logged as received is the one the server logged for that
  round (sent for training, or aggregated before evaluation);
* a refusal the site logged is in the server's log;
* the log heads each side recorded from the other exist in that log: a log whose last
  entries were cut off, or that was rewritten and re-signed, shows here.

An entry that verifies but has a field of a type fedcare never writes (a forged log, or one
edited and re-signed) is a problem of its own and takes no part in the cross-checks.

In a session a site's log has no entry in (its state was reset since, or the log predates
it), only updates the server logged with that log's key must be in it. Every site
``run-start`` must carry a config hash the server logged for the run. For a run directory,
the server's final model must be its last aggregate, ``server_record.json`` (written after
``run-end``) needs a matching ``run-end`` entry, and ``final_model.pt`` must be the model
that entry names.

A path is a ``.jsonl`` log or a run directory: ``<run>/audit/server.jsonl`` plus every site
log found through ``<run>/sites.json`` (``<site>/.fedcare/audit.jsonl``) and, when the run
config set ``state-root``, ``<state-root>/<site-id>/audit.jsonl``. A deployment's site logs
stay at the sites: give them as paths.

Limits: a log alone cannot show that its last whole entries were cut off (the anchors
above and ``run-end`` do, up to the last head the other side recorded), and a log replaced
wholesale by one signed with another key is only caught where the other side's log
covers the same session, or with ``--key``: publish each writer's key fingerprint.

This module is the verifier, a library; the command is
:func:`fedcare.simulations.audit.verify_cli.audit_verify`.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcare.common import audit_kinds as kinds
from fedcare.common.audit import LoggedEntry, LogHead, LogVerification, check_log, hash_arrays
from fedcare.common.errors import ConfigError, FedcareError
from fedcare.common.files import read_json_file
from fedcare.common.run_files import (
    CONFIG_NAME,
    FINAL_MODEL_NAME,
    RECORD_NAME,
    SERVER_AUDIT_LOG,
    SITE_AUDIT_LOG,
    SITE_STATE_DIR,
    SITES_MANIFEST_NAME,
)
from fedcare.common.run_record import load_run_record
from fedcare.common.spec import load_site_spec
from fedcare.common.tomlcompat import tomllib
from fedcare.simulations.audit.findings import LogCheck, VerifyResult

__all__ = [
    "SERVER_WRITER",
    "SERVER_LOG",
    "SITE_LOG",
    "RunLogs",
    "find_run_logs",
    "run_dir_problems",
    "run_config",
    "verify_paths",
    "cross_check",
]

SERVER_WRITER = kinds.SERVER_WRITER
SERVER_LOG = SERVER_AUDIT_LOG
SITE_LOG = SITE_AUDIT_LOG


@dataclass(frozen=True)
class RunLogs:
    """The audit logs of one run directory."""

    server: Path | None
    sites: tuple[Path, ...]


#: Server events about one site in one round, matched against the site's own refusals.
_SITE_EVENTS = frozenset(kinds.SERVER_EVENT_KINDS) - {kinds.ROUND_SKIPPED}
#: What the server logs when a site refused (or failed) training, or evaluation.
_TRAIN_REFUSALS = frozenset({kinds.REFUSED, kinds.FAILED, kinds.DIVERGED, kinds.DROPPED})
_EVALUATE_REFUSALS = frozenset({kinds.EVALUATE_FAILED, kinds.DROPPED})


def _lenient_entries(path: Path) -> list[dict[str, Any]]:
    """Entries that parse, skipping lines that do not (for locating files only)."""
    out: list[dict[str, Any]] = []
    try:
        content = path.read_bytes()
    except OSError:
        return out
    for line in content.split(b"\n"):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, an overlong integer, too deep
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run config of a run directory: from the server's audit log, else ``config.toml``
    (``[federation]``), else ``server_record.json``; ``{}`` when none is readable.

    Only used to locate files: a damaged record is reported by :func:`run_dir_problems`."""
    run_dir = Path(run_dir)
    server = run_dir / SERVER_LOG
    if server.is_file():
        for entry in _lenient_entries(server):
            data = entry.get("data")
            if entry.get("kind") in kinds.SERVER_START_KINDS and isinstance(data, dict):
                config = data.get("config")
                if isinstance(config, dict):
                    return config
    toml = run_dir / CONFIG_NAME
    if toml.is_file():
        try:
            federation = tomllib.loads(toml.read_text(encoding="utf-8")).get("federation")
        except (OSError, ValueError, RecursionError):  # unreadable, not TOML, too deep
            federation = None
        if isinstance(federation, dict):
            return federation
    record = run_dir / RECORD_NAME
    if record.is_file():
        with contextlib.suppress(ConfigError):  # damaged: run_dir_problems says so
            return dict(load_run_record(record).config)
    return {}


def find_run_logs(run_dir: Path) -> RunLogs:
    """The server log and the site logs of a run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    server = run_dir / SERVER_LOG
    state_root = str(run_config(run_dir).get("state-root") or "")
    folders: list[Path] = []
    manifest = run_dir / SITES_MANIFEST_NAME
    if manifest.is_file():
        folders = _manifest_folders(manifest)
    sites: list[Path] = []
    for folder in folders:
        sites.append(folder / SITE_STATE_DIR / SITE_LOG)
        if state_root:
            try:
                site_id = load_site_spec(folder).site_id
            except FedcareError:
                continue
            sites.append(Path(state_root) / site_id / SITE_LOG)
    if state_root and not folders:
        sites.extend(sorted(Path(state_root).glob(f"*/{SITE_LOG}")))
    found = list(dict.fromkeys(p.resolve() for p in sites if p.is_file()))
    return RunLogs(server if server.is_file() else None, tuple(found))


def _manifest_folders(manifest: Path) -> list[Path]:
    """The site folders ``sites.json`` lists.

    Raises
    ------
    ConfigError
        The file cannot be read, or is not a JSON list of folder names.
    """
    fix = "the file is damaged or is not a fedcare run's: give the site logs as paths instead"
    listed: Any = read_json_file(manifest, fix=fix)
    if not isinstance(listed, list) or not all(isinstance(p, str) and p for p in listed):
        raise ConfigError(f"{manifest}: not a JSON list of site folder names; {fix}")
    return [Path(p) for p in listed]


def _as_check(v: LogVerification) -> LogCheck:
    return LogCheck(
        path=v.path,
        writer=v.writer,
        key_fingerprint=v.key_fingerprint,
        entries=v.lines,
        ok=v.ok,
        first_bad_line=v.first_bad_line,
        problem=v.problem,
        notices=list(v.notices),
    )


def _declared_writer(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, RecursionError):  # check_log names what is wrong
        return None
    writer = first.get("writer") if isinstance(first, dict) else None
    return writer if isinstance(writer, str) else None


def _expand(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            logs = find_run_logs(path)
            found = ([logs.server] if logs.server else []) + list(logs.sites)
            if not found:
                raise ConfigError(
                    f"{path}: no audit log found (neither {SERVER_LOG} nor site logs via "
                    f"{SITES_MANIFEST_NAME}); give the .jsonl files themselves"
                )
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    return list(dict.fromkeys(p.resolve() for p in out))


def verify_paths(
    paths: Sequence[Path], *, trusted_keys: Mapping[str, bytes] | None = None
) -> VerifyResult:
    """Verify every log the paths name, then cross-check the server's against the sites'.

    Parameters
    ----------
    paths:
        ``.jsonl`` logs and/or run directories.
    trusted_keys:
        Writer (``"server"`` or a site id) -> its raw Ed25519 public key, obtained out of
        band; such a writer's log must be signed with exactly that key.

    Raises
    ------
    ConfigError
        If a path does not exist, or a run directory holds no log.
    """
    trusted = dict(trusted_keys or {})
    verifications = []
    for path in _expand(paths):
        writer = _declared_writer(path)
        key = trusted.get(writer) if writer is not None else None
        verifications.append(check_log(path, trusted_key=key))
    problems = [
        f"a trusted key was given for writer {w!r}, but no log of {w!r} was found (or its "
        "log names another writer): that log is missing or was replaced"
        for w in sorted(trusted)
        if not any(v.writer == w for v in verifications)
    ]
    problems.extend(cross_check(verifications))
    for path in paths:
        if Path(path).is_dir():
            server = (Path(path) / SERVER_LOG).resolve()
            found = [v for v in verifications if Path(v.path) == server]
            problems.extend(run_dir_problems(Path(path), found[0] if found else None))
    checks = [_as_check(v) for v in verifications]
    return VerifyResult(
        ok=all(c.ok for c in checks) and not problems,
        logs=checks,
        cross_check_problems=problems,
    )


def run_dir_problems(run_dir: Path, server: LogVerification | None) -> list[str]:
    """What a run directory's outputs say that its server log must agree with.

    ``server_record.json`` is written after the server logged ``run-end``: its run must
    have a ``run-end`` entry with the same rounds completed; ``final_model.pt`` must be the
    model that entry names.
    """
    record_path = run_dir / RECORD_NAME
    if server is None or not record_path.is_file():
        return []
    try:
        record = load_run_record(record_path)
    except ConfigError as e:
        return [f"{e}; it cannot be compared with the audit log"]
    run_id, rounds = record.run_id, record.rounds_completed
    ends = [e for e in server.entries if e.kind == kinds.RUN_END and e.run_id == run_id]
    if not ends:
        if not server.ok:
            return []  # already reported: the log is broken before its end
        return [
            f"{record_path.name} says run {run_id} finished, but the server log has no "
            "run-end entry for it: entries were cut off the server log"
        ]
    end = ends[-1]
    problems = []
    if end.data.get("rounds_completed") != rounds:
        problems.append(
            f"{record_path.name} says {rounds} rounds completed, the server log's run-end "
            f"(line {end.line}) says {end.data.get('rounds_completed')}"
        )
    model_path = run_dir / FINAL_MODEL_NAME
    if model_path.is_file():
        import torch  # heavy; only needed here

        try:
            state = torch.load(model_path, weights_only=True)["state_dict"]
            sha256 = hash_arrays({k: v.detach().cpu().numpy() for k, v in state.items()})
        except (OSError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            return [*problems, f"{model_path} is unreadable ({e})"]
        if sha256 != end.data.get("model_sha256"):
            problems.append(
                f"{model_path.name} is not the final model the server log's run-end (line "
                f"{end.line}) names: the model file was replaced"
            )
    return problems


# --------------------------------------------------------------------------- entry types


@dataclass(frozen=True)
class _FieldType:
    """What a data field the cross-checks read must hold: one of ``types`` (a JSON
    ``true``/``false`` is never an integer), described as ``expected``."""

    types: tuple[type, ...]
    expected: str

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)


_NULL = type(None)
_INT = _FieldType((int,), "an integer")
_INT_OR_NULL = _FieldType((int, _NULL), "an integer or null")
_STR = _FieldType((str,), "a string")
_STR_OR_NULL = _FieldType((str, _NULL), "a string or null")
_OBJECT_OR_NULL = _FieldType((dict, _NULL), "an object or null")

#: The type of each entry data field the cross-checks read, in whichever kind of entry it
#: stands: what the writers (``server/audit.py``, ``client/audit.py``) always write.
_FIELD_TYPES: dict[str, _FieldType] = {
    "round": _INT_OR_NULL,
    "after_round": _INT,
    "rounds_completed": _INT,
    "site_id": _STR,
    "phase": _STR,
    "site": _OBJECT_OR_NULL,
    "mechanism": _OBJECT_OR_NULL,
    **dict.fromkeys(
        (
            "config_sha256",
            "model_sha256",
            "sha256",
            "sent_sha256",
            "received_sha256",
            "server_head",
            "server_key",
        ),
        _STR_OR_NULL,
    ),
}
#: The same for the fields of a server ``update``/``rejected`` entry's ``site`` object.
_SITE_REPORT_TYPES: dict[str, _FieldType] = {
    "key_fingerprint": _STR_OR_NULL,
    "audit_head": _STR_OR_NULL,
}

_SHOWN_CHARS = 40


def _shown(value: Any) -> str:
    """A short description of a field's value for a problem (a container by its type only:
    it may be long or nested deep)."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _type_problem(data: Mapping[str, Any]) -> str | None:
    """Which field of an entry's data has a type fedcare never writes (``None``: none)."""
    site = data.get("site")
    for fields, types, prefix in ((data, _FIELD_TYPES, ""), (site, _SITE_REPORT_TYPES, "site.")):
        if not isinstance(fields, dict):
            continue  # a ``site`` that is not an object is a problem of ``data`` already
        for name, rule in types.items():
            if name in fields and not rule.admits(fields[name]):
                return f"{prefix}{name} is {_shown(fields[name])}, not {rule.expected}"
    return None


def _typed_entries(log: LogVerification, who: str) -> tuple[list[LoggedEntry], list[str]]:
    """The verified entries of ``log`` whose fields have the types fedcare writes, and a
    problem naming each entry that has another (it is left out of the cross-checks).

    Such an entry verifies (it was signed with the log's key) but no fedcare wrote it: a
    forged log, or one edited and re-signed."""
    entries: list[LoggedEntry] = []
    problems: list[str] = []
    for e in log.entries:
        problem = _type_problem(e.data)
        if problem is None:
            entries.append(e)
        else:
            problems.append(
                f"{who} log line {e.line}: its {e.kind!r} entry's {problem}: fedcare never "
                "writes that, so the entry was forged or edited and re-signed; it is left out "
                "of the cross-checks"
            )
    return entries, problems


# --------------------------------------------------------------------------- cross-checks


@dataclass
class _Session:
    """One start of a run in a server log (``run-start``, with any later ``run-resume``)."""

    run_id: str
    start_line: int
    config: set[str] = field(default_factory=set)
    initial: set[str] = field(default_factory=set)
    sent: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    aggregated: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    updates: dict[tuple[str, int], list[LoggedEntry]] = field(
        default_factory=lambda: defaultdict(list)
    )
    events: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    site_keys: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    last_aggregate: str | None = None
    #: Secure-aggregation rounds (server/secagg.py): round -> the server's ``secagg`` entry.
    secure: dict[int, LoggedEntry] = field(default_factory=dict)


@dataclass
class _ServerIndex:
    """What one server log says, session by session."""

    log: LogVerification
    sessions: list[_Session] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, log: LogVerification) -> _ServerIndex:
        entries, problems = _typed_entries(log, "server")
        index = cls(log, problems=problems)
        current: dict[str, _Session] = {}
        for e in entries:
            run, d = e.run_id or "", e.data
            rnd: Any = d.get("round")
            if e.kind == kinds.RUN_START or (e.kind == kinds.RUN_RESUME and run not in current):
                current[run] = _Session(run, e.line)
                index.sessions.append(current[run])
            session = current.get(run)
            if session is None or (rnd is None and e.kind in _ROUND_KINDS):
                continue
            _index_entry(session, e, index.problems)
        return index

    def session_of(self, e: LoggedEntry) -> _Session | None:
        """The session a site entry belongs to: same run id and server key, and the last
        start of that run at or before the server-log line the entry recorded as head."""
        key = e.data.get("server_key")
        if key and key != self.log.key_fingerprint:
            return None
        candidates = [s for s in self.sessions if s.run_id == (e.run_id or "")]
        try:
            seq = LogHead.parse(str(e.data.get("server_head"))).seq
        except ValueError:
            return candidates[-1] if candidates else None  # no head recorded: the latest
        before = [s for s in candidates if s.start_line <= seq]
        return before[-1] if before else None


_ROUND_KINDS = frozenset({kinds.ROUND_START, kinds.AGGREGATE, *kinds.SERVER_UPDATE_KINDS})


def _index_entry(session: _Session, e: LoggedEntry, problems: list[str]) -> None:
    d = e.data
    rnd: Any = d.get("round")
    if e.kind in kinds.SERVER_START_KINDS:
        session.config.add(str(d.get("config_sha256")))
        if e.kind == kinds.RUN_START:
            session.initial.add(str(d.get("model_sha256")))
        else:
            session.aggregated[int(d.get("after_round", 0))].add(str(d.get("model_sha256")))
    elif e.kind == kinds.ROUND_START:
        session.sent[int(rnd)].add(str(d.get("model_sha256")))
    elif e.kind == kinds.AGGREGATE:
        session.aggregated[int(rnd)].add(str(d.get("model_sha256")))
        session.last_aggregate = str(d.get("model_sha256"))
    elif e.kind in kinds.SERVER_UPDATE_KINDS:
        site_id = str(d.get("site_id"))
        session.updates[(site_id, int(rnd))].append(e)
        fingerprint = (d.get("site") or {}).get("key_fingerprint")
        if fingerprint:
            session.site_keys[site_id].append((e.line, str(fingerprint)))
    elif e.kind in _SITE_EVENTS and rnd is not None:
        session.events[(str(d.get("site_id")), int(rnd))].add(e.kind)
    elif e.kind == kinds.SECAGG and rnd is not None:
        session.secure[int(rnd)] = e
    elif (
        e.kind == kinds.RUN_END
        and session.last_aggregate is not None
        and d.get("model_sha256") != session.last_aggregate
    ):
        problems.append(
            f"server log line {e.line}: the final model of run {session.run_id} is not the "
            "last aggregate the log records"
        )


def _anchor(head: Any, target: LogVerification, who: str, where: str) -> str | None:
    """A problem if ``head`` ("seq:sha256") does not name a line of ``target``."""
    if not head:
        return None
    try:
        parsed = LogHead.parse(str(head))
    except ValueError:
        return f"{where}: recorded a malformed log head {head!r} of the {who} log"
    if parsed.seq <= len(target.entries):
        if target.entries[parsed.seq - 1].sha256 != parsed.sha256:
            return (
                f"{where}: recorded line {parsed.seq} of the {who} log with a hash that differs "
                f"from that line now: the {who} log was rewritten"
            )
        return None
    if target.ok:
        return (
            f"{where}: recorded line {parsed.seq} of the {who} log, which ends at line "
            f"{len(target.entries)}: entries were cut off the {who} log"
        )
    return None  # the target log is already reported broken before that line


_REPORT_FIELDS = ("epsilon", "delta", *kinds.MECHANISM_FIELDS)


def _report_differs(site_data: dict[str, Any], server_site: dict[str, Any]) -> list[str]:
    mechanism = site_data.get("mechanism") or {}
    mine = {
        "epsilon": site_data.get("epsilon"),
        "delta": site_data.get("delta"),
        **{k: mechanism.get(k) for k in kinds.MECHANISM_FIELDS},
    }
    if not site_data.get("dp"):
        return [] if not server_site.get("dp") else ["dp"]
    return [k for k in _REPORT_FIELDS if server_site.get(k) != mine[k]]


def _check_site(
    server: _ServerIndex, site: LogVerification, entries: Sequence[LoggedEntry]
) -> list[str]:
    """Cross-check one site's log (its well-typed ``entries``) against one server log,
    session by session."""
    problems: list[str] = []
    w = site.writer
    by_session: dict[int, list[LoggedEntry]] = defaultdict(list)
    server_runs = {s.run_id for s in server.sessions}
    rekeyed: set[str] = set()
    for e in entries:
        key = e.data.get("server_key")
        run = e.run_id or ""
        if key and key != server.log.key_fingerprint and run in server_runs and run not in rekeyed:
            rekeyed.add(run)
            problems.append(
                f"site {w} log line {e.line}: run {run} was served by a server whose audit key "
                f"is {str(key)[:16]}..., but the server log {server.log.path} is signed with "
                f"{server.log.key_fingerprint[:16]}...: the server log was replaced or re-keyed"
            )
        if e.kind == kinds.RUN_START:
            configs = [s.config for s in server.sessions if s.run_id == (e.run_id or "")]
            key = e.data.get("server_key")
            if (
                configs
                and (not key or key == server.log.key_fingerprint)
                and e.data.get("config_sha256") not in set().union(*configs)
            ):
                problems.append(
                    f"site {w} log line {e.line}: run {e.run_id} ran with a config the "
                    "server's log does not hold"
                )
            continue
        session = server.session_of(e)
        if session is not None:
            by_session[session.start_line].append(e)
    for session in server.sessions:
        entries = by_session.get(session.start_line, [])
        if entries:  # the site's log covers this session: both sides must agree
            problems.extend(_check_session(server, session, site, entries))
        else:
            problems.extend(_unmatched_updates(session, site))
    return problems


def _unmatched_updates(session: _Session, site: LogVerification) -> list[str]:
    """Updates logged from the site, signed with its key, in a session its log misses."""
    return [
        f"server log line {e.line}: an update from site {site.writer} in round "
        f"{e.data.get('round')}, reported with the key of the site's log, that the site's log "
        "does not record (a forged update, or the site's log was cut short)"
        for (site_id, _), updates in sorted(session.updates.items())
        if site_id == site.writer
        for e in updates
        # A site always reports its key; an update without one is as suspect as one with it.
        if (e.data.get("site") or {}).get("key_fingerprint") in (site.key_fingerprint, None, "")
    ]


def _check_session(
    server: _ServerIndex, session: _Session, site: LogVerification, entries: list[LoggedEntry]
) -> list[str]:
    problems: list[str] = []
    w, run = site.writer, session.run_id
    for line, fingerprint in session.site_keys.get(w, []):
        if fingerprint != site.key_fingerprint:
            problems.append(
                f"server log line {line}: site {w} reported audit key {fingerprint[:16]}..., "
                f"but its log {site.path} is signed with {site.key_fingerprint[:16]}...: one "
                "of them is not the site's"
            )
            break
    sent: dict[int, set[str]] = defaultdict(set)
    refusals: set[tuple[int, str]] = set()
    for e in entries:
        d, rnd = e.data, e.data.get("round")
        where = f"site {w} log line {e.line}"
        problem = _anchor(d.get("server_head"), server.log, "server", where)
        if problem:
            problems.append(problem)
        if rnd is None:
            continue
        if e.kind == kinds.TRAIN:
            sent[int(rnd)].add(str(d.get("sent_sha256")))
            problems.extend(_check_train(session, w, e, where))
        elif e.kind in (kinds.EVALUATE, kinds.PERSONALIZE):  # personalize: a fine-tune of it
            models = session.initial if int(rnd) == 0 else session.aggregated[int(rnd)]
            if d.get("received_sha256") not in models:
                what = "evaluated" if e.kind == kinds.EVALUATE else "fine-tuned"
                problems.append(
                    f"{where}: {what} a model (round {rnd}) that is not the global model the "
                    "server's log records for that round"
                )
        elif e.kind == kinds.REFUSED:
            refusals.add((int(rnd), str(d.get("phase"))))
        elif e.kind == kinds.SECAGG:
            problems.extend(_check_secagg(session, w, e, where))
    for rnd, phase in sorted(refusals):
        logged = session.events.get((w, rnd), set())
        wanted = _EVALUATE_REFUSALS if phase == "evaluate" else _TRAIN_REFUSALS
        if not logged & wanted:
            problems.append(
                f"site {w} logged refusing {phase} in round {rnd} of run {run}, but the "
                "server's log has no refusal from it in that round"
            )
    for (site_id, rnd), updates in sorted(session.updates.items()):
        if site_id != w:
            continue
        for e in updates:
            if rnd in session.secure:
                # A secure round: the server received the survivors' sum, never this site's
                # update, and logged the aggregate it gave each survivor.
                if not sent.get(rnd):
                    problems.append(
                        f"server log line {e.line}: site {w} took part in secure round {rnd}, "
                        "which the site's log does not record training"
                    )
            elif e.data.get("sha256") not in sent.get(rnd, set()):
                problems.append(
                    f"server log line {e.line}: an update from site {w} in round {rnd} that the "
                    "site's log does not record sending (a forged update, or the site's log "
                    "was cut short)"
                )
            problem = _anchor(
                (e.data.get("site") or {}).get("audit_head"),
                site,
                f"site {w}",
                f"server log line {e.line}",
            )
            if problem:
                problems.append(problem)
    return problems


def _check_train(session: _Session, w: str, e: LoggedEntry, where: str) -> list[str]:
    d, rnd = e.data, int(e.data["round"])
    problems = []
    received = session.sent.get(rnd)
    if not received:
        problems.append(
            f"{where}: trained in round {rnd} of run {session.run_id}, which the server's log "
            "never started: the server's log was cut short or is not this run's"
        )
    elif d.get("received_sha256") not in received:
        problems.append(
            f"{where}: received a global model in round {rnd} that is not the one the "
            "server's log says it sent"
        )
    matches = [
        u
        for u in session.updates.get((w, rnd), [])
        if u.data.get("sha256") == d.get("sent_sha256") or rnd in session.secure
    ]
    if not matches:
        if kinds.DROPPED not in session.events.get((w, rnd), set()):
            problems.append(
                f"{where}: sent an update in round {rnd} that the server's log does not "
                "record receiving (nor a drop-out of the site)"
            )
        return problems
    differs = _report_differs(d, matches[0].data.get("site") or {})
    if differs:
        problems.append(
            f"{where}: the privacy report the server logged (line {matches[0].line}) differs "
            f"from the site's own in {', '.join(differs)}"
        )
    return problems


def _check_secagg(session: _Session, w: str, e: LoggedEntry, where: str) -> list[str]:
    """A site's ``secagg`` entry (the unmasking shares it sent in a round) against the
    server's: the round must be one the server logged as secure, with this site among those
    that sent a masked input."""
    rnd = int(e.data["round"])
    server = session.secure.get(rnd)
    if server is None:
        return [
            f"{where}: sent unmasking shares in round {rnd}, which the server's log does not "
            "record as a secure-aggregation round"
        ]
    masked = server.data.get("masked")
    if not isinstance(masked, list) or w not in masked:
        return [
            f"{where}: sent unmasking shares in round {rnd}, but the server's log (line "
            f"{server.line}) does not list the site among those that sent a masked input"
        ]
    return []


def cross_check(logs: Sequence[LogVerification]) -> list[str]:
    """Problems found between server and site logs (see the module docstring).

    Only verified entries take part (those before a log's first bad line), and of those
    only the ones whose fields have the types fedcare writes: an entry with another (an
    integer round that is text, a ``site`` that is not an object, ...) is a problem of its
    own, named by its log and line. A server log is split into sessions (each
    ``run-start``, with its ``run-resume`` entries); a site entry belongs to the session
    its recorded server head falls in. Where a site's log has entries in a session, the two
    logs must agree on it; where it has none (the site's state was reset, or this log
    predates it), only updates the server logged with this log's key are required to be
    in it.
    """
    servers = [_ServerIndex.build(v) for v in logs if v.writer == SERVER_WRITER]
    problems: list[str] = []
    for server in servers:
        problems.extend(server.problems)
    sites: list[tuple[LogVerification, list[LoggedEntry]]] = []
    for v in logs:
        if v.writer and v.writer != SERVER_WRITER:
            entries, typing_problems = _typed_entries(v, f"site {v.writer}")
            sites.append((v, entries))
            problems.extend(typing_problems)
    for server in servers:
        for site, entries in sites:
            problems.extend(_check_site(server, site, entries))
    return list(dict.fromkeys(problems))
