"""The released survival curves' plot (``plots/survival_predicted.png``): drawn from the
summary's ``survival`` exactly, and only where the run has one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from fedcare.common.summary import RunSummary, SurvivalCurves, write_summary
from fedcare.simulations.reports import (
    RELEASED_SURVIVAL_NAME,
    plot_released_survival,
    write_released_survival,
)

CURVES = {
    "round": 2,
    "cuts": [365.0, 730.0, 1095.0],
    "time_unit": "days",
    "n": 90.0,
    "at_risk": [90.0, 60.0],
    "events": [18.0, 12.0],
    "observed": [0.8, 0.64],
    "predicted": [0.82, 0.66, 0.5],
    "sites": {"site-a": {"n": 50.0, "observed": [0.78], "predicted": [0.8, 0.6, 0.5]}},
}
SUMMARY = {
    "run_id": "r",
    "fedcare_version": "0",
    "flwr_version": "1.42.0",
    "task": "survival",
    "strategy": "fedavg",
    "rounds_planned": 2,
    "rounds_completed": 2,
    "sites": [],
    "global": {},
    "survival": CURVES,
}


def test_the_plot_draws_the_released_curves_from_time_zero(tmp_path: Path) -> None:
    fig = plot_released_survival(SurvivalCurves.model_validate(CURVES), tmp_path / "p.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    observed = lines["observed (Kaplan-Meier, pooled)"]
    np.testing.assert_allclose(observed.get_xdata(), [0.0, 365.0, 730.0])
    np.testing.assert_allclose(observed.get_ydata(), [1.0, 0.8, 0.64])
    predicted = lines["predicted (mean, global model)"]
    np.testing.assert_allclose(predicted.get_xdata(), [0.0, 365.0, 730.0, 1095.0])
    np.testing.assert_allclose(predicted.get_ydata(), [1.0, 0.82, 0.66, 0.5])
    np.testing.assert_allclose(lines["site-a observed"].get_ydata(), [1.0, 0.78])
    assert (tmp_path / "p.png").stat().st_size > 0


def test_only_a_run_with_curves_gets_the_plot(tmp_path: Path) -> None:
    assert write_released_survival(tmp_path / "none") == []
    without = copy.deepcopy(SUMMARY)
    del without["survival"]
    write_summary(RunSummary.model_validate(without), tmp_path / "binary" / "summary.json")
    assert write_released_survival(tmp_path / "binary") == []
    write_summary(RunSummary.model_validate(SUMMARY), tmp_path / "surv" / "summary.json")
    assert write_released_survival(tmp_path / "surv") == [
        tmp_path / "surv" / "plots" / RELEASED_SURVIVAL_NAME
    ]
    assert json.loads((tmp_path / "surv" / "summary.json").read_text())["survival"] == CURVES
