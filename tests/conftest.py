"""Suite-wide settings: Flower never phones home nor installs packages at run time; and the
one real DP federation that several directories' tests read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
# Tiny models on 2 cores: one intra-op thread is several times faster than two contending.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA exists; elsewhere they are skipped with the reason. And
    ``xdist_group`` works under pytest 9 (:func:`_group_for_xdist`)."""
    _group_for_xdist(config, items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _group_for_xdist(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give a test marked ``xdist_group(name)`` the node id ``<id>@<name>`` on an xdist worker
    under ``--dist loadgroup``, which is how the controller sends a group to one worker.

    pytest-xdist 3.8 does this by assigning ``item._nodeid``, which pytest 9 no longer reads
    (a node id is now ``str(item._id)``): the groups were silently ignored, and the suite's
    shared fixtures (one deployment, one audited run) started once per worker.
    """
    from _pytest.nodeid import NodeId

    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})  # fmt: skip
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)  # type: ignore[attr-defined]


#: The xdist group of every test that reads ``audited_run``: ``--dist loadgroup`` (the
#: Makefile's) sends them to one worker, which runs the federation once.
AUDITED_RUN_GROUP = "audited-run"


@dataclass(frozen=True)
class AuditedRun:
    """A finished simulated run (``run``) and the synthetic hospitals it trained on (``sites``).

    Tests read it; one that changes a file in ``run`` puts it back before it ends.
    """

    sites: Path
    run: Path
    task: str


@pytest.fixture(scope="session")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    """One real DP federation (fedcare's ServerApp and ClientApp under ``flwr run`` on a local
    simulation SuperLink), read by the privacy audit (tests/integration/test_audit.py) and
    by the model card (tests/simulations/audit_report/test_model_card_run.py): two synthetic
    hospitals with patient groups, exact evaluation (their ``site.toml``'s simulation opt-in),
    two rounds of two local epochs each at a target ε of 3, feature attributions on.
    """
    from fedcare.simulations.runner import run_experiment
    from fedcare.simulations.scenario import Scenario
    from fedcare.simulations.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("audited-run")
    sites = root / "sites"
    config = SynthConfig(
        patients_per_site=260, size_skew=0.0, n_genes=12, image_size=16, image_format="npy",
        groups=True, group_shift=0.8,
    )  # fmt: skip
    synthesize(sites, n_sites=2, seed=21, config=config)
    task = "readmission"
    scenario = Scenario(
        name="audited",
        sites=2,
        data_root=str(sites),
        baselines=False,
        federation={
            "task": task,
            "num-server-rounds": 2,
            "local-epochs": 2,
            "target-epsilon": 3.0,
            "explain": True,
        },
    )
    run = root / "run"
    run_experiment(scenario, run)
    return AuditedRun(sites=sites, run=run, task=task)
