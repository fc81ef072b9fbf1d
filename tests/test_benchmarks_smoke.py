"""The DP-overhead benchmark runs end to end at its tiniest settings (a benchmark, not a test).

It runs as ``python -m benchmarks.dp_overhead`` from the repository root, as documented:
opacus installs a top-level package also named ``benchmarks`` into site-packages, so only the
repository root on ``sys.path`` makes ``benchmarks`` resolve to fedcare's.
"""

from __future__ import annotations

import json
import math
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
    modes = {line.split("|")[4].strip() for line in rows[:2]}
    assert modes == {"ghost (auto)", "hooks"}

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["machine"]["threads"] == 1
    assert [r["mode"] for r in report["rows"]] == ["ghost", "hooks"]
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
