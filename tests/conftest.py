"""Suite-wide settings: Flower never phones home nor installs packages at run time; the
order in which the tests are handed out; one simulation SuperLink for the simulated runs
that do not test their own start and stop; and the one real DP federation that several
directories' tests read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from fedcare.simulations.flower_driver import SharedSuperLink

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
# Tiny models on 2 cores: one intra-op thread is several times faster than two contending.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA exists; elsewhere they are skipped with the reason. And
    ``xdist_group`` works under pytest 9 (:func:`_group_for_xdist`); the long modules go first
    (:func:`_long_modules_first`)."""
    _group_for_xdist(config, items)
    _long_modules_first(items)
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


def _long_modules_first(items: list[pytest.Item]) -> None:
    """Run the modules of real-process tests first, then the other slow ones, then the rest,
    each module's tests kept together and in their order (so a module fixture starts once
    per worker that runs the module).

    Under ``--dist loadgroup`` each worker is handed the next tests as it runs short of
    work, in this order: with the minute-long runs (Flower, Ray, a notebook, a benchmark)
    first, the two workers end together on the suite's many short tests, instead of one
    ending alone on a long test collected last (``tests/test_notebook.py`` sorts after
    ``tests/simulations/``).
    """

    def rank(module: list[pytest.Item]) -> int:
        marks = {mark.name for item in module for mark in item.iter_markers()}
        return 0 if "integration" in marks else 1 if "slow" in marks else 2

    def group(module: list[pytest.Item]) -> str | None:
        marks = module[0].iter_markers("xdist_group")
        return next((str(m.args[0] if m.args else m.kwargs["name"]) for m in marks), None)

    modules: dict[Path, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    # The modules of one xdist group follow the group's first: one worker runs them in a
    # row (without xdist too), so a fixture stopped after the group's last test
    # (tests/integration/conftest.py) is not started twice.
    ordered: dict[str | Path, list[pytest.Item]] = {}
    for module in sorted(modules.values(), key=rank):
        ordered.setdefault(group(module) or module[0].path, []).extend(module)
    items[:] = [item for run in ordered.values() for item in run]


#: The xdist group of every test that runs a federation on the session's one simulation
#: SuperLink (``simulation_superlink``), the readers of ``audited_run`` among them:
#: ``--dist loadgroup`` (the Makefile's) sends them to one worker, which starts the SuperLink
#: and its Ray cluster once and runs the audited federation once.
SHARED_SUPERLINK_GROUP = "shared-superlink"
AUDITED_RUN_GROUP = SHARED_SUPERLINK_GROUP
#: The fixture's name, and where it keeps the SuperLink for :func:`pytest_runtest_teardown`.
SHARED_SUPERLINK = "simulation_superlink"
_RUNNING_SUPERLINK = pytest.StashKey["SharedSuperLink"]()


@pytest.fixture(scope="session")
def simulation_superlink(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedSuperLink]:
    """One local simulation SuperLink and Ray cluster for the simulated runs of tests that
    do not check what a run starts and stops (tests/simulations/test_flower_driver.py and
    tests/integration/test_simulation.py do, each run on its own SuperLink): each start of
    the two costs about 6 CPU seconds and 10 s that a two-core test run cannot spare.
    Started by the first run; stopped after the last test in a row that takes it, rather
    than left idle to the session's end (an idle Ray cluster still costs about 2 CPU seconds
    every 30 s); a later test that asks starts it again."""
    from fedcare.simulations.flower_driver import SharedSuperLink

    shared = SharedSuperLink(work_dir=tmp_path_factory.mktemp("superlink"))
    request.config.stash[_RUNNING_SUPERLINK] = shared
    with shared:
        yield shared
    del request.config.stash[_RUNNING_SUPERLINK]


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test in a row that takes ``simulation_superlink`` (itself or through a
    fixture), stop it. ``nextitem`` is the test this process runs next (pytest-xdist holds
    a test back until it knows the next one)."""
    shared = item.config.stash.get(_RUNNING_SUPERLINK, None)
    if shared is None or SHARED_SUPERLINK not in getattr(item, "fixturenames", ()):
        return
    if nextitem is not None and SHARED_SUPERLINK in getattr(nextitem, "fixturenames", ()):
        return
    shared.__exit__(None, None, None)


@dataclass(frozen=True)
class AuditedRun:
    """A finished simulated run (``run``) and the synthetic hospitals it trained on (``sites``).

    Tests read it; one that changes a file in ``run`` puts it back before it ends.
    """

    sites: Path
    run: Path
    task: str


@pytest.fixture(scope="session")
def audited_run(
    tmp_path_factory: pytest.TempPathFactory, simulation_superlink: SharedSuperLink
) -> AuditedRun:
    """One real DP federation (fedcare's ServerApp and ClientApp under ``flwr run`` on the
    session's simulation SuperLink), read by the privacy audit (tests/integration/test_audit.py) and
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
    run_experiment(scenario, run, superlink=simulation_superlink)
    return AuditedRun(sites=sites, run=run, task=task)
