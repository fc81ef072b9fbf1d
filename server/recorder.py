"""The run recorder: the server's record of a run, kept round by round and checkpointed.

:class:`RunRecorder` holds the run's :class:`~fedcare.common.run_record.RunRecord` while the
federation runs. The guard (:mod:`fedcare.server.guard`) validates each reply and tells the
recorder what it found: a site's refusal or failure, a rejected update, an accepted update
with the numbers the site reported (:class:`TrainReport`), a drop-out, a skipped round, a
site's evaluation and the round's global metrics. After every round the recorder
checkpoints the global model, the record and the server optimizer's state in one atomic
file (:mod:`fedcare.server.checkpoint`) and appends a line to ``progress.jsonl``; at the end
of the run :meth:`RunRecorder.finish` orders the record and :meth:`RunRecorder.write` writes
``server_record.json`` (:func:`~fedcare.common.run_record.write_run_record`).

A ``progress.jsonl`` line (one per round; round 0 is the initial evaluation)::

    {"round": 2, "of": 5, "elapsed_s": 12.3, "metrics": {"test.auroc": 0.71, ...},
     "evaluated_round": 1,
     "events": [{"round": 2, "site_id": "site-1", "kind": "dropped", "detail": "..."}]}

``metrics`` are the global metrics of the latest evaluation recorded so far, of round
``evaluated_round`` (``null`` before any): round r's evaluation travels with round r + 1's
train message (:mod:`fedcare.server.guard`), so the line written after round r usually shows
round r - 1's, and the last round's line its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedcare.common.federation import FederationConfig
from fedcare.common.run_files import PROGRESS_NAME
from fedcare.common.run_record import (
    RecordMechanism,
    RunRecord,
    SitePrivacy,
    SiteRecord,
)
from fedcare.common.summary import (
    CalibrationBin,
    EvaluationMode,
    Event,
    EventKind,
    Explanation,
    GroupInfo,
    Metrics,
    NoiseSource,
    SiteSurvivalCurve,
    SurvivalCurves,
)
from fedcare.models.survival_curves import CurveRelease, pooled_curve, site_curve
from fedcare.server.checkpoint import Checkpoint, OptimizerState, save_checkpoint

__all__ = ["EndStatus", "DPReport", "TrainReport", "RunRecorder"]

#: How a site's participation ends other than ``completed``: each a site status and an event
#: kind (:data:`fedcare.common.summary.SITE_STATUSES`, :data:`~fedcare.common.summary.EVENT_KINDS`).
EndStatus = Literal["refused", "failed", "diverged", "dropped", "rejected"]


@dataclass(frozen=True)
class DPReport:
    """What a site that trained with DP-SGD reported about its privacy (validated)."""

    epsilon: float
    run_epsilon: float | None
    delta: float
    accountant: str
    noise: NoiseSource | None
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class TrainReport:
    """The numbers an accepted training reply reports (validated by the guard).

    Attributes
    ----------
    num_examples:
        Training examples the site used.
    train_loss:
        Its training loss, where its evaluation is exact (``None`` otherwise).
    evaluation:
        How it releases evaluation metrics, where it said (``None`` otherwise).
    dp:
        Its privacy report when it trained with DP-SGD; ``None`` without DP.
    """

    num_examples: int
    train_loss: float | None
    evaluation: EvaluationMode | None
    dp: DPReport | None


class RunRecorder:
    """Keeps one run's record; see the module docstring.

    Parameters
    ----------
    cfg:
        The run's configuration.
    run_dir:
        Where the checkpoint, ``progress.jsonl`` and ``server_record.json`` go.
    run_id:
        The run's id.
    record:
        The record to extend (a resumed run's); a new, empty one by default.
    """

    def __init__(
        self,
        *,
        cfg: FederationConfig,
        run_dir: Path,
        run_id: str,
        record: RunRecord | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.record = (
            record
            if record is not None
            else RunRecord.start(
                run_id=run_id,
                task=cfg.task,
                model=cfg.model,
                strategy=cfg.strategy,
                personalization=cfg.personalization,
                rounds_planned=cfg.num_server_rounds,
                config=cfg.to_run_config(),
            )
        )
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ sites

    def site_of(self, node_id: int) -> str:
        """The site id a Flower node reported, or ``node-<id>`` before it reported one."""
        return self.record.nodes.get(str(node_id), f"node-{node_id}")

    def node_is(self, node_id: int, site_id: str) -> None:
        """Remember the site id a node's reply reported."""
        self.record.nodes[str(node_id)] = site_id

    def site(self, site_id: str) -> SiteRecord:
        """The record of ``site_id``; a new one (``completed``, nothing reported) if none."""
        site = self.record.sites.get(site_id)
        if site is None:
            site = SiteRecord(
                site_id=site_id,
                privacy=SitePrivacy(
                    enabled=self.cfg.dp, accountant=self.cfg.accountant if self.cfg.dp else None
                ),
            )
            self.record.sites[site_id] = site
        return site

    # ------------------------------------------------------------------ what happened

    def event(self, rnd: int, *, site_id: str, kind: EventKind, detail: str) -> Event:
        """Record that something went wrong with a site (``site_id``) or the round (``*``)."""
        event = Event(round=rnd, site_id=site_id, kind=kind, detail=detail)
        self.record.events.append(event)
        return event

    def site_ended(
        self,
        site_id: str,
        *,
        status: EndStatus,
        reason: str,
        epsilon: float | None = None,
        delta: float | None = None,
    ) -> SiteRecord:
        """A site's participation stopped being ``completed``: refused, failed, diverged,
        dropped or rejected, with the reason. ``epsilon``/``delta``: the ε its ledger
        reports with a refusal (kept only in a DP run)."""
        site = self.site(site_id)
        site.status, site.reason = status, reason
        if epsilon is not None and self.cfg.dp:
            site.privacy.enabled = True
            site.privacy.epsilon, site.privacy.delta = epsilon, delta
        return site

    def trained(self, rnd: int, site_id: str, report: TrainReport, *, norm: float) -> None:
        """An accepted update of round ``rnd``: what the site reported, and its norm."""
        site = self.site(site_id)
        site.n_train = report.num_examples
        if rnd not in site.rounds_participated:
            site.rounds_participated.append(rnd)
        if site.status != "refused":
            site.status, site.reason = "completed", None
        numbers: Metrics = {"update-norm": float(norm), "num-examples": report.num_examples}
        if report.train_loss is not None:
            numbers["train-loss"] = report.train_loss
        privacy = site.privacy
        if report.evaluation is not None:
            privacy.evaluation = report.evaluation
        dp = report.dp
        if dp is not None:
            privacy.enabled = True
            privacy.epsilon, privacy.run_epsilon = dp.epsilon, dp.run_epsilon
            privacy.delta, privacy.accountant, privacy.noise = dp.delta, dp.accountant, dp.noise
            if all(m.round != rnd for m in privacy.mechanisms):
                privacy.mechanisms.append(
                    RecordMechanism(
                        round=rnd,
                        noise_multiplier=dp.noise_multiplier,
                        sample_rate=dp.sample_rate,
                        steps=dp.steps,
                    )
                )
            numbers["epsilon"] = dp.epsilon
            if dp.run_epsilon is not None:
                numbers["run-epsilon"] = dp.run_epsilon
        self.record.round_entry(rnd).sites.setdefault(site_id, {}).update(numbers)

    def evaluated(
        self,
        rnd: int,
        site_id: str,
        *,
        metrics: Metrics,
        personal: Metrics,
        evaluation: EvaluationMode | None,
        epsilon: float | None,
        run_epsilon: float | None,
        delta: float | None,
    ) -> None:
        """A site's evaluation of round ``rnd``'s global model (and of its personal model).

        ``evaluation``, ``epsilon``, ``run_epsilon`` and ``delta`` are what its reply states
        about the release (``None`` where it did not say): a private evaluation is charged
        too, so the site's ε is the later (the larger; both are cumulative) of training's
        and evaluation's.
        """
        site = self.site(site_id)
        site.metrics = dict(metrics)
        entry = self.record.round_entry(rnd)
        if personal:
            site.personal_metrics = dict(personal)
            entry.personal[site_id] = dict(personal)
        privacy = site.privacy
        if evaluation is not None:
            privacy.evaluation = evaluation
        if epsilon is not None:
            privacy.epsilon = max(epsilon, privacy.epsilon or 0.0)
        if run_epsilon is not None:
            privacy.run_epsilon = max(run_epsilon, privacy.run_epsilon or 0.0)
        if privacy.epsilon is not None and privacy.delta is None and delta is not None:
            privacy.delta = delta
        if "test.n" in metrics:
            site.n_test = int(metrics["test.n"])
        entry.sites.setdefault(site_id, {}).update(metrics)

    def groups(self, groups: Sequence[GroupInfo]) -> None:
        """The federation's group attributes, which its per-group metrics name (kept once)."""
        if list(groups) != self.record.groups:
            self.record.groups = list(groups)

    def explanation(self, explanation: Explanation) -> None:
        """The final model's feature attributions (:func:`fedcare.server.guard.explanation_of`)."""
        self.record.explanation = explanation

    def survival(
        self,
        rnd: int,
        releases: Mapping[str, CurveRelease],
        *,
        cuts: Sequence[float],
        time_unit: str | None,
        min_count: int,
    ) -> None:
        """Round ``rnd``'s survival curves from the sites' releases
        (:mod:`fedcare.models.survival_curves`): each site's own, and the pooled ones (an
        interval's pooled count below ``min_count`` ends the observed curve)."""
        pooled = pooled_curve(list(releases.values()), min_count=min_count)
        if pooled is None:
            return
        self.record.survival = SurvivalCurves(
            round=rnd,
            cuts=tuple(float(c) for c in cuts),
            time_unit=time_unit,
            n=pooled.n,
            at_risk=pooled.at_risk,
            events=pooled.events,
            observed=pooled.observed,
            predicted=pooled.predicted,
            sites={
                site: SiteSurvivalCurve(n=own.n, observed=own.observed, predicted=own.predicted)
                for site, rel in sorted(releases.items())
                for own in (site_curve(rel),)
            },
        )

    def calibration(self, rnd: int, curve: Sequence[tuple[int, float, float, float]]) -> None:
        """The global test calibration curve of round ``rnd``: ``(bin, mean predicted,
        observed, n)`` per bin (:func:`fedcare.models.fairness.global_calibration`)."""
        self.record.round_entry(rnd).calibration = [
            CalibrationBin(bin=b, mean_predicted=m, observed=o, n=n) for b, m, o, n in curve
        ]

    def global_metrics(self, rnd: int, metrics: Metrics) -> None:
        """The global metrics of round ``rnd``'s evaluation."""
        self.record.round_entry(rnd).metrics = dict(metrics)

    def round_recorded(self, rnd: int) -> None:
        """Make sure round ``rnd`` has an entry (a round without evaluation has one too)."""
        self.record.round_entry(rnd)

    # ------------------------------------------------------------------ files

    def checkpoint(
        self,
        rnd: int,
        *,
        arrays: Mapping[str, np.ndarray],
        optimizer: OptimizerState | None,
    ) -> None:
        """After round ``rnd`` (0: the start): checkpoint the model, the record and the
        optimizer's state in one atomic write, then append the round's progress line."""
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                run_id=self.run_id,
                round=rnd,
                arrays=dict(arrays),
                record=self.record.to_dict(),
                optimizer=optimizer,
            ),
        )
        evaluated = [e for e in self.record.rounds if e.round <= rnd and e.metrics]
        latest = max(evaluated, key=lambda e: e.round) if evaluated else None
        progress: dict[str, Any] = {
            "round": rnd,
            "of": self.cfg.num_server_rounds,
            "elapsed_s": round(time.monotonic() - self._t0, 2),
            "metrics": latest.metrics if latest is not None else {},
            "evaluated_round": latest.round if latest is not None else None,
            "events": [e.model_dump(mode="json") for e in self.record.events if e.round == rnd],
        }
        with open(self.run_dir / PROGRESS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(progress) + "\n")
