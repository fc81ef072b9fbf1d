"""The synthetic generator's group attributes and group-dependent shift, and the per-group
evaluation finding the planted gap."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fedcare.client.data.loaders import load_site
from fedcare.client.dpsgd import DPConfig
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig
from fedcare.simulations.synth import SynthConfig, synthesize

pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")]

TASK = "readmission"


def _synth(root: Path, shift: float, n: int = 1500) -> Path:
    config = SynthConfig(
        patients_per_site=n, size_skew=0.0, n_genes=12, image_size=16, image_format="npy",
        table_format="csv", groups=True, group_shift=shift, covariate_shift=0.0,
    )  # fmt: skip
    synthesize(root, n_sites=1, seed=4, config=config)
    return root


def _truth_by_sex(root: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    truth = pd.read_csv(root / "synth_truth.csv", dtype={"patient_id": str})
    ehr = pd.read_csv(root / "site-0" / "ehr.csv", dtype={"patient_id": str})
    frame = truth.merge(ehr[["patient_id", "sex"]], on="patient_id")
    auroc = {
        sex: roc_auc_score(rows["y_readmission"], rows["p_readmission"])
        for sex, rows in frame.groupby("sex")
    }
    return frame, auroc


def test_the_shift_weakens_the_signal_for_women_and_leaves_men_unchanged(tmp_path: Path) -> None:
    shifted, plain = _synth(tmp_path / "shifted", 0.9), _synth(tmp_path / "plain", 0.0)
    frame_s, auroc_s = _truth_by_sex(shifted)
    frame_p, auroc_p = _truth_by_sex(plain)
    men_s, men_p = frame_s[frame_s["sex"] == "M"], frame_p[frame_p["sex"] == "M"]
    assert np.array_equal(men_s["p_readmission"], men_p["p_readmission"])
    assert auroc_s["M"] - auroc_s["F"] > 0.15, auroc_s
    assert abs(auroc_p["M"] - auroc_p["F"]) < 0.08, auroc_p
    spec = load_site(shifted / "site-0").spec
    assert spec.task(TASK).groups == ("sex", "age_band")
    assert [g.name for g in spec.feature_schema.groups] == ["sex", "age_band"]


def test_an_evaluation_finds_the_planted_gap(tmp_path: Path) -> None:
    """A model trained (non-private) on the shifted site: the exact evaluation's per-group
    AUROC is lower for women, and the gap is what the groups' AUROCs say."""
    site = load_site(_synth(tmp_path, 0.9) / "site-0")
    site = dataclasses.replace(site, spec=site.spec.model_copy(update={"simulation": None}))
    trainer = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
    request = RoundRequest(
        run_id="gap",
        round=1,
        rounds_planned=1,
        task=TASK,
        train=TrainConfig(epochs=5, batch_size=64, lr=0.01, optimizer="adam", device="cpu"),
        dp=DPConfig(enabled=False),
        evaluation_rounds=(1,),
    )
    trained = trainer.train_round(request, trainer.build_model(TASK).state_dict())
    metrics = trainer.evaluate_round(request, trained.state).metrics
    women, men = metrics["test.group.sex.0.auroc"], metrics["test.group.sex.1.auroc"]
    assert men - women > 0.1, (women, men)
    assert metrics["test.gap.sex.auroc"] == pytest.approx(men - women)
