"""The run's ``summary.json``, built from the server's run record.

The ServerApp writes it at the end of every run (a deployment has no other writer); a
simulation rewrites it with its baselines added. Its schema is :mod:`fedcare.common.summary`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import flwr

from fedcare.common.summary import SUMMARY_NAME, RunSummary

__all__ = ["build_summary", "fedcare_version", "SUMMARY_NAME"]


def fedcare_version() -> str:
    """The installed fedcare distribution's version."""
    try:
        return metadata.version("fedcare")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def build_summary(record: dict[str, Any], baselines: dict[str, Any] | None = None) -> RunSummary:
    """The validated ``summary.json`` of a run, from the server's record and the baselines."""
    rounds = sorted(record["rounds"], key=lambda e: e["round"])
    sites = []
    for site_id in sorted(record["sites"]):
        site = record["sites"][site_id]
        privacy = dict(site["privacy"])
        privacy["mechanisms"] = [
            {k: m[k] for k in ("noise_multiplier", "sample_rate", "steps")}
            for m in sorted(privacy["mechanisms"], key=lambda m: m["round"])
        ]
        sites.append({**site, "privacy": privacy})
    final = rounds[-1]["metrics"] if rounds else {}
    data = {
        "run_id": record["run_id"],
        "fedcare_version": fedcare_version(),
        "flwr_version": flwr.__version__,
        "task": record["task"],
        "strategy": record["strategy"],
        "personalization": record.get("personalization", "none"),  # older records: none
        "rounds_planned": record["rounds_planned"],
        "rounds_completed": record["rounds_completed"],
        "sites": sites,
        "global": {
            "rounds": [{"round": e["round"], "metrics": e["metrics"]} for e in rounds],
            "final": final,
        },
        "baselines": baselines or {"local_only": {}, "pooled": {}},
        "events": record["events"],
    }
    return RunSummary.model_validate(data)
