"""fedcare's Python API: light to import, shown by help(), typed results, clear refusals.

Each function is a front over the module that does the work, so these tests check what the
front adds (its typed result, what it reads back, what it refuses) against those modules and
against an independent accountant, on tiny synthetic sites. The in-process simulation runs
in a child process (a Ray cluster, a plug-in model) and is marked slow; the notebook test
covers the same path as a user meets it.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import pydoc
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict

import fedcare
import fedcare.api
from fedcare.client.accounting import Mechanism, independent_epsilon
from fedcare.client.local import RUN_CEILING_TOLERANCE
from fedcare.common.errors import ConfigError, PolicyViolation
from fedcare.common.federation import RUN_CONFIG_DEFAULTS
from fedcare.common.flower_app import write_app_dir
from fedcare.inprocess import InProcessHandle, centre_app, site_app
from fedcare.models import build_model
from tests._flower import task_identity

SYNTH = fedcare.SynthConfig(patients_per_site=60, n_genes=20, image_size=16, image_format="npy")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("api-sites")
    return fedcare.synthesize(root / "sites", n_sites=2, seed=3, config=SYNTH)


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# --------------------------------------------------------------------------- the package


def test_importing_fedcare_imports_neither_torch_nor_flower_nor_the_api() -> None:
    # Every site process imports fedcare to hash its code for the audit log.
    child = _child(
        "import json, sys\nimport fedcare\n"
        "print(json.dumps([m in sys.modules for m in ('torch', 'flwr', 'fedcare.api')]))"
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout) == [False, False, False]


def test_the_package_exports_exactly_the_api() -> None:
    assert set(fedcare.__all__) == {"__version__", *fedcare.api.__all__}
    for name in fedcare.api.__all__:
        assert getattr(fedcare, name) is getattr(fedcare.api, name), name
    assert set(fedcare.__all__) <= set(dir(fedcare))
    with pytest.raises(AttributeError, match="no attribute 'simulation'"):
        fedcare.simulation  # noqa: B018


def test_help_shows_every_function_of_the_api_with_its_signature() -> None:
    text = pydoc.render_doc(fedcare, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    for signature in (
        "simulate(*, out",
        "load_site(path",
        "train_site(site",
        "read_ledger(path",
        "verify_run(run_dir",
        "audit_run(run_dir",
        "audit_report(run_dir",
        "register_strategy(name",
        "load_plugins(*, environ",
    ):
        assert signature in text, signature
    assert "class SimulationResult" in text and "class SiteTraining" in text


@pytest.mark.slow
def test_python_help_fedcare_prints_the_api() -> None:
    child = _child("import fedcare; help(fedcare)", env={"PAGER": "cat", "TERM": "dumb"})
    assert child.returncode == 0, child.stderr[-2000:]
    assert "simulate(*, out" in child.stdout and "train_site(site" in child.stdout


def test_the_api_s_examples_run() -> None:
    result = doctest.testmod(fedcare.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


# --------------------------------------------------------------------------- one site


def test_train_site_charges_the_ledger_what_it_reports(sites: list[Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    trained = fedcare.train_site(
        sites[0], task="readmission", state_dir=state, rounds=2, target_epsilon=1.0
    )
    ledger = fedcare.read_ledger(state)
    charges = [c for c in ledger.charges if c.run_id == trained.run_id]
    assert [(c.kind, c.round, c.status) for c in charges] == [
        ("train", 1, "completed"),
        ("train", 2, "completed"),
    ]
    assert trained.steps == sum(c.mechanism.steps for c in charges) > 0
    assert trained.rounds == 2 and trained.ledger_path == state / "ledger.sqlite"
    (dataset,) = ledger.datasets
    assert trained.lifetime_epsilon == pytest.approx(dataset.epsilon)
    assert ledger.lifetime_epsilon == {dataset.fingerprint: dataset.epsilon}
    # A first training: what it added is all there is, within the target.
    assert trained.epsilon_spent == pytest.approx(trained.lifetime_epsilon)
    assert trained.epsilon_spent <= 1.0 + RUN_CEILING_TOLERANCE
    # Against an independent accountant (PLD), over the mechanisms the ledger holds.
    mechanisms = [c.mechanism for c in charges]
    assert all(isinstance(m, Mechanism) and m.noise_multiplier > 0 for m in mechanisms)
    pld = independent_epsilon(mechanisms, delta=trained.delta)
    assert pld - 0.05 <= trained.lifetime_epsilon <= pld + 0.05
    site = fedcare.load_site(sites[0])
    model = build_model(trained.model, input_dims={"ehr": 1})  # only its parameter names
    assert trained.model == "ehr_mlp" and set(trained.state_dict) == set(model.state_dict())
    assert trained.site_id == site.spec.site_id == "site-0"
    assert all(math.isfinite(v) for v in trained.metrics.values())


def test_train_site_again_adds_to_the_same_budget_and_never_repeats_a_run(
    sites: list[Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = fedcare.train_site(sites[1], task="readmission", state_dir=state, target_epsilon=1.0)
    second = fedcare.train_site(
        sites[1], task="readmission", state_dir=state, target_epsilon=1.0, epsilon_budget=10.0
    )
    assert second.run_id != first.run_id
    assert first.lifetime_epsilon is not None and second.lifetime_epsilon is not None
    assert first.lifetime_epsilon < second.lifetime_epsilon <= 2.0 + 2 * RUN_CEILING_TOLERANCE
    assert len(fedcare.read_ledger(state / "ledger.sqlite").charges) == 2
    # The same call under a released run id gets its stored release back, charging nothing;
    # another one (other weights to start from) is refused.
    again = fedcare.train_site(
        sites[1], task="readmission", state_dir=state, target_epsilon=1.0, run_id=first.run_id
    )
    assert all(torch.equal(again.state_dict[k], v) for k, v in first.state_dict.items())
    assert again.lifetime_epsilon == first.lifetime_epsilon
    other = {k: v + 1.0 for k, v in first.state_dict.items()}
    with pytest.raises(PolicyViolation, match="already trained round 1 .* another received model"):
        fedcare.train_site(
            sites[1],
            task="readmission",
            state_dir=state,
            target_epsilon=1.0,
            run_id=first.run_id,
            initial_state=other,
        )
    assert len(fedcare.read_ledger(state).charges) == 2


def test_train_site_without_dp_charges_nothing(sites: list[Path], tmp_path: Path) -> None:
    trained = fedcare.train_site(
        sites[0], task="readmission", state_dir=tmp_path / "state", target_epsilon=None
    )
    assert (trained.epsilon_spent, trained.lifetime_epsilon, trained.delta) == (None, None, None)
    assert trained.ledger_path is None and not (tmp_path / "state").exists()
    assert trained.steps > 0


def test_train_site_starts_from_the_weights_it_is_given(sites: list[Path], tmp_path: Path) -> None:
    first = fedcare.train_site(
        sites[0], task="readmission", state_dir=tmp_path, target_epsilon=None
    )
    zeros = {k: torch.zeros_like(v) for k, v in first.state_dict.items()}
    from_zeros = fedcare.train_site(
        sites[0],
        task="readmission",
        state_dir=tmp_path,
        target_epsilon=None,
        initial_state=zeros,
        settings={"learning-rate": 1e-9},
    )
    assert all(
        torch.allclose(v, torch.zeros_like(v), atol=1e-6) for v in from_zeros.state_dict.values()
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"settings": {"task": "readmission"}}, "settings repeat task; pass them as task="),
        ({"settings": {"target-epsilon": 2.0}}, "settings repeat target-epsilon"),
        ({"settings": {"local-epoch": 2}}, "local-epoch: unknown key"),
        ({"task": "no_such_task"}, "defines no task 'no_such_task'"),
        ({"rounds": 0}, "num-server-rounds"),
    ],
)
def test_train_site_refuses_bad_settings_before_charging(
    sites: list[Path], tmp_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    arguments: dict[str, Any] = {"task": "readmission", "state_dir": tmp_path / "state", **kwargs}
    with pytest.raises(ConfigError) as info:
        fedcare.train_site(sites[0], **arguments)
    assert needle in str(info.value)
    assert not (tmp_path / "state").exists()


def test_read_ledger_refuses_a_folder_without_one_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no privacy ledger at"):
        fedcare.read_ledger(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("front", [fedcare.verify_run, fedcare.audit_run, fedcare.audit_report])
def test_the_audits_refuse_a_folder_that_is_not_there(tmp_path: Path, front: Any) -> None:
    with pytest.raises(ConfigError, match="no such run directory; pass the folder a run wrote"):
        front(tmp_path / "missing")


# --------------------------------------------------------------------------- simulate


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"in_process": True, "timeout_s": 60.0}, "timeout_s cannot be applied"),
        ({"settings": {"strategy": "fedsgd"}}, "unknown strategy 'fedsgd'; registered"),
        ({"settings": {"num-server-round": 2}}, "num-server-round: unknown key"),
    ],
)
def test_simulate_refuses_before_anything_runs(
    sites: list[Path], tmp_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        fedcare.simulate(out=out, sites=sites[0].parent, **kwargs)
    assert needle in str(info.value)
    assert not out.exists()


def test_simulate_in_process_refuses_where_flower_s_telemetry_is_on(
    sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore import telemetry

    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "1")
    with pytest.raises(ConfigError, match="set os.environ\\['FLWR_TELEMETRY_ENABLED'\\] = '0'"):
        fedcare.simulate(out=tmp_path / "run", sites=sites[0].parent, in_process=True)
    assert not (tmp_path / "run").exists()


def test_the_in_process_run_config_is_the_one_flwr_run_fuses(tmp_path: Path) -> None:
    app = write_app_dir(
        tmp_path / "app",
        config_defaults=RUN_CONFIG_DEFAULTS,
        serverapp="fedcare.server.app:app",
        clientapp="fedcare.client.app:app",
    )
    handle = InProcessHandle(work_dir=tmp_path)
    run = handle.submit(app, run_config={"num-server-rounds": 3, "task": "x"}, num_supernodes=2)
    fused = handle._runs[run].run_config
    assert fused == {**RUN_CONFIG_DEFAULTS, "num-server-rounds": 3, "task": "x"}
    with pytest.raises(ConfigError, match="'no-such-key'.*\\[tool.flwr.app.config\\]"):
        handle.submit(app, run_config={"no-such-key": 1}, num_supernodes=2)
    with pytest.raises(ConfigError, match="at least 1"):
        handle.submit(app, run_config={}, num_supernodes=0)


def _context(node_config: dict[str, Any]) -> Context:
    return Context(
        run_id=7, node_id=3, node_config=node_config, state=RecordDict(), run_config={"a": 1}
    )


def test_the_apps_see_the_run_config_on_a_context_flower_takes_back_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedcare.client.app
    import fedcare.server.app

    seen: dict[str, Context] = {}

    def fake_site(message: Message, context: Context) -> Message:
        seen["site"] = context
        return message

    def fake_centre(grid: Any, context: Context) -> None:
        seen["centre"] = context

    monkeypatch.setattr(fedcare.client.app, "app", fake_site)
    monkeypatch.setattr(fedcare.server.app, "app", fake_centre)
    run_config = {"num-server-rounds": 4}
    context = _context({"partition-id": 1})
    with task_identity(run_id=7):
        for kind in ("train", "evaluate"):
            message = Message(RecordDict(), dst_node_id=3, message_type=kind)
            assert site_app(run_config)(message, context) is message
            assert seen["site"].run_config == run_config
            assert seen["site"].state is context.state
            assert seen["site"].node_config is context.node_config
    centre_app(run_config)(object(), context)  # type: ignore[arg-type]
    assert seen["centre"].run_config == run_config
    assert context.run_config == {"a": 1}  # Flower refuses a context whose config changed


# --------------------------------------------------------------------------- a real run

PLUGIN = """
from pydantic import PositiveInt
from torch import nn

from fedcare.models import HParams, register_model
from fedcare.models.registry import feature_dim


class TinyConfig(HParams):
    hidden: PositiveInt = 4


@register_model("api_tiny_mlp", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)
class TinyMLP(nn.Module):
    '''A plug-in's model.'''

    Config = TinyConfig

    def __init__(self, *, in_features, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @classmethod
    def from_config(cls, *, input_dims, config):
        width = feature_dim(input_dims, "ehr", model="api_tiny_mlp")
        return cls(in_features=width, hidden=config.hidden)

    def forward(self, x):
        return self.net(x).squeeze(-1)
"""

RUN = """
import json, os, sys
from pathlib import Path

import flwr.simulation  # noqa: F401  (its import sets a Ray variable once, for good)
import fedcare

root = Path(sys.argv[1])
fedcare.synthesize(root / "sites", n_sites=2, seed=5, config=fedcare.SynthConfig(
    patients_per_site=60, n_genes=20, image_size=16, image_format="npy"))
before = dict(os.environ)
result = fedcare.simulate(
    out=root / "run", sites=root / "sites", in_process=True, baselines=False,
    settings={"task": "readmission", "num-server-rounds": 1, "model": "api_tiny_mlp",
              "target-epsilon": 2.0},
)
changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))
record = json.loads(result.record_path.read_text())
print(json.dumps({
    "changed": changed,
    "model": record["model"],
    "statuses": [s.status for s in result.summary.sites],
    "rounds": sorted(result.round_metrics),
    "epsilon_spent": result.epsilon_spent,
    "files": sorted(str(p.relative_to(result.run_dir)) for p in result.run_dir.rglob("*")
                    if p.is_file() and ".flower" not in p.parts),
    "verified": fedcare.verify_run(result.run_dir).ok,
    "ledger_runs": [c.run_id == result.run_id for c in
                    fedcare.read_ledger(result.state_dirs["site-1"]).charges],
}))
"""


def _processes_with(marker: str) -> list[str]:
    """Live processes whose environment holds ``marker`` (those the child started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:100]!r}")
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_an_in_process_run_uses_a_plugin_model_everywhere_and_leaves_no_trace(
    tmp_path: Path,
) -> None:
    (tmp_path / "api_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    marker = f"FEDCARE_TEST_RUN={tmp_path}"
    env = {
        "FEDCARE_PLUGINS": "api_plugin",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "FEDCARE_TEST_RUN": str(tmp_path),
    }
    child = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["changed"] == []  # the Flower environment was put back, PYTHONPATH included
    assert seen["model"] == "api_tiny_mlp"  # the ServerApp thread built the plug-in's model
    assert seen["statuses"] == ["completed", "completed"]  # so did both sites' Ray actors
    assert seen["rounds"] == [0, 1]
    assert all(0 < e <= 2.0 + RUN_CEILING_TOLERANCE for e in seen["epsilon_spent"].values())
    for name in (
        "config.toml",
        "sites.json",
        "server_record.json",
        "summary.json",
        "metrics.csv",
        "final_model.pt",
        "audit/server.jsonl",
        "state/site-0/ledger.sqlite",
        "state/site-1/audit.jsonl",
    ):
        assert name in seen["files"], name
    assert seen["verified"] is True
    assert seen["ledger_runs"] == [True]
    assert _processes_with(marker) == []
