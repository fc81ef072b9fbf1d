"""Real time-to-event hospitals from scikit-survival: written, validated, loaded, labelled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sksurv.datasets import load_breast_cancer, load_gbsg2, load_whas500

from fedcare.client.accounting import calibrate_noise
from fedcare.client.data.data_checks import validate_site
from fedcare.client.data.datasets import build_task_data
from fedcare.client.data.loaders import load_site
from fedcare.client.data.split import split_patients
from fedcare.client.dpsgd import resolve_grad_sample_mode, sampling
from fedcare.client.policy import SitePolicy
from fedcare.common.encoding import input_dims
from fedcare.common.errors import DataValidationError
from fedcare.common.federation import FederationConfig
from fedcare.common.spec import load_site_spec
from fedcare.models import build_model, model_info
from fedcare.simulations.realdata import MANIFEST_FILENAME, dataset, write_real_sites
from fedcare.simulations.realdata.survival import EVENT, TIME, hospital_of

SOURCES = {"gbsg2": load_gbsg2, "whas500": load_whas500, "gse7390": load_breast_cancer}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("survival-sites")
    return {name: write_real_sites(dataset(name), root / name, seed=3) for name in SOURCES}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_patient_is_written_once_with_its_time_and_event(
    written: dict[str, list[Path]], name: str
) -> None:
    x, y = SOURCES[name]()
    event_field, time_field = y.dtype.names
    folders = written[name]
    tables = [pd.read_csv(f / "ehr.csv") for f in folders]
    both = pd.concat(tables, ignore_index=True)
    assert len(both) == len(x) and both["patient_id"].is_unique
    order = both["patient_id"].str.rsplit("-", n=1).str[1].astype(int).to_numpy()
    np.testing.assert_allclose(both[TIME].to_numpy(), y[time_field][order])
    np.testing.assert_array_equal(both[EVENT].to_numpy(), y[event_field][order].astype(int))
    manifest = json.loads((folders[0].parent / MANIFEST_FILENAME).read_text())
    assert manifest["source"]["package"] == "scikit-survival"
    assert manifest["n_patients"] == len(x)
    assert sum(s["n_positive"] for s in manifest["sites"]) == int(y[event_field].sum())
    for folder in folders:
        assert validate_site(folder).ok
        label = load_site_spec(folder).labels[0]
        assert label.kind == "survival" and label.time_column == TIME and label.cuts


def test_sites_are_dealt_by_row_hash_not_by_value() -> None:
    sites = [hospital_of(i, dataset="gbsg2", sites=3) for i in range(686)]
    assert sorted(set(sites)) == [0, 1, 2]
    assert sites == [hospital_of(i, dataset="gbsg2", sites=3) for i in range(686)]
    assert min(np.bincount(sites)) > 686 / 3 * 0.8


def test_a_survival_site_loads_as_time_and_event_targets(written: dict[str, list[Path]]) -> None:
    site = load_site(written["gbsg2"][0])
    data = build_task_data(site, "recurrence")
    y = data.train.y.numpy()  # type: ignore[attr-defined]
    assert y.shape == (data.n["train"], 2)
    assert set(np.unique(y[:, 1])) == {0.0, 1.0} and (y[:, 0] > 0).all()
    spec = site.spec  # the server builds the same model from the schema alone
    assert data.input_dims == input_dims(spec.feature_schema, spec.task("recurrence"))


def test_gse7390_reads_its_gene_expression(written: dict[str, list[Path]]) -> None:
    site = load_site(written["gse7390"][1])
    data = build_task_data(site, "metastasis")
    assert data.modalities == ("genomics",) and data.input_dims == {"genomics": 76}
    assert data.train.y.shape[1] == 2  # type: ignore[attr-defined]


def _corrupt(folder: Path, tmp: Path, change: dict[str, object], *, rows: int = 1) -> Path:
    import shutil

    copy = tmp / f"site-{abs(hash(str(change))) % 10_000}"
    shutil.copytree(folder, copy)
    table = pd.read_csv(copy / "ehr.csv", dtype=str)
    for column, value in change.items():
        table.loc[: rows - 1, column] = value
    table.to_csv(copy / "ehr.csv", index=False)
    return copy


@pytest.mark.parametrize(
    ("change", "rule", "column", "message"),
    [
        ({TIME: "-3"}, "out_of_range", TIME, "is negative"),
        ({TIME: "inf"}, "non_finite", TIME, "is infinite"),
        ({TIME: "soon"}, "not_numeric", TIME, "is not a number"),
        ({TIME: ""}, "not_numeric", TIME, "is missing"),
        ({EVENT: "2"}, "not_binary", EVENT, "other than 0 and 1"),
    ],
)
def test_a_bad_time_or_event_is_named_with_its_column_and_row(
    written: dict[str, list[Path]],
    tmp_path: Path,
    change: dict[str, object],
    rule: str,
    column: str,
    message: str,
) -> None:
    site = _corrupt(written["gbsg2"][0], tmp_path, change)
    report = validate_site(site)
    found = [p for p in report.errors if p.rule == rule and p.column == column]
    assert found and message in found[0].message and found[0].row == 1, report.errors
    with pytest.raises(DataValidationError, match="recurrence"):
        load_site(site)


def test_an_all_censored_site_is_refused(written: dict[str, list[Path]], tmp_path: Path) -> None:
    site = _corrupt(written["gbsg2"][0], tmp_path, {EVENT: "0"}, rows=10_000)
    errors = validate_site(site).errors
    assert any("all" in p.message and "censored" in p.message for p in errors), errors


def test_an_event_written_as_a_float_is_read_as_the_event(
    written: dict[str, list[Path]], tmp_path: Path
) -> None:
    site = _corrupt(written["gbsg2"][0], tmp_path, {EVENT: "1.0"}, rows=3)
    assert validate_site(site).ok
    labels = load_site(site).labels
    first = sorted(labels.index)[:3]
    assert (labels.loc[first, "recurrence"] == 1.0).all()


def test_gse7390_trains_the_linear_risk_score_at_full_batch(
    written: dict[str, list[Path]],
) -> None:
    """The settings ``benchmarks/results/survival.md`` measured as GSE7390's current row
    (the linear score, 10 rounds at learning rate 1, full batch); a registered model of the
    task's modality, 77 parameters on its genes, trained by ``auto``'s bookkeeping."""
    gse = dataset("gse7390")
    assert dict(gse.run_config) == {
        "model": "genomics_linear",
        "batch-size": 198,
        "learning-rate": 1.0,
        "num-server-rounds": 10,
    }
    cfg = FederationConfig.from_run_config({"task": gse.task, **gse.run_config})
    assert model_info(cfg.model).modalities == gse.modalities
    assert resolve_grad_sample_mode("auto", cfg.model) == "bookkeeping"
    data = build_task_data(load_site(written["gse7390"][0]), gse.task)
    model = build_model(cfg.model, input_dims=data.input_dims)
    assert sum(p.numel() for p in model.parameters()) == 77


def test_the_benchmark_trains_the_datasets_model_federated_and_pooled(
    written: dict[str, list[Path]], tmp_path: Path
) -> None:
    """``benchmarks/survival.py``: GSE7390's model is the federation's and the pooled model's
    architecture (the genomics MLP is the extra pooled reference); its other settings are
    the federation's only; GBSG2 and WHAS500 name nothing."""
    from benchmarks.survival import dataset_model, dataset_run_config, run_configs

    assert dataset_model("gse7390") == "genomics_linear"
    assert "model" not in dataset_run_config("gse7390")
    fed, pooled = run_configs(
        "gse7390",
        written["gse7390"][0].parent,
        seed=3,
        epsilon=8.0,
        rounds=10,
        work=tmp_path,
        model=dataset_model("gse7390"),
        overrides=dataset_run_config("gse7390"),
    )
    assert fed.model == pooled.model == "genomics_linear"
    assert (fed.batch_size, fed.learning_rate, fed.num_server_rounds) == (198, 1.0, 10)
    assert (pooled.batch_size, pooled.learning_rate, pooled.num_server_rounds) == (0, 0.0, 10)
    for name in ("gbsg2", "whas500"):
        assert dataset_model(name) == "" and dataset_run_config(name) == {}


def test_gse7390s_run_config_makes_every_step_a_sites_whole_train_split() -> None:
    """GSE7390 trains by full-batch DP gradient descent: under its run config every site of
    every split seed the benchmark reports (0-19) takes one Poisson step of rate 1 per round,
    and the default site policy accepts the run (its noise floor, rounds and evaluations)."""
    gse = dataset("gse7390")
    cfg = FederationConfig.from_run_config({"task": gse.task, **gse.run_config})
    policy = SitePolicy()
    hospitals = gse.hospitals(gse.read().frame)
    for seed in range(20):
        for h in hospitals:
            n_train = split_patients(h.table["patient_id"].tolist(), seed=seed).sizes()["train"]
            assert 50 < n_train <= cfg.batch_size
            q, steps = sampling(n_train, batch_size=cfg.batch_size, epochs=cfg.local_epochs)
            assert (q, steps) == (1.0, 1)
    for h in hospitals:
        policy.check_run(
            site_id=h.site_id,
            rounds=cfg.num_server_rounds,
            evaluations=len(cfg.evaluation_rounds),
            target_epsilon=cfg.target_epsilon,
        )
    sigma = calibrate_noise(
        target_epsilon=cfg.target_epsilon,
        delta=cfg.target_delta,
        sample_rate=1.0,
        steps=cfg.num_server_rounds * cfg.local_epochs,
    )
    policy.check_noise(site_id=hospitals[0].site_id, noise_multiplier=sigma)


def test_the_run_config_is_in_the_manifest_notes(written: dict[str, list[Path]]) -> None:
    notes = json.loads((written["gse7390"][0].parent / MANIFEST_FILENAME).read_text())[
        "preprocessing"
    ]
    (line,) = [n for n in notes if n.startswith("Train with run config")]
    assert all(f"{k} = {v!r}" in line for k, v in dataset("gse7390").run_config.items())
    for name in ("gbsg2", "whas500"):  # the recipe's settings: nothing to say
        assert not dataset(name).run_config
        manifest = json.loads((written[name][0].parent / MANIFEST_FILENAME).read_text())
        assert not [n for n in manifest["preprocessing"] if n.startswith("Train with")]
