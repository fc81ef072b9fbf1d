"""The run's ``summary.json``, built from the server's run record.

The ServerApp writes it at the end of every run (a deployment has no other writer); a
simulation rewrites it with its baselines added. Its schema is :mod:`fedcare.common.summary`;
the record it is built from, :mod:`fedcare.common.run_record`.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

import flwr

from fedcare.common.run_record import RunRecord
from fedcare.common.summary import SUMMARY_NAME, RunSummary

__all__ = ["build_summary", "fedcare_version", "SUMMARY_NAME"]


def fedcare_version() -> str:
    """The installed fedcare distribution's version."""
    try:
        return metadata.version("fedcare")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def build_summary(
    record: RunRecord | Mapping[str, Any], baselines: Mapping[str, Any] | None = None
) -> RunSummary:
    """The validated ``summary.json`` of a run, from the server's record and the baselines.

    ``record`` is a :class:`~fedcare.common.run_record.RunRecord` (the ServerApp's), or its
    JSON form as ``server_record.json`` holds it, validated first.
    """
    if not isinstance(record, RunRecord):
        record = RunRecord.from_dict(dict(record), source="the run record")
    return RunSummary.from_record(
        record,
        fedcare_version=fedcare_version(),
        flwr_version=flwr.__version__,
        baselines=baselines,
    )
