"""Baselines: local-only (throwaway ledgers, federation's budget) and pooled (centralized)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedcare.client.data.datasets import build_task_data
from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.policy import SitePolicy, simulated_site_policy
from fedcare.client.training import TrainConfig
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.simulations.baselines import LOCAL_ONLY_RUN_ID, local_only, pooled
from fedcare.simulations.synth import SynthConfig, synthesize

TASK = "readmission"
SEED = 0
ROUNDS = 2
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=1e-2, device="cpu")
NO_DP = DPConfig(enabled=False)
# RDP keeps the test fast (PRV's domain search costs seconds per ε); 2 rounds show that the
# noise is planned for the whole run, not per round.
TARGET_EPSILON = 4.0
DP = DPConfig(target_epsilon=TARGET_EPSILON, delta=1e-5, accountant="rdp")


def _policy(dp: DPConfig) -> SitePolicy:
    """The policy the federation's simulated sites would enforce for a run like this one."""
    cfg = FederationConfig(
        dp=dp.enabled,
        accountant=dp.accountant,
        target_delta=dp.delta,
        local_epochs=TRAIN.epochs,
        num_server_rounds=ROUNDS,
    )
    return simulated_site_policy(cfg)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def site_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic hospitals of about 200 patients each."""
    out = tmp_path_factory.mktemp("baselines") / "sites"
    config = SynthConfig(patients_per_site=200, n_genes=12, image_size=16)
    return synthesize(out, n_sites=3, seed=SEED, config=config)


@pytest.fixture(scope="session")
def sites(site_dirs: list[Path]) -> list[SiteData]:
    return [load_site(d) for d in site_dirs]


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def local_plain(sites: list[SiteData]) -> dict[str, dict[str, float]]:
    return local_only(
        sites, task=TASK, train=TRAIN, dp=NO_DP, policy=_policy(NO_DP), rounds=ROUNDS, seed=SEED
    )


@dataclass(frozen=True)
class DPRun:
    """A DP local-only run and what surrounds it."""

    result: dict[str, dict[str, float]]
    ledger_dir: Path
    run_folder: Path
    site_files_before: dict[Path, set[Path]]


@pytest.fixture(scope="module")
def local_dp(
    sites: list[SiteData], site_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> DPRun:
    before = {d: _files(d) for d in site_dirs}
    ledger_dir = tmp_path_factory.mktemp("baseline-ledgers")
    result = local_only(
        sites,
        task=TASK,
        train=TRAIN,
        dp=DP,
        policy=_policy(DP),
        rounds=ROUNDS,
        seed=SEED,
        ledger_dir=ledger_dir,
    )
    (run_folder,) = [p for p in ledger_dir.iterdir() if p.is_dir()]
    return DPRun(result, ledger_dir, run_folder, before)


@pytest.fixture(scope="module")
def pooled_metrics(sites: list[SiteData]) -> dict[str, float]:
    return pooled(sites, task=TASK, train=TRAIN, rounds=ROUNDS, seed=SEED)


# ------------------------------------------------------------------ local-only


def _check_site_metrics(metrics: dict[str, dict[str, float]], sites: list[SiteData]) -> None:
    assert set(metrics) == {s.spec.site_id for s in sites}
    for site in sites:
        m = metrics[site.spec.site_id]
        sizes = build_task_data(site, TASK, seed=SEED).n
        # Evaluated on the site's own splits, the ones the federation uses.
        assert m["val.n"] == sizes["val"]
        assert m["test.n"] == sizes["test"]
        for key in ("val.auroc", "test.auroc"):
            assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0


def test_local_only_without_dp_one_entry_per_site(
    local_plain: dict[str, dict[str, float]], sites: list[SiteData]
) -> None:
    _check_site_metrics(local_plain, sites)


def test_local_only_with_dp_one_entry_per_site(local_dp: DPRun, sites: list[SiteData]) -> None:
    _check_site_metrics(local_dp.result, sites)


def test_local_only_never_touches_site_folders(local_dp: DPRun, site_dirs: list[Path]) -> None:
    for d in site_dirs:
        assert _files(d) == local_dp.site_files_before[d], f"{d} changed"
        assert not list(d.rglob("*.sqlite*"))


def test_local_only_charges_only_throwaway_ledgers_for_the_whole_run(
    local_dp: DPRun, sites: list[SiteData]
) -> None:
    run_folder = local_dp.run_folder
    ledgers = sorted(run_folder.rglob("*.sqlite"))
    assert ledgers == sorted(run_folder / s.spec.site_id / "ledger.sqlite" for s in sites)
    for site in sites:
        ledger = PrivacyLedger(run_folder / site.spec.site_id / "ledger.sqlite", create=False)
        charges = ledger.charges(ledger.cohort_key(site.patient_ids))
        assert [(c.run_id, c.round, c.status) for c in charges] == [
            (LOCAL_ONLY_RUN_ID, r, "completed") for r in range(1, ROUNDS + 1)
        ]
        # One epoch per round of Poisson batches with q = 1 / ceil(n / batch).
        n_train = build_task_data(site, TASK, seed=SEED).n["train"]
        batches = math.ceil(n_train / TRAIN.batch_size)
        sigmas = {c.mechanism.noise_multiplier for c in charges}
        assert len(sigmas) == 1, "noise must be fixed once for the whole run"
        for c in charges:
            assert c.mechanism.steps == TRAIN.epochs * batches
            assert c.mechanism.sample_rate == pytest.approx(1.0 / batches)
        # The same target ε as the federation, reached at the end of the run (independent
        # recomputation with Opacus's RDP accountant).
        accountant = RDPAccountant()
        accountant.history = [(sigmas.pop(), 1.0 / batches, ROUNDS * TRAIN.epochs * batches)]
        eps = accountant.get_epsilon(delta=DP.delta)
        assert 0.9 * TARGET_EPSILON <= eps <= TARGET_EPSILON * 1.001
        assert charges[0].epsilon_after < 0.9 * TARGET_EPSILON


def test_local_only_each_call_gets_fresh_ledgers_and_repeats(
    local_dp: DPRun, sites: list[SiteData]
) -> None:
    again = local_only(
        sites[:1],
        task=TASK,
        train=TRAIN,
        dp=DP,
        policy=_policy(DP),
        rounds=ROUNDS,
        seed=SEED,
        ledger_dir=local_dp.ledger_dir,
    )
    site_id = sites[0].spec.site_id
    assert again[site_id] == local_dp.result[site_id]
    folders = [p for p in local_dp.ledger_dir.iterdir() if p.is_dir()]
    assert len(folders) == 2
    for folder in folders:
        ledger = PrivacyLedger(folder / site_id / "ledger.sqlite", create=False)
        assert len(ledger.charges(ledger.cohort_key(sites[0].patient_ids))) == ROUNDS


def test_local_only_without_ledger_dir_leaves_nothing(
    sites: list[SiteData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = local_only(
        sites[:1], task=TASK, train=TRAIN, dp=DP, policy=_policy(DP), rounds=1, seed=SEED
    )
    assert set(result) == {sites[0].spec.site_id}
    assert list(tmp_path.iterdir()) == []


def test_local_only_is_deterministic(
    local_plain: dict[str, dict[str, float]], sites: list[SiteData]
) -> None:
    again = local_only(
        sites, task=TASK, train=TRAIN, dp=NO_DP, policy=_policy(NO_DP), rounds=ROUNDS, seed=SEED
    )
    assert again == local_plain


def test_local_only_refuses_a_ledger_dir_inside_a_site(
    sites: list[SiteData], site_dirs: list[Path]
) -> None:
    with pytest.raises(ConfigError, match="inside site"):
        local_only(
            sites,
            task=TASK,
            train=TRAIN,
            dp=DP,
            policy=_policy(DP),
            rounds=1,
            ledger_dir=site_dirs[1] / ".fedcare",
        )
    assert not (site_dirs[1] / ".fedcare").exists()


# ------------------------------------------------------------------ pooled


def test_pooled_beats_chance_on_the_union_of_test_splits(
    pooled_metrics: dict[str, float], sites: list[SiteData]
) -> None:
    sizes = [build_task_data(s, TASK, seed=SEED).n for s in sites]
    assert pooled_metrics["test.n"] == sum(n["test"] for n in sizes)
    assert pooled_metrics["val.n"] == sum(n["val"] for n in sizes)
    assert pooled_metrics["test.auroc"] > 0.6
    assert 0.0 <= pooled_metrics["test.brier"] <= 1.0


def test_pooled_is_deterministic_and_seed_dependent(
    pooled_metrics: dict[str, float], sites: list[SiteData]
) -> None:
    assert pooled(sites, task=TASK, train=TRAIN, rounds=ROUNDS, seed=SEED) == pooled_metrics
    other = pooled(sites, task=TASK, train=TRAIN, rounds=ROUNDS, seed=SEED + 1)
    assert other != pooled_metrics


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("rounds", [0, -1])
def test_rounds_must_be_positive(sites: list[SiteData], rounds: int) -> None:
    with pytest.raises(ConfigError, match="rounds"):
        pooled(sites, task=TASK, train=TRAIN, rounds=rounds)
    with pytest.raises(ConfigError, match="rounds"):
        local_only(sites, task=TASK, train=TRAIN, dp=NO_DP, policy=_policy(NO_DP), rounds=rounds)


def test_sites_must_be_given_once_each(sites: list[SiteData]) -> None:
    with pytest.raises(ConfigError, match="at least one site"):
        pooled([], task=TASK, train=TRAIN, rounds=1)
    with pytest.raises(ConfigError, match="more than once"):
        local_only(
            [sites[0], sites[0]], task=TASK, train=TRAIN, dp=NO_DP, policy=_policy(NO_DP), rounds=1
        )
