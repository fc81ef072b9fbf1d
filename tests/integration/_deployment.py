"""A real deployment on 127.0.0.1 for the integration tests: certificates, a SuperLink and
SuperNodes started with fedcare's own commands, each in its own process.

The centre and the hospitals run through the ``fedcare`` console script (``server start``,
``site start``), each its own process, and are driven with Flower's ``flwr`` CLI
(``supernode register``, ``run``, ``ls``), exactly as a coordinating centre and its hospitals
would. The one-off setup commands (``certs init``, ``site keygen``) are the same command
functions called in this process: their console script is tested in tests/server and
tests/client, and each start of it costs seconds of CPU that a two-core test run cannot spare.
Every process started here is stopped with its whole family (SuperExec, ServerApp, ClientApp
processes), all of them at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedcare.client.audit import AUDIT_KEY_NAME
from fedcare.client.site_cli import site_keygen
from fedcare.common.audit import load_or_create_signing_key, public_key_raw
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from fedcare.common.files import private_dir
from fedcare.common.processes import (
    family_pids,
    family_sessions,
    flower_env,
    free_port,
    stop_family,
)
from fedcare.common.run_files import SUMMARY_NAME
from fedcare.common.run_signing import (
    RUN_KEY_NAME,
    RUN_PUBLIC_KEY_NAME,
    RUN_SIGNATURE_KEY,
    sign_run,
)
from fedcare.common.tomlcompat import tomllib
from fedcare.server.certs_cli import certs_init
from fedcare.simulations.flower_driver import write_app_dir
from fedcare.simulations.synth import SynthConfig, synthesize

BIN = Path(sys.executable).parent
CONNECTION = "hospitals"
#: What a SuperNode logs once the SuperLink has let it in (Flower's own line).
NODE_STARTED = "SuperNode ID:"
#: The pytest-xdist group of every test that takes the session's shared ``deployment``
#: (tests/integration/conftest.py): ``--dist loadgroup`` runs them in one worker, so the
#: deployment is started once.
DEPLOYMENT_GROUP = "deployment"
#: pytest-timeout's limit for those tests (seconds): the first also starts the deployment.
DEPLOYMENT_TIMEOUT_S = 600


def fedcare(
    *args: str, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a short ``fedcare`` command to completion (the console script, its own process)."""
    return subprocess.run(
        [str(BIN / "fedcare"), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _quietly(command: Any, **options: Any) -> None:
    """Call a ``fedcare`` command function with its options (what the console script calls
    after parsing them), its printout kept out of the test's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        command(**options)


def _stamp(path: Path) -> int | None:
    """When ``path`` was last written (ns), or None while it does not exist."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@dataclass
class Process:
    """A long-running command of the deployment, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    sessions: set[int] = field(default_factory=set)
    #: Where this process's lines start in ``log`` (a restarted one appends to the file).
    offset: int = 0

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM (the fedcare supervisor stops its family), then make sure all is gone."""
        if self.proc.poll() is None:
            self.sessions |= family_sessions(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        stop_family(self.proc, self.sessions, grace_s=2.0)
        return int(self.proc.returncode)

    def crash(self) -> None:
        """SIGKILL the command and everything it started at once: the machine goes dark."""
        for pid in family_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def new_text(self) -> str:
        """What this process (not an earlier one under the same name) has logged."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


@dataclass
class Deployment:
    """A coordinating centre and its hospitals, all on this machine.

    ``port`` is the centre's public port (the gateway: Fleet API only), which the sites
    dial; ``control_port`` is the SuperLink's loopback port, which the ``flwr`` CLI
    (``CONNECTION``) uses.
    """

    root: Path
    port: int
    env: dict[str, str]
    sites: list[Path]
    control_port: int
    processes: dict[str, Process] = field(default_factory=dict)
    _earlier: list[Process] = field(default_factory=list)
    #: Flower run id -> (fedcare run id, its summary.json's stamp before the submission).
    _submitted: dict[int, tuple[str, int | None]] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "centre" / "certs"

    @property
    def flwr_home(self) -> Path:
        return Path(self.env["FLWR_HOME"])

    # --- setup -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, root: Path, *, n_sites: int = 3, patients: int = 140, epsilon_budget: float = 20.0
    ) -> Deployment:
        """Certificates, ``n_sites`` hospitals' data, keys and site-config.toml (each with a
        lifetime budget of ``epsilon_budget``); nothing started yet."""
        root.mkdir(parents=True, exist_ok=True)
        home = root / "centre" / "flwr-home"
        home.mkdir(parents=True)
        env = flower_env(home=home)
        env["PYTHONUNBUFFERED"] = "1"
        synthesize(
            root / "data",
            n_sites=n_sites,
            seed=5,
            # Hospitals as a deployment holds them: no [simulation] opt-ins in site.toml.
            config=SynthConfig(patients_per_site=patients, image_format="npy", simulated=False),
        )
        dep = cls(root=root, port=free_port(), env=env, sites=[], control_port=free_port())
        _quietly(certs_init, out=dep.certs, host=["127.0.0.1", "localhost"], days=825, force=False)
        connection = {
            "address": f"127.0.0.1:{dep.control_port}",
            "root-certificates": str(dep.certs / "ca.crt"),
        }
        (home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
        )
        for i in range(n_sites):
            dep.sites.append(dep.add_site(i, register=False, epsilon_budget=epsilon_budget))
        return dep

    def add_site(
        self, i: int, *, register: bool, data_of: int | None = None, epsilon_budget: float = 20.0
    ) -> Path:
        """A hospital folder: its keys, its site-config.toml, and its data (already written)."""
        site = self.root / f"hospital-{i}"
        keys = site / "keys"
        _quietly(site_keygen, out=keys, name="supernode", force=False)
        shutil.copy(self.certs / "ca.crt", site / "ca.crt")
        shutil.copy(self.certs / RUN_PUBLIC_KEY_NAME, site / RUN_PUBLIC_KEY_NAME)
        config = {
            "site_id": f"site-{i if data_of is None else data_of}",
            "data": str(self.root / "data" / f"site-{i if data_of is None else data_of}"),
            "state_dir": str(site / "state"),
            "device": "cpu",
            "privacy": {"epsilon": epsilon_budget, "delta": 1e-5},
            "policy": {"max_local_epochs": 3},
            "superlink": {
                "address": f"127.0.0.1:{self.port}",
                "root_certificates": str(site / "ca.crt"),
                "auth_private_key": str(keys / "supernode"),
                "run_signing_key": str(site / RUN_PUBLIC_KEY_NAME),
            },
            "supernode": {"port": free_port()},
        }
        (site / "site-config.toml").write_text(tomli_w.dumps(config))
        if register:
            self.register(i)
        return site

    def pin_peers(self) -> None:
        """What the hospitals exchange out of band for secure aggregation: each one's audit
        public key, in a peers file its own site-config.toml names (``secagg_peers``).
        Before the hospitals start (each audit key is created here, where the site keeps it)."""
        public = {}
        for site in self.sites:
            config = tomllib.loads((site / "site-config.toml").read_text(encoding="utf-8"))
            state = private_dir(Path(config["state_dir"]))
            key = load_or_create_signing_key(state / AUDIT_KEY_NAME)
            public[str(config["site_id"])] = public_key_raw(key).hex()
        for site in self.sites:
            path = site / "site-config.toml"
            config = tomllib.loads(path.read_text(encoding="utf-8"))
            others = {k: v for k, v in public.items() if k != config["site_id"]}
            (site / "peers.toml").write_text(tomli_w.dumps({"peers": others}), encoding="utf-8")
            path.write_text(tomli_w.dumps({**config, "secagg_peers": str(site / "peers.toml")}))

    def register(self, i: int) -> None:
        """The coordinating centre registers hospital ``i``'s public key (server running)."""
        public_key = self.root / f"hospital-{i}" / "keys" / "supernode.pub"
        out = self.flwr("supernode", "register", str(public_key), CONNECTION)
        assert out.returncode == 0 and "registered" in out.stdout, out.stdout + out.stderr

    # --- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, *args: str) -> Process:
        """Start ``fedcare ARGS``; ``processes[name]`` is the newest, every one is stopped."""
        if name in self.processes:
            self._earlier.append(self.processes[name])
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                [str(BIN / "fedcare"), *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        p = Process(name, proc, log, {proc.pid}, offset)
        self.processes[name] = p
        return p

    def start_server(self, timeout: float = 60) -> Process:
        p = self._spawn(
            "superlink",
            "server",
            "start",
            "--certs",
            str(self.certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--database",
            str(self.root / "centre" / "superlink.db"),
        )
        self.wait_healthy(p, timeout)
        return p

    def healthy(self) -> bool:
        """The public port answers its health check over TLS, verified with the CA (behind
        ``fedcare server start`` that is the gateway, which answers 200 only while the
        SuperLink on the control port does)."""
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(f"https://127.0.0.1:{self.port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_healthy(self, p: Process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert p.proc.poll() is None, f"SuperLink exited:\n{p.text()[-3000:]}"
            if self.healthy():
                return
            time.sleep(0.3)
        raise AssertionError(f"SuperLink not healthy after {timeout} s:\n{p.text()[-3000:]}")

    def start_site(self, i: int, *extra: str) -> Process:
        return self._spawn(
            f"site-{i}",
            "site",
            "start",
            str(self.root / f"hospital-{i}" / "site-config.toml"),
            *extra,
        )

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        return len(self.online_node_ids())

    def online_node_ids(self) -> frozenset[str]:
        """The ids of the SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        nodes = json.loads(out.stdout[out.stdout.index("{") :])["nodes"]
        return frozenset(
            str(n["node-id"]) for n in nodes if str(n.get("status", "")).startswith("online")
        )

    def wait_online(
        self, n: int, timeout: float = 120, *, starting: Sequence[Process] = ()
    ) -> None:
        """Until the SuperLink lists ``n`` SuperNodes online.

        ``starting``: hospitals just started. Each ``flwr`` call is a process that costs a
        second of CPU, so Flower is asked only once each of them has logged its SuperNode ID
        (or exited, or the time is up).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            p.proc.poll() is None and NODE_STARTED not in p.new_text() for p in starting
        ):
            time.sleep(0.3)
        while (online := self.online_nodes()) < n and time.monotonic() < deadline:
            time.sleep(1)
        logs = "".join(f"\n--- {p.name}:\n{p.new_text()[-1500:]}" for p in starting)
        assert online >= n, f"{online} of {n} SuperNodes online after {timeout} s{logs}"

    def ensure_running(self) -> None:
        """The centre and every hospital of ``sites`` running, and each hospital online:
        whatever an earlier test stopped or crashed is started again (and then Flower is
        asked until all are online; with nothing to start, the centre's health check, which
        costs no process, is enough: the hospitals were online when the last one started)."""
        server = self.processes.get("superlink")
        restarted = server is None or server.proc.poll() is not None
        if restarted:
            self.start_server()
        started = []
        for i in range(len(self.sites)):
            site = self.processes.get(f"site-{i}")
            if site is None or site.proc.poll() is not None:
                started.append(self.start_site(i))
        if restarted or started:
            self.wait_online(len(self.sites), starting=started)
        elif not self.healthy():
            log = self.processes["superlink"].text()[-3000:]
            raise AssertionError(f"the SuperLink runs but does not answer:\n{log}")

    def stop_all(self) -> None:
        """Stop every process started here, all at once (each waits out its own grace)."""
        everything = [*self._earlier, *self.processes.values()]
        with ThreadPoolExecutor(max_workers=len(everything) or 1) as pool:
            list(pool.map(Process.stop, everything))  # raises what a stop raised

    # --- runs ----------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )

    def submit(self, run_id: str, *, signed_by: Path | None = None, **config: Any) -> int:
        """``flwr run`` the thin fedcare app, signed as ``fedcare server submit`` signs it
        (with ``signed_by``, default the centre's run-signing key; ``Path()`` for unsigned);
        returns Flower's run id."""
        app = write_app_dir(
            self.root / "centre" / "app",
            config_defaults=RUN_CONFIG_DEFAULTS,
            serverapp="fedcare.server.app:app",
            clientapp="fedcare.client.app:app",
        )
        run_config = {
            "run-id": run_id,
            "run-dir": str(self.run_dir(run_id)),
            "spec-path": str(self.root / "data" / "site-0" / "site.toml"),
            "task": "readmission",
            "local-epochs": 1,
            "learning-rate": 0.01,
            **config,
        }
        key = self.certs / RUN_KEY_NAME if signed_by is None else signed_by
        if key != Path():
            resolved = FederationConfig.from_run_config({**RUN_CONFIG_DEFAULTS, **run_config})
            signer = load_or_create_signing_key(key)
            run_config[RUN_SIGNATURE_KEY] = sign_run(resolved.to_run_config(), signer)
        path = self.root / "centre" / f"{run_id}.toml"
        path.write_text(tomli_w.dumps(run_config))
        summary = self.run_dir(run_id) / SUMMARY_NAME
        before = _stamp(summary)
        out = self.flwr("run", str(app), CONNECTION, "--format", "json", "--run-config", str(path))
        reply = json.loads(out.stdout[out.stdout.index("{") :])
        assert reply.get("success"), out.stdout + out.stderr
        self._submitted[int(reply["run-id"])] = (run_id, before)
        return int(reply["run-id"])

    def run_dir(self, run_id: str) -> Path:
        return self.root / "centre" / "runs" / run_id

    def status(self, flwr_run_id: int) -> dict[str, Any]:
        out = self.flwr("ls", CONNECTION, "--run-id", str(flwr_run_id), "--format", "json")
        reply = json.loads(out.stdout[out.stdout.index("{") :])
        assert reply.get("success"), out.stdout + out.stderr
        return dict(reply["runs"][0])

    def wait(self, flwr_run_id: int, timeout: float = 400) -> dict[str, Any]:
        """Until Flower lists the run as finished; its status then.

        Each ``flwr ls`` is a process that costs a second of CPU, so while the run's
        ``summary.json`` (written by its ServerApp at the end) is not yet (re)written, Flower
        is asked only every 10 s (a run that fails without a summary is still seen); once it
        is, every half second.
        """
        run_id, before = self._submitted[flwr_run_id]
        summary = self.run_dir(run_id) / SUMMARY_NAME
        deadline = time.monotonic() + timeout
        ask_at = time.monotonic() + 10
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            written = _stamp(summary) != before
            if written or time.monotonic() >= ask_at:
                info = self.status(flwr_run_id)
                if str(info["status"]).startswith("finished"):
                    return info
                ask_at = time.monotonic() + (0.5 if written else 10)
            time.sleep(0.3)
        raise AssertionError(f"run {flwr_run_id} not finished after {timeout} s: {info}")

    def wait_for_round(self, run_id: str, rnd: int, timeout: float = 300) -> None:
        """Until ``progress.jsonl`` of ``run_id`` has an entry for round ``rnd``."""
        progress = self.run_dir(run_id) / "progress.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if progress.is_file():
                done = [json.loads(x)["round"] for x in progress.read_text().splitlines() if x]
                if rnd in done:
                    return
            time.sleep(0.5)
        raise AssertionError(f"round {rnd} of {run_id} not reached in {timeout} s")


def processes_under(root: Path) -> list[str]:
    """Live processes whose command line or environment mentions ``root``."""
    marker = str(root.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            if marker in cmdline or marker in (entry / "environ").read_bytes():
                found.append(f"{entry.name}: {cmdline[:120].decode(errors='replace')}")
        except OSError:
            continue
    return found
