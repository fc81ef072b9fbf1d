"""Survival end to end: synthetic survival hospitals, the per-site curves, and a short DP
federation on real data (the survival benchmark at its smallest settings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcare.client.data.datasets import build_task_data
from fedcare.client.data.loaders import load_site
from fedcare.client.dpsgd import sampling
from fedcare.common.errors import ConfigError
from fedcare.models.survival_metrics import concordance_index
from fedcare.simulations.realdata import MANIFEST_FILENAME, dataset, write_real_sites
from fedcare.simulations.reports import plot_survival_curves
from fedcare.simulations.synth import SynthConfig, synthesize
from fedcare.simulations.synth.survival import EVENT_COLUMN, TIME_COLUMN


def test_synthetic_hospitals_can_carry_a_survival_task(tmp_path: Path) -> None:
    config = SynthConfig(
        patients_per_site=150, n_genes=20, image_size=16, image_format="npy", table_format="csv"
    )
    plain = synthesize(tmp_path / "plain", n_sites=2, seed=4, config=config)
    folders = synthesize(
        tmp_path / "surv", n_sites=2, seed=4, config=config.model_copy(update={"survival": True})
    )
    for a, b in zip(plain, folders, strict=True):  # its own stream: nothing else changes
        pd.testing.assert_frame_equal(pd.read_csv(a / "ehr.csv"), pd.read_csv(b / "ehr.csv"))
    site = load_site(folders[0])
    data = build_task_data(site, "survival")
    y = data.train.y.numpy()  # type: ignore[attr-defined]
    assert y.shape[1] == 2 and 0.2 < y[:, 1].mean() < 0.9 and y[:, 0].min() >= 1
    # The planted signal is there: the true risk ranks the patients well.
    truth = pd.read_csv(folders[0].parent / "synth_truth.csv")
    outcomes = pd.read_csv(folders[0] / "outcomes.csv")
    merged = outcomes.merge(truth, on="patient_id")
    c = concordance_index(
        merged[EVENT_COLUMN].to_numpy(), merged[TIME_COLUMN].to_numpy(), merged["survival_risk"]
    )
    assert c > 0.65


def test_survival_curves_are_drawn_per_site(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    curves = {
        f"site-{i}": (rng.integers(0, 2, 50).astype(float), rng.exponential(100.0, 50))
        for i in range(3)
    }
    fig = plot_survival_curves(curves, tmp_path / "curves.png", cuts=(50.0, 100.0))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "site-0 (n=50)",
        "site-1 (n=50)",
        "site-2 (n=50)",
    ]


@pytest.mark.slow
def test_a_short_dp_federation_trains_a_survival_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real ServerApp logic and ClientApp handlers, DP-SGD at ε 8, one round on GBSG2's
    three hospitals (benchmarks/survival.py, as documented). The benchmark's ``main`` is what
    ``python -m benchmarks.survival`` runs; it runs in this process, which has torch, Flower
    and fedcare imported already (a process of its own spends most of its time importing)."""
    from benchmarks import survival as survival_benchmark  # collected by every worker: here

    out = tmp_path / "survival.json"
    args = ["--datasets", "gbsg2", "--seeds", "1", "--rounds", "1", "--out", str(out)]
    assert survival_benchmark.main(args) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads(out.read_text())
    assert 0.55 < result["federated_c_index"] < 0.9 and 0.55 < result["pooled_c_index"] < 0.9
    assert all(0 < e <= 8.0 + 1e-6 for e in result["site_run_epsilon"])
    assert {"test.c_index", "test.td_auc", "test.ibs", "test.n"} <= set(result["server_global"])
    assert "| gbsg2 (ehr_mlp) | 1 |" in printed


def test_the_benchmarks_overrides_are_typed_and_bad_ones_named() -> None:
    from benchmarks.survival import parse_overrides

    assert parse_overrides(["batch-size=full", "learning-rate=1.5", "num-server-rounds=5"]) == {
        "batch-size": "full",
        "learning-rate": 1.5,
        "num-server-rounds": 5,
    }
    assert parse_overrides(["explain=true", "strategy=fedprox"]) == {
        "explain": True,
        "strategy": "fedprox",
    }
    with pytest.raises(ConfigError, match="'target-epsilon' itself.*--epsilon"):
        parse_overrides(["target-epsilon=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["learning-rate"])
    with pytest.raises(ConfigError, match="batch-size=half: give a whole number or 'full'"):
        parse_overrides(["batch-size=half"])


def test_overrides_reach_the_federation_never_the_pooled_reference(tmp_path: Path) -> None:
    """``--set`` and a dataset's run config change the federation only: the pooled model it
    is measured against keeps the non-private recipe and ``--rounds`` epochs; ``full`` is
    the largest site's train split, so every site steps at Poisson rate 1."""
    from benchmarks.survival import dataset_run_config, run_configs

    folders = write_real_sites(dataset("gse7390"), tmp_path / "sites", seed=7)
    overrides = {**dataset_run_config("gse7390"), "batch-size": "full", "learning-rate": 2.0}
    fed, pooled = run_configs(
        "gse7390",
        folders[0].parent,
        seed=7,
        epsilon=8.0,
        rounds=10,
        work=tmp_path,
        overrides=overrides,
    )
    manifest = json.loads((folders[0].parent / MANIFEST_FILENAME).read_text())
    sizes = [s["split"]["train"] for s in manifest["sites"]]
    assert fed.batch_size == max(sizes) and fed.learning_rate == 2.0
    assert fed.num_server_rounds == dataset_run_config("gse7390")["num-server-rounds"]
    assert all(sampling(n, batch_size=fed.batch_size, epochs=1) == (1.0, 1) for n in sizes)
    assert (pooled.batch_size, pooled.learning_rate, pooled.num_server_rounds) == (0, 0.0, 10)
    assert fed.model_dump(exclude={"batch_size", "learning_rate", "num_server_rounds"}) == (
        pooled.model_dump(exclude={"batch_size", "learning_rate", "num_server_rounds"})
    )
