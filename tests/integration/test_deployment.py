"""A real hospital deployment on 127.0.0.1: one SuperLink and three SuperNodes, each its own
process started with ``fedcare server start`` / ``fedcare site start``, TLS and node
authentication on, each site with its own data folder, site-config.toml and privacy ledger.

Runs are submitted with ``flwr run`` and followed with ``flwr ls --format json``. The
deployment is the session's one (tests/integration/conftest.py), shared with
test_secagg_deployment.py. Slow (real processes, TLS, three hospitals on two cores); CI runs
them too.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedcare.client.ledger import PrivacyLedger
from fedcare.common.processes import family_pids
from fedcare.common.run_files import RECORD_NAME
from fedcare.common.run_record import load_run_record
from fedcare.common.summary import load_summary
from tests.integration._deployment import (
    DEPLOYMENT_GROUP,
    DEPLOYMENT_TIMEOUT_S,
    NODE_STARTED,
    Deployment,
    Process,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.xdist_group(DEPLOYMENT_GROUP),
    # The first test to ask also starts the session's deployment (a centre, three hospitals)
    # within its time; on two loaded cores that and a three-round run pass 300 s.
    pytest.mark.timeout(DEPLOYMENT_TIMEOUT_S),
]


def _charges(dep: Deployment, site: int, run_id: str, kind: str = "train") -> list[int]:
    ledger = PrivacyLedger(dep.root / f"hospital-{site}" / "state" / "ledger.sqlite")
    return sorted(
        c.round
        for dataset in ledger.summary()
        for c in ledger.charges(dataset.fingerprint)
        if c.run_id == run_id and c.kind == kind
    )


def _worker_pids(dep: Deployment, site: int) -> set[int]:
    """The pids of hospital ``site``'s site worker (``python -m fedcare.client.worker``)."""
    found = set()
    for pid in family_pids(dep.processes[f"site-{site}"].proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fedcare.client.worker" in cmdline:
            found.add(pid)
    return found


def _restart_worker(dep: Deployment, site: int) -> None:
    """SIGKILL hospital ``site``'s worker; ``site start`` starts a new one."""
    (old,) = _worker_pids(dep, site)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _worker_pids(dep, site)
        if now and old not in now:
            break
        time.sleep(0.2)
    assert _worker_pids(dep, site) - {old}, "the site worker was not started again"
    assert (
        "site-worker exited with code -9; starting it again" in dep.processes[f"site-{site}"].text()
    )


@dataclass
class Outsiders:
    """Two SuperNodes the centre must never let in: one whose key the centre never
    registered, and one started ``--insecure`` (plain text), each a hospital of its own.
    test_unregistered_node_is_refused and test_plain_text_cannot_connect check what came of
    them.

    Trying them costs the seconds of two cores that starting a hospital takes, then only a
    few log lines are awaited, by a thread (:meth:`_watch`), which notes what the centre
    lists and stops them: test_run_survives_a_dropped_site_and_a_server_restart starts them
    (:meth:`start`) as its round 2 begins to wait, idle, for Flower to find a dark
    hospital's heartbeat overdue (30-60 s; they take about half that). A test that finds
    them not started (run alone) starts them; one that finds the try inconclusive (the
    centre was down when they came to their end: the run's test stops it after round 2)
    tries again with two new hospitals.
    """

    dep: Deployment
    #: How long the unregistered one may take to exit or be let in, and the plain-text one
    #: to log its failed connection (seconds, from their start).
    unregistered_timeout_s: float = 300
    insecure_timeout_s: float = 90
    #: The hospital number of the unregistered one (the plain-text one is the next).
    first_hospital: int = 3
    unregistered: Process | None = None
    insecure: Process | None = None
    #: The SuperNodes the SuperLink listed online just before the outsiders started, and
    #: once both had come to their end (before either was stopped).
    online_before: frozenset[str] = frozenset()
    online_after: frozenset[str] = frozenset()
    #: Whether the centre answered its health check once both had come to their end: a
    #: failed connection to a centre that is down would prove nothing.
    centre_up: bool = False
    #: The unregistered one was still running (let in, or still trying) at its end.
    unregistered_running: bool = False
    insecure_text: str = ""
    _watcher: threading.Thread | None = None
    _error: BaseException | None = None

    def start(self) -> None:
        """Start both and their watcher, once per try (the centre running)."""
        if self._watcher is not None:
            return
        self.online_before = self.dep.online_node_ids()
        n = self.first_hospital
        self.dep.add_site(n, register=False, data_of=0)
        self.unregistered = self.dep.start_site(n)
        # A hospital of its own (hospital 0's state folder is locked by its running SuperNode).
        self.dep.add_site(n + 1, register=False, data_of=1)
        self.insecure = self.dep.start_site(n + 1, "--insecure")
        self._watcher = threading.Thread(
            target=self._watch, args=(self.unregistered, self.insecure, time.monotonic())
        )
        self._watcher.start()

    def _watch(self, unregistered: Process, insecure: Process, started_at: float) -> None:
        """Until the unregistered one has exited or been let in (Flower logs the node's ID
        once the SuperLink admits it) and the plain-text one has logged a failed connection
        (or their time is up); then note what the centre lists, and stop both."""
        try:

            def waiting() -> bool:
                elapsed = time.monotonic() - started_at
                return (
                    unregistered.proc.poll() is None
                    and NODE_STARTED not in unregistered.new_text()
                    and elapsed < self.unregistered_timeout_s
                ) or (
                    "Connection attempt failed" not in insecure.new_text()
                    and elapsed < self.insecure_timeout_s
                )

            while waiting():
                time.sleep(0.3)
            self.unregistered_running = unregistered.proc.poll() is None
            self.insecure_text = insecure.new_text()
            self.centre_up = self.dep.healthy()
            self.online_after = self.dep.online_node_ids() if self.centre_up else frozenset()
        except BaseException as e:  # handed to the test that settles the try
            self._error = e
        finally:
            insecure.stop()
            if unregistered.proc.poll() is None:
                unregistered.stop()

    def settle(self) -> Outsiders:
        """The try's outcome: started here if not yet, awaited; tried again with two new
        hospitals where the centre was down at its end."""
        self.start()
        assert self._watcher is not None
        self._watcher.join()
        if self._error is not None:
            raise self._error
        if not self.centre_up and self.first_hospital == 3:
            self.first_hospital, self._watcher = 5, None
            return self.settle()
        return self


@pytest.fixture(scope="module")
def outsiders(shared_deployment: Deployment) -> Iterator[Outsiders]:
    tried = Outsiders(shared_deployment)
    yield tried
    if tried._watcher is not None:  # a try no test settled: its watcher stops them
        tried._watcher.join()
        if tried._error is not None:
            raise tried._error


def test_run_survives_a_dropped_site_and_a_server_restart(
    deployment: Deployment, outsiders: Outsiders
) -> None:
    """Three rounds over TLS with registered nodes, and three failures on the way.

    Before the run, hospital 0's site worker is SIGKILLed: ``site start`` starts it again
    and the hospital trains every round.

    After round 1 one hospital goes dark (its whole process family SIGKILLed): round 2 goes
    on with the other two and the hospital is recorded as dropped. After round 2 the
    SuperLink is stopped and restarted: it keeps its registered SuperNodes (SQLite state),
    they reconnect on their own, and the run, submitted again with the same run id,
    resumes with round 3. Every site is charged exactly once per round it trained (or
    started: a site charges before it computes).

    Round 2 waits, idle, until Flower finds the dark hospital's heartbeat overdue (30-60 s:
    a flwr 1.42 SuperNode reports every 30 s, a fixed interval no option or setting of
    Flower's changes): the module's two outsiders are started then and try the centre
    meanwhile (:class:`Outsiders`).
    """
    dep = deployment
    _restart_worker(dep, 0)
    run = "tls-drop-restart"
    config = {"num-server-rounds": 3, "num-sites": 0, "min-sites": 2, "round-timeout": 120.0}
    first = dep.submit(run, **config)
    dep.wait_for_round(run, 1)
    dep.processes["site-2"].crash()  # the whole hospital goes dark at once
    outsiders.start()  # their start fills round 2's wait for the heartbeat (see above)
    dep.wait_for_round(run, 2)
    dep.processes["superlink"].stop()  # SIGTERM: the server and its ServerApp go down
    lines = (dep.run_dir(run) / "progress.jsonl").read_text().splitlines()
    done = [json.loads(x)["round"] for x in lines]
    assert done == [0, 1, 2], "round 3 ended before the SuperLink stopped: nothing to resume"
    assert not dep.healthy(), "the SuperLink still answers after it was stopped"
    dep.start_server()
    deadline = time.monotonic() + 120
    while dep.online_nodes() < 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert dep.online_nodes() == 2, "the SuperNodes did not reconnect to the restarted SuperLink"
    second = dep.submit(run, **config)
    info = dep.wait(second)
    assert info["status"] == "finished:completed", info
    assert first != second

    summary = load_summary(dep.run_dir(run) / "summary.json")
    assert summary.rounds_completed == 3
    by_id = {s.site_id: s for s in summary.sites}
    assert sorted(by_id) == ["site-0", "site-1", "site-2"]
    for site in ("site-0", "site-1"):
        assert by_id[site].status == "completed", by_id[site]
        assert by_id[site].rounds_participated == (1, 2, 3)
        assert _charges(dep, int(site[-1]), run) == [1, 2, 3]  # no round charged twice
    assert by_id["site-2"].status == "dropped", by_id["site-2"]
    assert by_id["site-2"].reason
    assert by_id["site-2"].rounds_participated == (1,)
    # Round 2's message (which also asks for round 1's evaluation) may have reached the
    # hospital in the moment between round 1's progress line and the crash: a site charges
    # before it computes, so it is then charged once for what it started (it never replied).
    assert _charges(dep, 2, run) in ([1], [1, 2])
    assert any(e.kind == "dropped" and e.site_id == "site-2" for e in summary.events)
    progress = (dep.run_dir(run) / "progress.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in progress] == [0, 1, 2, 3]
    # Round r's evaluation went with round r + 1's train message: round 1's without the
    # hospital that went dark before round 2, round 2's (asked again by the resumed run)
    # once; each site paid for each evaluation once. (A round's global metrics may be
    # withheld: the sites' DP releases are noisy, and a pooled noisy count below
    # site-min-count withholds them, so their presence is not asserted.)
    record = load_run_record(dep.run_dir(run) / RECORD_NAME)
    assert [e.round for e in record.rounds] == [0, 1, 2, 3]
    for entry in record.rounds:
        dark = entry.sites.get("site-2", {})
        assert entry.round == 0 or not [k for k in dark if k.startswith(("val.", "test."))]
    for site in ("site-0", "site-1"):
        assert _charges(dep, int(site[-1]), run, kind="evaluate") == [0, 1, 2, 3]
    assert _charges(dep, 2, run, kind="evaluate") in ([0], [0, 1])


def test_an_unsigned_run_charges_no_hospital(deployment: Deployment) -> None:
    """fedcare's own app, submitted by whoever reaches the port but not signed by the
    centre's run-signing key: every hospital refuses it before touching its ledger."""
    dep = deployment
    run = "unsigned-outsider"
    info = dep.wait(dep.submit(run, signed_by=Path(), **{"num-server-rounds": 1}), timeout=200)
    assert info["status"].startswith("finished"), info
    summary = load_summary(dep.run_dir(run) / "summary.json")
    assert any("not signed" in (s.reason or "") for s in summary.sites), summary.sites
    for i in range(len(dep.sites)):
        assert _charges(dep, i, run) == []


def test_unregistered_node_is_refused(deployment: Deployment, outsiders: Outsiders) -> None:
    tried = outsiders.settle()
    p = tried.unregistered
    assert p is not None
    if tried.unregistered_running:
        if NODE_STARTED in p.text():
            pytest.fail(f"an unregistered SuperNode was admitted:\n{p.text()[-2000:]}")
        pytest.fail(f"the SuperNode neither exited nor was admitted:\n{p.text()[-2000:]}")
    assert tried.centre_up, "the centre was down while the unregistered SuperNode tried it"
    assert p.proc.returncode != 0
    assert NODE_STARTED not in p.text()
    assert "Failed to activate SuperNode" in p.text()
    assert tried.online_after <= tried.online_before, "a node came online that was not before"


def test_plain_text_cannot_connect(deployment: Deployment, outsiders: Outsiders) -> None:
    dep = deployment
    # A plain-HTTP request to the SuperLink's port gets no answer.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        opener.open(f"http://127.0.0.1:{dep.port}/health", timeout=5).read()
    # A TLS client that does not trust the federation's CA is refused too.
    with pytest.raises(urllib.error.URLError) as e:
        urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        ).open(f"https://127.0.0.1:{dep.port}/health", timeout=5)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)
    # A SuperNode started --insecure never gets in (it warns loudly, then fails to connect).
    tried = outsiders.settle()
    assert tried.centre_up, "the centre was down while the plain-text SuperNode tried it"
    assert "PLAIN TEXT" in tried.insecure_text
    assert "Connection attempt failed" in tried.insecure_text
    assert tried.online_after <= tried.online_before, "a node came online that was not before"
