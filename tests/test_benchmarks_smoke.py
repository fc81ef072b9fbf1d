"""The DP-overhead and utility benchmarks run end to end at their tiniest settings (benchmarks,
not tests).

Each runs as ``python -m benchmarks.<name>`` from the repository root, as documented:
opacus installs a top-level package also named ``benchmarks`` into site-packages, so only the
repository root on ``sys.path`` makes ``benchmarks`` resolve to fedcare's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.dp_overhead", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_tiny_run_writes_consistent_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "dp.md"
    samples, batch = 512, 256
    proc = _run(
        "--models", "ehr_mlp", "--samples", str(samples), "--batch-size", str(batch),
        "--repeats", "1", "--threads", "1", "--breakdown", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    markdown = out.read_text()
    assert markdown in proc.stdout
    rows = [line for line in markdown.splitlines() if line.startswith("| ehr_mlp |")]
    modes = {line.split("|")[4].strip() for line in rows[:3]}
    assert modes == {"bookkeeping (auto)", "ghost", "hooks"}

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["machine"]["threads"] == 1
    assert [r["mode"] for r in report["rows"]] == ["bookkeeping", "ghost", "hooks"]
    for row in report["rows"]:
        # Poisson sampling at q = 1/ceil(n/B) runs as many steps as the shuffled loader.
        assert row["steps"] == math.ceil(samples / batch)
        assert row["phases"]["steps"] == row["non_private_phases"]["steps"] == row["steps"]
        # One repeat: the ratio is that round's DP time over its non-private time.
        assert row["ratio"] == pytest.approx(row["dp_seconds"][0] / row["non_private_seconds"][0])
        assert row["ratio"] > 0
        for phases in (row["phases"], row["non_private_phases"]):
            parts = sum(v for k, v in phases.items() if k not in ("total", "steps"))
            assert parts == pytest.approx(phases["total"], rel=1e-6)
        for memory in (row["memory"], row["non_private_memory"]):
            assert 0 < memory["rss_before_training_mb"] <= memory["peak_rss_mb"]
        # A fresh process per configuration: far below the parent's footprint of many cases.
        assert row["memory"]["peak_rss_mb"] < 4096


def test_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = _run("--models", "ehr_mlp", "--samples", "100", "--no-memory", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "batch size" in proc.stderr and "--samples" in proc.stderr


def _utility(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.utility", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )


def test_utility_quick_run_measures_every_method_on_both_datasets(tmp_path: Path) -> None:
    out = tmp_path / "utility.json"
    proc = _utility("--quick", "--methods", "local_only,ditto,pooled", "--out", str(out))
    assert proc.returncode == 0, proc.stderr

    report = json.loads(out.read_text())
    runs = report["runs"]
    assert sorted((r["dataset"], r["method"]) for r in runs) == sorted(
        (d, m) for d in ("synthetic", "heart_disease") for m in ("local_only", "ditto", "pooled")
    )
    assert proc.stderr.count("[utility] ") == len(runs)  # one progress line per run
    for run in runs:
        assert run["epsilon"] == (None if run["method"] == "pooled" else 8.0)
        assert 0.0 <= run["metrics"]["global"]["test.auroc"] <= 1.0
        if run["method"] != "ditto":
            continue
        # The real ServerApp ran all 3 rounds, every site answering every round.
        assert run["rounds_completed"] == 3 and run["events"] == {}
        assert set(run["metrics"]) == {"global", "personal", "served"}
        assert len(run["site_test"]) == 4
        # The exact pooled AUROC of the recorded predictions is close to the server's, which
        # comes from the sites' 100-bin releases (DP-trained models crowd their predictions
        # into few bins: ties cost the binned AUROC up to ~0.04 in the full benchmark).
        exact, server = run["metrics"]["global"], run["server_global"]
        assert exact["test.auroc"] == pytest.approx(server["test.auroc"], abs=0.06)
        assert exact["test.n"] == server["test.n"] == sum(n for n, _ in run["site_test"].values())
    assert "| 8 | ditto (personal models) |" in proc.stdout
    assert "| — | pooled (non-private) |" in proc.stdout
    assert set(report["summary"]) == {"synthetic", "heart_disease"}


def test_utility_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = _utility("--datasets", "mnist", "--out", str(tmp_path / "u.json"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--datasets" in proc.stderr and "heart_disease" in proc.stderr


def _federation_overhead(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.federation_overhead", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )


def test_federation_overhead_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = _federation_overhead("--sites", "0", "--out", str(tmp_path / "o.md"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--sites" in proc.stderr
