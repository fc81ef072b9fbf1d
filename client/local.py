"""One site's part of a round: policy, privacy ledger, DP-SGD, private evaluation.

:class:`SiteTrainer` is what the ClientApp (and the local-only baseline) calls. A training
round goes:

1. the site's policy vets the request (task, model, epochs, DP required) and the run's plan
   (rounds, evaluations, the ε it asks to add) against the site's per-run limits;
2. the run's ε allowance is fixed: a run's ``target-epsilon`` is what it may *add* to the
   dataset's lifetime ε (history across runs and overlapping cohorts, from the ledger); a
   run that cannot get it within the site's budget is refused before anything is charged;
3. the noise for the *whole run* is fixed once, at the run's first training round, by
   calibrating ``ε(history + remaining rounds + planned evaluations) <= ε(before the run) +
   target``; later rounds reuse it;
4. the round's mechanism is charged to the ledger and committed **before** training, under
   the run's ceiling, so a crash never under-counts and no run can take more than it was
   allowed; any failure after the charge marks the charge failed;
5. DP-SGD (Opacus, Poisson sampling) trains the model with randomness from the site's own
   OS entropy (:func:`fedcare.client.dpsgd.site_generators`);
6. the released weights are stored at the site and the charge marked completed before they
   leave. A stored release is sent again only to the request that earned it: the same run,
   round, received model and run config (a coordinating server that crashed and resumed).
   Any other request for a released round is refused.

An evaluation is a query on patient data too: unless the site's own ``site.toml`` opts into
exact metrics (a simulated site only), it is released with differential privacy
(:mod:`fedcare.models.evaluation`) and charged to the ledger as one Gaussian mechanism, within the
same run allowance and under the site's per-run evaluation cap. A task with group attributes
(``[[tasks]] groups``) adds one Gaussian release per attribute to that charge: its per-group
metrics (:mod:`fedcare.models.fairness`; a survival task's, :mod:`fedcare.models.survival_groups`),
planned into the run's noise like the rest. A survival task's last evaluation adds one more:
its test split's survival curves (:mod:`fedcare.models.survival_curves`), for the model card.

Personal models (the run's ``personalization``, :mod:`fedcare.client.personal`) are planned and
charged the same way: Ditto's second DP-SGD copy shares its round's charge (one mechanism,
twice the steps), the post-federation fine-tune is a ``personalize`` charge of its own
written before it runs, and an evaluation that also releases the personalized model's
metrics is one charge of two Gaussian releases; all of them are in the run's noise
calibration from its first round. Personal state stays in the site's state folder.
"""

from __future__ import annotations

import hashlib
import io
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedcare.client.accounting import PRV_EPS_ERROR, Mechanism, calibrate_noise, epsilon
from fedcare.client.data.datasets import TaskData, build_task_data
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import (
    DPConfig,
    DPPlan,
    make_private,
    resolve_grad_sample_mode,
    sampling,
    site_generators,
)
from fedcare.client.explain import site_attributions
from fedcare.client.ledger import ChargeReceipt, PrivacyLedger
from fedcare.client.personal import (
    Personalization,
    PersonalRound,
    PersonalSettings,
    PersonalStore,
    TrainCopy,
    personalization,
)
from fedcare.client.policy import SitePolicy
from fedcare.client.training import (
    ProximalTerm,
    StepHook,
    TrainConfig,
    TrainStats,
    fit,
    make_optimizer,
    predict,
    resolve_device,
)
from fedcare.common import keys
from fedcare.common.errors import (
    ConfigError,
    FedcareError,
    PolicyViolation,
    PrivacyBudgetExceeded,
    RoundFailed,
    TrainingDiverged,
)
from fedcare.common.federation import FederationConfig
from fedcare.common.files import write_private_atomic
from fedcare.common.run_files import RELEASES_DIR
from fedcare.models import build_model, default_model_for
from fedcare.models.evaluation import DEFAULT_BINS
from fedcare.models.evaluation import release as evaluation_release
from fedcare.models.explain import release as explain_release
from fedcare.models.fairness import declared_groups, group_codes, release_groups, release_steps
from fedcare.models.metrics import split_metrics
from fedcare.models.survival import (
    SurvivalTask,
    interval_index,
    survival_curves,
    survival_release,
)
from fedcare.models.survival_curves import RELEASE_STEPS as CURVE_STEPS
from fedcare.models.survival_curves import release as curve_release
from fedcare.models.survival_groups import release_survival_groups
from fedcare.models.tasks import TaskDefinition, task_definition

__all__ = [
    "RoundRequest",
    "RoundResult",
    "EvaluationResult",
    "PersonalizeResult",
    "SiteTrainer",
    "settings_from_run",
    "keep_better_on_validation",
    "RUN_CEILING_TOLERANCE",
]

RUN_CEILING_TOLERANCE = 2 * PRV_EPS_ERROR
"""Slack on a run's ε ceiling: the PRV accountant's ε is exact only to ``PRV_EPS_ERROR``, and
the charge of a run's last round must not be refused because it was accounted on another
grid than the calibration. One extra round adds far more than this."""

ReleaseKind = Literal["train", "evaluate", "personalize"]


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks a site to do in one round.

    ``evaluation_rounds`` are the rounds after which the run evaluates (its plan, from the
    run config); ``received_sha256`` and ``config_sha256`` identify the global model the
    request carried and the run config it belongs to: a stored release is re-sent only to
    a request that matches both.
    """

    run_id: str
    round: int
    rounds_planned: int
    task: str
    train: TrainConfig
    dp: DPConfig
    evaluation_rounds: tuple[int, ...] = ()
    received_sha256: str = ""
    config_sha256: str = ""
    personal: PersonalSettings = field(default_factory=PersonalSettings)
    explain: bool = False


@dataclass(frozen=True)
class RoundResult:
    """What one round produced at the site (weights + aggregate numbers only).

    ``epsilon`` is the dataset's lifetime ε after the round; ``run_epsilon`` what this run
    has added so far; ``noise`` where the DP randomness came from.
    """

    state: dict[str, torch.Tensor]
    n_train: int
    steps: int
    train_loss: float
    mechanism: Mechanism | None
    epsilon: float | None
    delta: float | None
    grad_sample_mode: str | None
    replayed: bool = False
    run_epsilon: float | None = None
    noise: str = keys.NOISE_OS_ENTROPY


@dataclass(frozen=True)
class EvaluationResult:
    """An evaluation's release: the metrics that leave the site and what they cost."""

    metrics: dict[str, float]
    mode: str
    mechanism: Mechanism | None
    epsilon: float | None
    run_epsilon: float | None
    noise: str = keys.NOISE_OS_ENTROPY
    replayed: bool = False
    personalized: PersonalizeResult | None = None


@dataclass(frozen=True)
class PersonalizeResult:
    """The fine-tune of a site's personal model that an evaluation ran (``replayed``: its
    charge had completed before, so nothing was run or charged again). ``mechanism`` is
    ``None`` in a non-private run."""

    mechanism: Mechanism | None
    epsilon: float | None
    run_epsilon: float | None
    replayed: bool = False


class SiteTrainer:
    """Trains and evaluates models on one site's data under its policy and ledger.

    Parameters
    ----------
    site:
        The site's loaded, validated data. Its ``site.toml`` fixes the train/validation/test
        split (``[split]``) and, for a simulated site only, reproducible noise or exact
        evaluation (``[simulation]``).
    policy:
        The site's own rules and budget.
    ledger:
        The site's privacy ledger; required whenever DP is on.
    release_dir:
        Where released round results are kept for replay (default: beside the ledger).
    seed:
        Seeds the initial weights of a model the site builds itself (the federation sends
        its own). It decides neither the split nor any DP randomness.
    task_data:
        A cache of this site's encoded tasks to fill and reuse (a warm site worker shares
        one between messages while the data is unchanged, :class:`fedcare.client.warm.WarmSites`);
        by default the trainer keeps its own.
    """

    def __init__(
        self,
        *,
        site: SiteData,
        policy: SitePolicy,
        ledger: PrivacyLedger | None,
        release_dir: Path | None = None,
        seed: int = 0,
        task_data: dict[str, TaskData] | None = None,
    ) -> None:
        self.site = site
        self.policy = policy
        self.ledger = ledger
        self.seed = seed
        if release_dir is None and ledger is not None:
            release_dir = Path(ledger.path).parent / RELEASES_DIR
        self.release_dir = release_dir
        # Personal models (client/personal/) live beside the ledger too; they never leave.
        self.personal_store = (
            PersonalStore(Path(ledger.path).parent / "personal") if ledger is not None else None
        )
        self._task_data: dict[str, TaskData] = {} if task_data is None else task_data
        self._dataset_key: str | None = None

    @property
    def site_id(self) -> str:
        return self.site.spec.site_id

    @property
    def dataset_key(self) -> str:
        """The ledger's key for this site's patients (its cohort), or the data fingerprint
        when the site keeps no ledger."""
        if self.ledger is None:
            return self.site.fingerprint
        if self._dataset_key is None:
            self._dataset_key = self.ledger.cohort_key(self.site.patient_ids)
        return self._dataset_key

    @property
    def noise_source(self) -> str:
        """Where this site's DP randomness comes from (``keys.NOISE_*``)."""
        sim = self.site.spec.simulation
        reproducible = sim is not None and sim.noise_seed is not None
        return keys.NOISE_REPRODUCIBLE if reproducible else keys.NOISE_OS_ENTROPY

    def evaluation_mode(self, dp: DPConfig) -> str:
        """``keys.EVAL_EXACT`` where the site's own ``site.toml`` asks for it, or where the
        site allows non-private runs and this run is one; else ``keys.EVAL_DP``."""
        sim = self.site.spec.simulation
        if sim is not None and sim.exact_evaluation:
            return keys.EVAL_EXACT
        if not dp.enabled and not self.policy.require_dp:
            return keys.EVAL_EXACT
        return keys.EVAL_DP

    def task_data(self, task: str) -> TaskData:
        """The task's encoded splits (built once per trainer), split as ``site.toml`` says."""
        if task not in self._task_data:
            self._task_data[task] = build_task_data(self.site, task)
        return self._task_data[task]

    def model_name(self, task: str, requested: str | None) -> str:
        data = self.task_data(task)
        return requested or default_model_for(
            data.modalities, timeline=data.task.timeline is not None
        )

    def definition(self, task: str, model: str | None = None) -> TaskDefinition:
        """The task bound to its kind (from its label: binary or survival) and model."""
        data = self.task_data(task)
        label = self.site.spec.label(data.task.label)
        return task_definition(data.task, model=self.model_name(task, model), label=label)

    def build_model(self, task: str, model: str | None = None) -> nn.Module:
        """A fresh model for ``task``; its initial weights depend only on the seed."""
        data = self.task_data(task)
        definition = self.definition(task, model)
        generator = torch.Generator().manual_seed(self.seed)
        net = build_model(definition.model, input_dims=data.input_dims, generator=generator)
        return definition.kind.wrap(net)  # survival: the K interval hazards on top

    def _survival_release(
        self,
        task: str,
        y: dict[str, np.ndarray],
        p: dict[str, np.ndarray],
        *,
        noise_multiplier: float,
        generator: np.random.Generator | None,
        histogram: bool = False,
    ) -> dict[str, float] | None:
        """A survival task's evaluation release (:func:`fedcare.models.survival.survival_release`;
        exact metrics take the censoring distribution from the train split); ``None`` for
        any other task kind. ``histogram``: with each released split's (risk bin, interval,
        event) histogram for the server's pooled C-index (:mod:`fedcare.models.survival_pooled`;
        under DP the noisy counts of the same step, exact ones at fine bins in exact mode)."""
        kind = self.definition(task).kind
        if not isinstance(kind, SurvivalTask):
            return None
        train = None
        if noise_multiplier == 0:  # exact: IPCW from the train split's censoring
            train = self.task_data(task).train.y.numpy()  # type: ignore[attr-defined]
        return survival_release(
            kind,
            y,
            p,
            noise_multiplier=noise_multiplier,
            generator=generator,
            min_count=self.policy.min_count,
            train=train,
            histogram=histogram,
            bins=keys.HIST_MAX_BINS if noise_multiplier == 0 else DEFAULT_BINS,
        )

    def with_recipe(self, request: RoundRequest) -> RoundRequest:
        """``request`` with the recipe's optimizer, batch size and learning rate filled in
        where the run leaves them to it (:mod:`fedcare.client.recipe`), from whether the run is
        private, this site's number of training patients and the model: a rule of what the
        site knows, not a fit to its data."""
        if request.train.resolved:
            return request
        n_train = len(self.task_data(request.task).patient_ids.train)
        model = self.model_name(request.task, request.train.model)
        train = request.train.for_site(n_train=n_train, model=model, private=request.dp.enabled)
        return replace(request, train=train)

    # ------------------------------------------------------------------ the run's plan

    def _check_plan(self, request: RoundRequest, *, phase: ReleaseKind) -> None:
        """Refuse a request the site's policy does not allow, before anything is charged."""
        cfg, dp = request.train, request.dp
        self.policy.check_request(
            site_id=self.site_id,
            task=request.task,
            model=self.model_name(request.task, cfg.model),
            local_epochs=cfg.epochs,
            dp_enabled=dp.enabled,
        )
        self.policy.check_run(
            site_id=self.site_id,
            rounds=request.rounds_planned,
            evaluations=len(request.evaluation_rounds),
            target_epsilon=dp.target_epsilon if dp.enabled else None,
        )
        tune = self._personalization(request).finetune_epochs()
        if tune > self.policy.max_local_epochs:
            raise PolicyViolation(
                f"site {self.site_id} allows at most {self.policy.max_local_epochs} local "
                f"epochs; the run asks to fine-tune personal models for {tune} (personal-epochs)"
            )
        last = request.rounds_planned
        if phase == "train" and not 1 <= request.round <= last:
            raise PolicyViolation(
                f"site {self.site_id}: run {request.run_id} plans rounds 1..{last}; it asked "
                f"to train round {request.round}, which is outside its plan"
            )
        if phase == "evaluate" and request.round not in request.evaluation_rounds:
            raise PolicyViolation(
                f"site {self.site_id}: run {request.run_id} plans evaluations after rounds "
                f"{', '.join(map(str, request.evaluation_rounds))}; it asked to evaluate "
                f"round {request.round}, which is outside its plan"
            )
        wrong_accounting = dp.delta != self.policy.delta or dp.accountant != self.policy.accountant
        if dp.enabled and wrong_accounting:
            raise PolicyViolation(
                f"site {self.site_id} accounts at delta={self.policy.delta:g} with the "
                f"{self.policy.accountant} accountant; the run asked for delta={dp.delta:g} "
                f"with {dp.accountant} (set the run's target-delta to match)"
            )
        if (dp.enabled or self.evaluation_mode(dp) == keys.EVAL_DP) and self.ledger is None:
            raise ConfigError(
                f"site {self.site_id}: DP training and private evaluation need a privacy "
                "ledger; give the site a ledger path"
            )

    def _run_charges(self, run_id: str) -> list[ChargeReceipt]:
        """This dataset's charges of run ``run_id``: a round reads them once and hands them
        to :meth:`_stored`, :meth:`_run_base` and :meth:`_plan`."""
        assert self.ledger is not None
        return self.ledger.charges(self.dataset_key, run_id=run_id)

    def _run_base(self, run_id: str, own: list[ChargeReceipt] | None = None) -> float:
        """The dataset's ε before this run's first charge (its spent ε if none yet);
        ``own``: the run's charges, if already read."""
        assert self.ledger is not None
        own = self._run_charges(run_id) if own is None else own
        if own:
            return min(c.epsilon_before for c in own)
        return self.ledger.spent(
            self.dataset_key, delta=self.policy.delta, accountant=self.policy.accountant
        )

    def _ceiling(self, request: RoundRequest, base: float) -> float:
        """The most ε this dataset may reach during the run: the run's allowance on top of
        what it had spent before, within the site's budget.

        Raises
        ------
        PrivacyBudgetExceeded
            When the run asks to add more than the site's budget has left; nothing is
            charged.
        """
        budget = self.policy.epsilon_budget
        target = request.dp.target_epsilon if request.dp.enabled else None
        if target is not None and base + target > budget + 1e-9:
            left = max(budget - base, 0.0)
            raise PrivacyBudgetExceeded(
                f"site {self.site_id}: run {request.run_id} asks to add epsilon={target:g}, "
                f"but this dataset has spent epsilon={base:.3g} of its budget {budget:g} "
                f"(delta={self.policy.delta:g}), so {left:.3g} remain; nothing was charged. "
                f"Fix: ask for target-epsilon <= {left:.3g}, or the site raises its budget "
                "(a policy decision)"
            )
        allowance = self.policy.max_run_epsilon if target is None else target
        return min(budget, base + allowance)

    def _eval_mechanism(self, steps: int = 1) -> Mechanism:
        """``steps`` Gaussian releases at the site's evaluation noise: 1 for the global
        model's metrics, 2 when a personalized model's metrics are released beside them."""
        return Mechanism(self.policy.evaluation_noise_multiplier, 1.0, steps)

    def _future_evaluations(self, request: RoundRequest) -> list[Mechanism]:
        """The DP evaluations the run still plans from this round on (planned into its ε),
        each with the personalized model's release where the run's strategy has one."""
        if self.evaluation_mode(request.dp) != keys.EVAL_DP:
            return []
        strategy = self._personalization(request)
        later = [r for r in request.evaluation_rounds if r >= request.round]
        last = request.rounds_planned
        groups = self._group_steps(request.task)
        return [
            self._eval_mechanism(
                (2 if strategy.releases_personal(round=r, rounds_planned=last) else 1)
                + groups
                + self._explain_steps(request, r)
                + self._curve_steps(request, r)
            )
            for r in later
        ]

    def _explain_steps(self, request: RoundRequest, rnd: int) -> int:
        """1 when round ``rnd``'s evaluation releases the model's feature attributions (the
        run's last, with ``explain = true``, on a binary task), else 0."""
        explains = (
            request.explain
            and rnd == request.rounds_planned
            and self.definition(request.task).kind.name == "binary"
        )
        return 1 if explains else 0

    def _explain_release(
        self,
        request: RoundRequest,
        state: Mapping[str, torch.Tensor] | None,
        device: torch.device,
        *,
        noise_multiplier: float,
        generator: np.random.Generator | None,
    ) -> dict[str, float]:
        """The test split's feature attributions as one Gaussian release
        (:func:`fedcare.models.explain.release`) on the wire, or nothing when its noisy count
        is below the site's ``min_count`` (withheld whole)."""
        data = self.task_data(request.task)
        net = self.build_model(request.task, request.train.model)
        if state is not None:
            net.load_state_dict(dict(state))
        net.to(device)
        rows, features, modalities = site_attributions(
            net, self.site.spec.feature_schema, data, split="test", device=device
        )
        # Weights crafted to overflow on some patients must not make the release fail (a
        # failure would say such a patient exists): a non-finite attribution counts as 0,
        # for every patient alike, as a non-finite prediction counts as 0.5 in evaluation.
        rows = np.where(np.isfinite(rows), rows, 0.0)
        rel = explain_release(
            rows,
            features,
            modalities,
            noise_multiplier=noise_multiplier,
            generator=generator,
        )
        if rel.n < self.policy.min_count:
            return {}
        wire = {keys.explain_key(j): v for j, v in enumerate(rel.sums)}
        wire[keys.EXPLAIN_N] = rel.n
        return wire

    def _curve_steps(self, request: RoundRequest, rnd: int) -> int:
        """:data:`~fedcare.models.survival_curves.RELEASE_STEPS` when round ``rnd``'s
        evaluation releases the survival curves (the run's last, on a survival task), else 0."""
        last = rnd == request.rounds_planned
        return (
            CURVE_STEPS
            if last and isinstance(self.definition(request.task).kind, SurvivalTask)
            else 0
        )

    def _curve_release(
        self,
        task: str,
        y: Mapping[str, np.ndarray],
        p: Mapping[str, np.ndarray],
        *,
        noise_multiplier: float,
        generator: np.random.Generator | None,
    ) -> dict[str, float]:
        """The test split's survival curves (:func:`fedcare.models.survival_curves.release`)
        on the wire: the noisy life table and predicted-survival sums, intervals with fewer
        than the site's ``min_count`` at risk withheld, nothing below it at all."""
        kind = self.definition(task).kind
        assert isinstance(kind, SurvivalTask)
        targets = np.asarray(y["test"], dtype=np.float64).reshape(-1, 2)  # (time, event)
        hazards = np.asarray(p["test"], dtype=np.float64).reshape(-1, kind.intervals)
        rel = curve_release(
            targets[:, 1],
            interval_index(targets[:, 0], kind.cuts),
            survival_curves(hazards),
            cuts=kind.cuts,
            noise_multiplier=noise_multiplier,
            generator=generator,
            min_count=self.policy.min_count,
        )
        return {} if rel is None else rel.to_wire()

    def _group_steps(self, task: str) -> int:
        """Gaussian steps the task's per-group releases add to each private evaluation
        (:func:`fedcare.models.fairness.release_steps`: one per group attribute; a survival
        task's groups, :mod:`fedcare.models.survival_groups`, the same)."""
        if self.definition(task).kind.name not in ("binary", "survival"):
            return 0
        return release_steps(len(self.site.spec.task(task).groups))

    def _codes(self, task: str, splits: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        """Attribute -> split -> each patient's group index, for the task's groups."""
        assert self.site.ehr is not None
        schema = self.site.spec.feature_schema
        ids = self.task_data(task).patient_ids
        return {
            name: {
                s: group_codes(
                    schema, name, self.site.ehr[schema.group(name).column].reindex(ids[s]).tolist()
                )
                for s in splits
            }
            for name in self.site.spec.task(task).groups
        }

    def _group_splits(
        self, task: str, y: Mapping[str, np.ndarray], released: Mapping[str, float]
    ) -> tuple[tuple[str, ...], list[str]]:
        """The task's group attributes and the splits a group release covers: those whose
        own release went out (``released`` holds their noisy ``n``); none without groups or
        an EHR table to read them from."""
        names = tuple(self.site.spec.task(task).groups)
        if not names or self.site.ehr is None:
            return names, []
        return names, [s for s in y if f"{s}.n" in released]

    def _survival_group_release(
        self,
        task: str,
        y: Mapping[str, np.ndarray],
        p: Mapping[str, np.ndarray],
        released: Mapping[str, float],
        *,
        noise_multiplier: float,
        generator: np.random.Generator | None,
    ) -> dict[str, float]:
        """A survival task's per-group C-index and time-dependent AUC of the splits
        ``released`` holds (:mod:`fedcare.models.survival_groups`): one more Gaussian release
        per attribute under the evaluation's charge; exact in exact mode."""
        names, splits = self._group_splits(task, y, released)
        if not splits:
            return {}
        kind = self.definition(task).kind
        assert isinstance(kind, SurvivalTask)
        train = None
        if noise_multiplier == 0:  # exact: IPCW from the train split's censoring
            train = self.task_data(task).train.y.numpy()  # type: ignore[attr-defined]
        return release_survival_groups(
            kind,
            {s: y[s] for s in splits},
            {s: p[s] for s in splits},
            self._codes(task, splits),
            declared_groups(self.site.spec.feature_schema, names),
            noise_multiplier=noise_multiplier,
            generator=generator,
            min_count=self.policy.min_count,
            train=train,
        )

    def _group_release(
        self,
        task: str,
        y: Mapping[str, np.ndarray],
        p: Mapping[str, np.ndarray],
        released: Mapping[str, float],
        *,
        noise_multiplier: float,
        generator: np.random.Generator | None,
        bins: int,
    ) -> dict[str, float]:
        """The per-group metrics of the splits ``released`` holds (:mod:`fedcare.models.fairness`),
        at its decision threshold: more Gaussian releases under the evaluation's charge."""
        names, splits = self._group_splits(task, y, released)
        if not splits:
            return {}
        return release_groups(
            {s: y[s] for s in splits},
            {s: p[s] for s in splits},
            self._codes(task, splits),
            declared_groups(self.site.spec.feature_schema, names),
            noise_multiplier=noise_multiplier,
            generator=generator,
            min_count=self.policy.min_count,
            threshold=released[f"{splits[0]}.threshold"],
            bins=bins,
        )

    # ------------------------------------------------------------------ personal models

    def _personalization(self, request: RoundRequest) -> Personalization:
        """The run's personalization strategy (``client/personal/``)."""
        return personalization(request.personal)

    def _kept(
        self, request: RoundRequest, strategy: Personalization
    ) -> dict[str, torch.Tensor] | None:
        """The strategy's personal state this site keeps for this dataset and run."""
        if self.personal_store is None:
            return None
        loaded = self.personal_store.load(
            dataset=self.dataset_key, run_id=request.run_id, strategy=strategy.name
        )
        return None if loaded is None else loaded[1]

    def _copy_trainer(
        self, request: RoundRequest, cfg: TrainConfig, plan: DPPlan | None
    ) -> TrainCopy:
        """Trains a model copy with this round's recipe and mechanism (a personal model)."""

        def train(
            state: Mapping[str, torch.Tensor], hooks: Sequence[StepHook]
        ) -> dict[str, torch.Tensor]:
            return self._train_copy(request, state, cfg=cfg, plan=plan, hooks=hooks)

        return train

    def _train_copy(
        self,
        request: RoundRequest,
        state: Mapping[str, torch.Tensor],
        *,
        cfg: TrainConfig,
        plan: DPPlan | None,
        hooks: Sequence[StepHook] = (),
    ) -> dict[str, torch.Tensor]:
        """Train a copy of the model from ``state``: DP-SGD with exactly ``plan`` (which a
        charge already covers), or plain training in a non-private run (``plan`` None).

        For personal models only (Ditto's, a fine-tune): they share the one training loop
        (:func:`fedcare.client.training.fit`); their randomness is the site's, drawn apart from the
        global copy's.
        """
        data = self.task_data(request.task)
        device = resolve_device(cfg.device)
        model_name = self.model_name(request.task, cfg.model)
        model = self.build_model(request.task, cfg.model)
        model.load_state_dict(dict(state))
        model.to(device)
        criterion = self.definition(request.task, cfg.model).kind.make_loss()
        optimizer = make_optimizer(model.parameters(), cfg)
        sampling_gen, noise_gen = self._generators(request, device, "personalize")
        if plan is None:
            loader = torch.utils.data.DataLoader(
                data.train, batch_size=cfg.batch_size, shuffle=True, generator=sampling_gen
            )
            fit(
                model,
                loader,
                optimizer=optimizer,
                criterion=criterion,
                epochs=cfg.epochs,
                device=device,
                hooks=hooks,
                clip_norm=request.dp.max_grad_norm,  # as the global copy's plain steps
            )
            return self._finite_copy(_cpu_state(model), request, cfg)
        out, _ = _dp_fit(
            model,
            optimizer=optimizer,
            criterion=criterion,
            dataset=data.train,
            cfg=cfg,
            plan=plan,
            mode=resolve_grad_sample_mode(request.dp.grad_sample_mode, model_name, model=model),
            generators=(sampling_gen, noise_gen),
            device=device,
            hooks=hooks,
            what=f"site {self.site_id}: DP-SGD of the personal model",
        )
        return self._finite_copy(out, request, cfg)

    def _finite_copy(
        self, out: dict[str, torch.Tensor], request: RoundRequest, cfg: TrainConfig
    ) -> dict[str, torch.Tensor]:
        """A personal copy's weights, refused when training made them non-finite."""
        if not all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point()):
            raise TrainingDiverged(
                f"site {self.site_id}: the personal model's training diverged in round "
                f"{request.round} (non-finite weights at learning-rate {cfg.lr:g}); nothing "
                "is kept (a charge, if any, is kept). Fix: lower the learning-rate"
            )
        return out

    def personalize(
        self, request: RoundRequest, state: Mapping[str, torch.Tensor] | None
    ) -> PersonalizeResult | None:
        """Run the fine-tune the evaluation of this round needs, before that evaluation
        (``None`` where the run's strategy fine-tunes nothing at this round).

        The ClientApp calls it first and logs its charge in the site's audit log at once, so
        a completed ``personalize`` charge is proven even when the evaluation after it is
        refused or fails; :meth:`evaluate_round` then finds the charge completed and reuses
        the fine-tuned model (nothing runs or is charged twice).
        """
        request = self.with_recipe(request)
        self._check_plan(request, phase="evaluate")
        strategy = self._personalization(request)
        last = request.rounds_planned
        if not strategy.finetune_epochs() or not strategy.releases_personal(
            round=request.round, rounds_planned=last
        ):
            return None
        _, tuned = self._personal_state(request, state)
        return tuned

    def _personal_state(
        self, request: RoundRequest, state: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor] | None, PersonalizeResult | None]:
        """The personalized model an evaluation releases beside the global one (``None``:
        none at this round), and the fine-tune it ran first where the strategy fine-tunes."""
        strategy = self._personalization(request)
        last = request.rounds_planned
        if not strategy.releases_personal(round=request.round, rounds_planned=last):
            return None, None
        if self.personal_store is None:
            raise ConfigError(
                f"site {self.site_id}: personalization {strategy.name!r} keeps a personal "
                "model at the site, which needs a state folder; give the site a privacy "
                "ledger (its folder holds the personal models too)"
            )
        if state is None:
            received = _cpu_state(self.build_model(request.task, request.train.model))
        else:
            received = dict(state)
        tuned = self._finetune(request, received, strategy) if strategy.finetune_epochs() else None
        return strategy.personal_model(received, self._kept(request, strategy)), tuned

    def _finetune(
        self,
        request: RoundRequest,
        received: Mapping[str, torch.Tensor],
        strategy: Personalization,
    ) -> PersonalizeResult | None:
        """Fine-tune the final global model into the site's personal model, once per run.

        DP: one ``personalize`` charge, at the run's noise multiplier and Poisson rate (those
        of its first training charge) for ``finetune_epochs`` epochs, planned into the run's
        noise from its first round (:meth:`_plan`) and written before the fine-tune runs,
        under the run's ceiling. A charge that completed is never run again (its model is
        reused); a failed one is spent. ``None`` when there is nothing to fine-tune: the
        site never trained in this run (nothing of its plan covers a fine-tune).
        """
        epochs = strategy.finetune_epochs()
        if not request.dp.enabled:
            if self._kept(request, strategy) is None:
                cfg = request.train.model_copy(update={"epochs": epochs})
                tuned = self._train_copy(request, received, cfg=cfg, plan=None)
                self._keep_personal(request, strategy, tuned)
            return PersonalizeResult(None, None, None)
        assert self.ledger is not None
        base = self._run_base(request.run_id)
        done = self.ledger.has_charge(
            self.dataset_key, request.run_id, request.round, kind="personalize"
        )
        if done is not None and done.status == "completed":
            return PersonalizeResult(
                done.mechanism, done.epsilon_after, done.epsilon_after - base, replayed=True
            )
        if done is not None and done.status == "failed":
            return None  # spent, never redone (whether it failed can depend on the patients)
        trained = [c for c in self._run_charges(request.run_id) if c.kind == "train"]
        if not trained:
            return None
        first = trained[0].mechanism
        batches = round(1.0 / first.sample_rate)  # q = 1 / batches per epoch, exactly
        plan = DPPlan(
            noise_multiplier=first.noise_multiplier,
            sample_rate=first.sample_rate,
            steps=epochs * batches,
            max_grad_norm=request.dp.max_grad_norm,
        )
        mechanism = Mechanism(plan.noise_multiplier, plan.sample_rate, plan.steps)
        ceiling = self._ceiling(request, base)
        receipt = self._charge(request, mechanism, kind="personalize", ceiling=ceiling)
        with self._settled(receipt, "the personal model's fine-tune"):
            n_train = self.task_data(request.task).n["train"]
            cfg = request.train.model_copy(
                update={"epochs": epochs, "batch_size": math.ceil(n_train / batches)}
            )
            tuned = self._train_copy(request, received, cfg=cfg, plan=plan)
        self.ledger.mark_completed(receipt.charge_id)
        self._keep_personal(request, strategy, tuned)
        return PersonalizeResult(mechanism, receipt.epsilon_after, receipt.epsilon_after - base)

    def _keep_personal(
        self, request: RoundRequest, strategy: Personalization, state: Mapping[str, torch.Tensor]
    ) -> None:
        if self.personal_store is not None:
            self.personal_store.save(
                dataset=self.dataset_key,
                run_id=request.run_id,
                strategy=strategy.name,
                round=request.round,
                state=state,
            )

    def _personal_release(
        self,
        request: RoundRequest,
        state: Mapping[str, torch.Tensor],
        device: torch.device,
        *,
        noise_multiplier: float,
        generator: np.random.Generator | None,
    ) -> dict[str, float]:
        """The personalized model's metrics as ``personal.<split>.<metric>``: a release of
        its own (fresh noise, the same σ: the evaluation charge's second step), of which
        only the derived metrics leave (never summed into the global ones)."""
        y, p = self._predictions(request.task, state, request.train.model, device)
        exact = noise_multiplier == 0
        survival = self._survival_release(
            request.task, y, p, noise_multiplier=noise_multiplier, generator=generator
        )
        metrics = (
            survival
            if survival is not None
            else evaluation_release(
                y,
                p,
                noise_multiplier=noise_multiplier,
                generator=generator,
                min_count=self.policy.min_count,
                **({"bins": keys.HIST_MAX_BINS} if exact else {}),
            )
        )
        if exact and survival is None:
            released = [split for split in y if f"{split}.n" in metrics]
            metrics.update(split_metrics({k: y[k] for k in released}, {k: p[k] for k in released}))
        return {
            f"{keys.PERSONAL_PREFIX}{name}": value
            for name, value in metrics.items()
            if not keys.is_release_metric(name)
        }

    def _charge(
        self,
        request: RoundRequest,
        mechanism: Mechanism,
        *,
        kind: ReleaseKind,
        ceiling: float,
    ) -> ChargeReceipt:
        assert self.ledger is not None
        return self.ledger.charge(
            fingerprint=self.dataset_key,
            budget_epsilon=self.policy.epsilon_budget,
            ceiling_epsilon=ceiling + RUN_CEILING_TOLERANCE,
            delta=self.policy.delta,
            accountant=self.policy.accountant,
            mechanism=mechanism,
            run_id=request.run_id,
            round=request.round,
            kind=kind,
        )

    @contextmanager
    def _settled(self, receipt: ChargeReceipt, what: str) -> Iterator[None]:
        """The work done under ``receipt``'s charge: any failure marks the charge failed
        (it still counts, and is never retried: whether it failed can depend on the
        patients) and is reported as the site's :class:`RoundFailed`, not a crash.

        A stop (a signal turned into an exception that is not an :class:`Exception`:
        ``KeyboardInterrupt``, ``SystemExit``, the site worker's stop) does not depend on
        the patients and released nothing: the charge stays ``charged``, and the same
        request, asked again, reuses it (:meth:`PrivacyLedger.charge` retries a
        ``charged`` key) instead of spending the round's budget for nothing."""
        assert self.ledger is not None
        try:
            yield
        except Exception as e:
            try:
                self.ledger.mark_failed(receipt.charge_id)
            except PolicyViolation as settled:  # another attempt at the round settled it
                raise RoundFailed(
                    f"site {self.site_id}: {what} failed after its charge was written "
                    f"({type(e).__name__}: {e}), and {settled}"
                ) from e
            if isinstance(e, FedcareError):
                raise
            raise RoundFailed(
                f"site {self.site_id}: {what} failed after its charge was written "
                f"({type(e).__name__}: {e}); the charge is kept and marked failed"
            ) from e

    def _generators(
        self, request: RoundRequest, device: torch.device, kind: ReleaseKind
    ) -> tuple[torch.Generator, torch.Generator]:
        sim = self.site.spec.simulation
        seed = None
        if sim is not None and sim.noise_seed is not None:
            # Not the run id: each run has a new one, and a simulation re-run must repeat.
            seed = f"{sim.noise_seed}|{request.round}|{kind}"
        return site_generators(device=device, reproducible_seed=seed)

    # ------------------------------------------------------------------ training

    def train_round(
        self, request: RoundRequest, initial_state: Mapping[str, torch.Tensor] | None = None
    ) -> RoundResult:
        """Run one round of (private) local training; see the module docstring."""
        request = self.with_recipe(request)
        cfg, dp = request.train, request.dp
        self._check_plan(request, phase="train")
        model_name = self.model_name(request.task, cfg.model)
        if dp.enabled:
            own = self._run_charges(request.run_id)  # read once for the round
            stored = self._stored(request, "train", own)
            if stored is not None:
                return _train_result(stored)
        data = self.task_data(request.task)
        device = resolve_device(cfg.device)
        model = self.build_model(request.task, cfg.model)
        # Personalization (client/personal/): the state the global copy trains from (FedPer:
        # the received body with the site's own head) and the personal state the round keeps.
        personal = PersonalRound.open(
            self._personalization(request),
            self.personal_store,
            dataset=self.dataset_key,
            run_id=request.run_id,
            round=request.round,
            received=_cpu_state(model) if initial_state is None else initial_state,
        )
        model.load_state_dict(personal.start)
        model.to(device)
        criterion = self.definition(request.task, cfg.model).kind.make_loss()
        optimizer = make_optimizer(model.parameters(), cfg)
        hooks: list[StepHook] = []
        if cfg.proximal_mu > 0 and initial_state is not None:
            hooks.append(ProximalTerm(mu=cfg.proximal_mu, global_params=initial_state))
        sampling_gen, noise_gen = self._generators(request, device, "train")
        n_train = len(data.patient_ids.train)

        if not dp.enabled:
            loader = torch.utils.data.DataLoader(
                data.train, batch_size=cfg.batch_size, shuffle=True, generator=sampling_gen
            )
            stats = fit(
                model,
                loader,
                optimizer=optimizer,
                criterion=criterion,
                epochs=cfg.epochs,
                device=device,
                hooks=hooks,
                clip_norm=dp.max_grad_norm,  # the recipe's rates need a bounded step
            )
            state = personal.finish(_cpu_state(model), self._copy_trainer(request, cfg, None))
            personal.keep()
            return RoundResult(
                state,
                n_train,
                stats.steps,
                stats.mean_loss,
                None,
                None,
                None,
                None,
                noise=self.noise_source,
            )

        assert self.ledger is not None  # checked by _check_plan
        base = self._run_base(request.run_id, own)
        ceiling = self._ceiling(request, base)
        plan = self._plan(request, n_train, base=base, own=own)
        self.policy.check_noise(site_id=self.site_id, noise_multiplier=plan.noise_multiplier)
        # One mechanism for every DP-SGD copy the round runs (Ditto's personal model too):
        # the same noise and rate, so their steps add up.
        steps = plan.steps * personal.copies
        mechanism = Mechanism(plan.noise_multiplier, plan.sample_rate, steps)
        receipt = self._charge(request, mechanism, kind="train", ceiling=ceiling)
        # From here on the charge exists: any failure marks it failed (it still counts).
        with self._settled(receipt, f"round {request.round}"):
            mode = resolve_grad_sample_mode(dp.grad_sample_mode, model_name, model=model)
            state, stats = _dp_fit(
                model,
                optimizer=optimizer,
                criterion=criterion,
                dataset=data.train,
                cfg=cfg,
                plan=plan,
                mode=mode,
                generators=(sampling_gen, noise_gen),
                device=device,
                hooks=hooks,
                what=f"site {self.site_id}: DP-SGD",
            )
            if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
                raise TrainingDiverged(
                    f"site {self.site_id}: training diverged in round {request.round} (the "
                    f"weights became non-finite at learning-rate {cfg.lr:g}); the "
                    "update is withheld and the round's charge is kept. Fix: lower the "
                    "learning-rate"
                )
            state = personal.finish(state, self._copy_trainer(request, cfg, plan))
            result = RoundResult(
                state=state,
                n_train=n_train,
                steps=stats.steps,
                train_loss=stats.mean_loss,
                mechanism=mechanism,
                epsilon=receipt.epsilon_after,
                delta=self.policy.delta,
                grad_sample_mode=mode,
                run_epsilon=receipt.epsilon_after - base,
                noise=self.noise_source,
            )
        kept: dict[str, float | int] = {"steps": stats.steps}
        if math.isfinite(stats.mean_loss):  # NaN under weights that overflow; not a number
            kept["train_loss"] = stats.mean_loss
        self.ledger.mark_completed(receipt.charge_id, metrics=kept)
        # Kept for a resumed server only after this attempt settled the charge: a second
        # attempt at the round (its mark_completed raises) never replaces what was released.
        self._store_release(request, "train", _train_payload(result))
        personal.keep()  # only now: a retried round must start from the state before it
        return result

    def _plan(
        self, request: RoundRequest, n_train: int, *, base: float, own: list[ChargeReceipt]
    ) -> DPPlan:
        """The round's mechanism: one noise multiplier for the whole run (``own``: the
        run's charges so far)."""
        cfg, dp = request.train, request.dp
        assert self.ledger is not None
        q, steps = sampling(n_train, batch_size=cfg.batch_size, epochs=cfg.epochs)
        earlier = [c for c in own if c.kind == "train"]
        if earlier:
            sigma = earlier[0].mechanism.noise_multiplier
        elif dp.noise_multiplier is not None:
            sigma = dp.noise_multiplier
        else:
            assert dp.target_epsilon is not None
            target = base + dp.target_epsilon
            history = self.ledger.history(self.dataset_key)
            evaluations = self._future_evaluations(request)
            if evaluations:
                without_training = epsilon(
                    [*history, *evaluations],
                    delta=self.policy.delta,
                    accountant=self.policy.accountant,
                )
                if without_training >= target:
                    raise PrivacyBudgetExceeded(
                        f"site {self.site_id}: run {request.run_id}'s {len(evaluations)} "
                        f"remaining private evaluations alone would take epsilon from "
                        f"{base:.3g} to {without_training:.3g}, past the run's allowance "
                        f"{target:.3g}; nothing was charged. Fix: evaluate less often "
                        "(evaluate-every) or ask for a larger target-epsilon"
                    )
            rounds_left = request.rounds_planned - request.round + 1
            # Personal models' DP-SGD runs at the run's noise and rate, so it adds steps:
            # Ditto's copy every round, a fine-tune of finetune_epochs after the last.
            strategy = self._personalization(request)
            planned = steps * rounds_left * strategy.copies_per_round()
            planned += strategy.finetune_epochs() * round(1.0 / q)
            sigma = calibrate_noise(
                target_epsilon=target,
                delta=self.policy.delta,
                sample_rate=q,
                steps=planned,
                history=[*history, *evaluations],
                accountant=self.policy.accountant,
            )
        return DPPlan(
            noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=dp.max_grad_norm
        )

    # ------------------------------------------------------------------ replay

    def _release_path(self, request: RoundRequest, kind: ReleaseKind) -> Path:
        assert self.release_dir is not None
        key = f"{self.dataset_key}|{request.run_id}|{request.round}|{kind}"
        return self.release_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def _store_release(
        self, request: RoundRequest, kind: ReleaseKind, payload: dict[str, Any]
    ) -> None:
        """Keep a release, tied to the request that earned it, for a resumed server."""
        if self.release_dir is None:
            return
        bound = {
            **payload,
            "run_id": request.run_id,
            "round": request.round,
            "received_sha256": request.received_sha256,
            "config_sha256": request.config_sha256,
        }
        path = self._release_path(request, kind)
        buffer = _torch_bytes(bound)
        write_private_atomic(path, buffer)

    def _stored(
        self, request: RoundRequest, kind: ReleaseKind, own: list[ChargeReceipt]
    ) -> dict[str, Any] | None:
        """The stored release of a round this site already released, re-sent only to the
        request that earned it; ``None`` when the round was never released. ``own``: the
        run's charges (:meth:`_run_charges`), read by the round."""
        assert self.ledger is not None
        receipt = next((c for c in own if c.round == request.round and c.kind == kind), None)
        if receipt is None or receipt.status != "completed":
            return None
        what = "trained" if kind == "train" else "evaluated"
        path = self._release_path(request, kind) if self.release_dir is not None else None
        if path is None or not path.is_file():
            raise PolicyViolation(
                f"site {self.site_id} already {what} round {request.round} of run "
                f"{request.run_id} and has no stored copy to send again; doing it again "
                "would spend budget twice. Start a new run id"
            )
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as e:  # a torn or foreign file: say which, never half-use it
            raise ConfigError(
                f"site {self.site_id}: the stored release {path} is unreadable ({e}); it "
                f"cannot be re-sent and round {request.round} of run {request.run_id} cannot "
                "be redone without spending budget twice. Start a new run id"
            ) from e
        mismatch = [
            name
            for name, value in (
                ("received model", request.received_sha256),
                ("run config", request.config_sha256),
            )
            if payload.get(_BIND_KEYS[name]) != value
        ]
        if mismatch:
            raise PolicyViolation(
                f"site {self.site_id} already {what} round {request.round} of run "
                f"{request.run_id} for another {' and '.join(mismatch)}; it re-sends a "
                "release only to the request that earned it and never redoes a released "
                "round. Start a new run id"
            )
        return dict(payload)

    # ------------------------------------------------------------------ evaluation

    def evaluate_round(
        self,
        request: RoundRequest,
        state: Mapping[str, torch.Tensor] | None,
    ) -> EvaluationResult:
        """The evaluation a federated run asks for, released as the site's policy says.

        DP mode: one Gaussian release of both splits' histograms (:mod:`fedcare.models.evaluation`)
        charged to the ledger within the run's allowance and evaluation cap, stored and
        re-sent only to the request that earned it. Exact mode (a simulated site's own
        opt-in, or a non-private run the site allows): :meth:`evaluate`.
        """
        request = self.with_recipe(request)
        self._check_plan(request, phase="evaluate")
        mode = self.evaluation_mode(request.dp)
        device = resolve_device(request.train.device)
        if mode == keys.EVAL_EXACT:
            y, p = self._predictions(request.task, state, request.train.model, device)
            # Fine bins, so the server's pooled AUROC is close to the exact one; the site's own
            # metrics are the exact ones (binary_metrics), as the baselines report them.
            # A survival histogram of exact counts (single patients' cells at 100 risk bins)
            # leaves only a simulated site that opted in, not a real site's non-private run.
            sim = self.site.spec.simulation
            survival = self._survival_release(
                request.task,
                y,
                p,
                noise_multiplier=0.0,
                generator=None,
                histogram=sim is not None and sim.exact_evaluation,
            )
            metrics = (
                survival
                if survival is not None
                else evaluation_release(
                    y,
                    p,
                    noise_multiplier=0.0,
                    generator=None,
                    min_count=self.policy.min_count,
                    bins=keys.HIST_MAX_BINS,
                )
            )
            released = [split for split in y if f"{split}.n" in metrics]
            if survival is None:
                exact = split_metrics({k: y[k] for k in released}, {k: p[k] for k in released})
                metrics.update(exact)
                metrics.update(
                    self._group_release(
                        request.task,
                        y,
                        p,
                        metrics,
                        noise_multiplier=0.0,
                        generator=None,
                        bins=keys.HIST_MAX_BINS,
                    )
                )
            else:
                metrics.update(
                    self._survival_group_release(
                        request.task, y, p, metrics, noise_multiplier=0.0, generator=None
                    )
                )
            if self._explain_steps(request, request.round):
                metrics.update(
                    self._explain_release(
                        request, state, device, noise_multiplier=0.0, generator=None
                    )
                )
            if self._curve_steps(request, request.round):
                metrics.update(
                    self._curve_release(request.task, y, p, noise_multiplier=0.0, generator=None)
                )
            # Personalization: the personal model's exact metrics too (a fine-tune, where the
            # strategy runs one, is still DP training, charged as such).
            personal, tuned = self._personal_state(request, state)
            if personal is not None:
                own = self._personal_release(
                    request, personal, device, noise_multiplier=0.0, generator=None
                )
                metrics.update(keep_better_on_validation(metrics, own))
            return EvaluationResult(
                metrics, mode, None, None, None, noise=self.noise_source, personalized=tuned
            )
        assert self.ledger is not None
        charged = self._run_charges(request.run_id)  # read once for the evaluation
        replay = self._stored(request, "evaluate", charged)
        if replay is not None:
            return EvaluationResult(
                metrics=dict(replay["metrics"]),
                mode=mode,
                mechanism=self._eval_mechanism(int(replay.get("steps", 1))),
                epsilon=replay["epsilon"],
                run_epsilon=replay["run_epsilon"],
                noise=self.noise_source,
                replayed=True,
            )
        done = [c for c in charged if c.kind == "evaluate"]
        if len(done) >= self.policy.max_evaluations:
            raise PolicyViolation(
                f"site {self.site_id} has answered {len(done)} evaluations of run "
                f"{request.run_id}, its limit per run; this one is refused"
            )
        base = self._run_base(request.run_id, charged)
        ceiling = self._ceiling(request, base)
        # Personalization: the personal model (fine-tuned first, under its own charge, where
        # the strategy does so) is a second Gaussian release under this one charge.
        personal, tuned = self._personal_state(request, state)
        groups = self._group_steps(request.task)  # per-group releases: one step per attribute
        explains = self._explain_steps(request, request.round)  # attributions: one step
        curves = self._curve_steps(request, request.round)  # survival curves: one step
        mechanism = self._eval_mechanism(
            (1 if personal is None else 2) + groups + explains + curves
        )
        receipt = self._charge(request, mechanism, kind="evaluate", ceiling=ceiling)
        with self._settled(receipt, f"evaluation of round {request.round}"):
            y, p = self._predictions(request.task, state, request.train.model, device)
            generator = self._numpy_generator(request)
            survival = self._survival_release(
                request.task,
                y,
                p,
                noise_multiplier=mechanism.noise_multiplier,
                generator=generator,
                histogram=True,
            )
            metrics = (
                survival
                if survival is not None
                else evaluation_release(
                    y,
                    p,
                    noise_multiplier=mechanism.noise_multiplier,
                    generator=generator,
                    min_count=self.policy.min_count,
                )
            )
            if survival is None:
                metrics.update(
                    self._group_release(
                        request.task,
                        y,
                        p,
                        metrics,
                        noise_multiplier=mechanism.noise_multiplier,
                        generator=generator,
                        bins=DEFAULT_BINS,
                    )
                )
            else:
                metrics.update(
                    self._survival_group_release(
                        request.task,
                        y,
                        p,
                        metrics,
                        noise_multiplier=mechanism.noise_multiplier,
                        generator=generator,
                    )
                )
            if explains:
                metrics.update(
                    self._explain_release(
                        request,
                        state,
                        device,
                        noise_multiplier=mechanism.noise_multiplier,
                        generator=generator,
                    )
                )
            if curves:
                metrics.update(
                    self._curve_release(
                        request.task,
                        y,
                        p,
                        noise_multiplier=mechanism.noise_multiplier,
                        generator=generator,
                    )
                )
            if personal is not None:
                own = self._personal_release(
                    request,
                    personal,
                    device,
                    noise_multiplier=mechanism.noise_multiplier,
                    generator=generator,
                )
                metrics.update(keep_better_on_validation(metrics, own))
            result = EvaluationResult(
                metrics=metrics,
                mode=mode,
                mechanism=mechanism,
                epsilon=receipt.epsilon_after,
                run_epsilon=receipt.epsilon_after - base,
                noise=self.noise_source,
                personalized=tuned,
            )
        self.ledger.mark_completed(receipt.charge_id)
        self._store_release(  # after settling: see train_round
            request,
            "evaluate",
            {
                "metrics": metrics,
                "epsilon": result.epsilon,
                "run_epsilon": result.run_epsilon,
                "steps": mechanism.steps,
            },
        )
        return result

    def _numpy_generator(self, request: RoundRequest) -> np.random.Generator:
        sim = self.site.spec.simulation
        if sim is not None and sim.noise_seed is not None:
            text = f"{sim.noise_seed}|{request.round}|evaluate"
            digest = hashlib.sha256(text.encode()).digest()
            return np.random.default_rng(int.from_bytes(digest, "little"))
        return np.random.default_rng(secrets.randbits(128))

    def _predictions(
        self,
        task: str,
        state: Mapping[str, torch.Tensor] | None,
        model: str | None,
        device: torch.device,
        splits: tuple[str, ...] = ("val", "test"),
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        data = self.task_data(task)
        net = self.build_model(task, model)
        if state is not None:
            net.load_state_dict(dict(state))
        net.to(device)
        ys: dict[str, np.ndarray] = {}
        ps: dict[str, np.ndarray] = {}
        for split in splits:
            y, p = predict(net, data.dataset(split), device=device)
            # Weights crafted to overflow on one patient must not make the evaluation fail
            # (a failure would say that patient exists): a non-finite prediction counts as
            # an uninformative 0.5, for every patient alike.
            ys[split] = y
            ps[split] = np.clip(np.nan_to_num(p, nan=0.5, posinf=1.0, neginf=0.0), 0.0, 1.0)
        return ys, ps

    def evaluate(
        self,
        task: str,
        state: Mapping[str, torch.Tensor] | None,
        *,
        model: str | None = None,
        splits: tuple[str, ...] = ("val", "test"),
        device: str = "auto",
    ) -> dict[str, float]:
        """Exact aggregate metrics of a model on this site's splits, ``"<split>.<metric>"``.

        For the experimenter's own use (baselines, a simulated site that opted in): a
        federated run at a real site goes through :meth:`evaluate_round`. A split with fewer
        patients than the policy's ``min_count`` is withheld whole (small-count
        suppression); the patient count of a reported split is included as ``"<split>.n"``.
        """
        ys, ps = self._predictions(task, state, model, resolve_device(device), splits)
        survival = self._survival_release(task, ys, ps, noise_multiplier=0.0, generator=None)
        if survival is not None:
            return survival
        return split_metrics(ys, ps, min_count=self.policy.min_count)


_BIND_KEYS = {"received model": "received_sha256", "run config": "config_sha256"}


def keep_better_on_validation(
    global_metrics: Mapping[str, float], personal_metrics: Mapping[str, float]
) -> dict[str, float]:
    """The metrics a site reports for its personalized model: its own model's where the
    site's validation split says it is at least as good as the global model (AUROC), else the
    global model's, with ``personal.own`` 1 or 0 saying which.

    A personal model trained on a few hundred noisy patients can be worse than the global
    one; a site then keeps serving the global model, so personalization never makes a site
    worse than federation as far as its own validation patients can tell. Both inputs are
    already released (the evaluation's DP release, or exact metrics where the site opted in),
    so the choice is post-processing: no charge. Without a validation AUROC for both models
    the site keeps the global one.

    Examples
    --------
    >>> g = {"val.auroc": 0.70, "test.auroc": 0.72}
    >>> keep_better_on_validation(g, {"personal.val.auroc": 0.8, "personal.test.auroc": 0.9})
    {'personal.val.auroc': 0.8, 'personal.test.auroc': 0.9, 'personal.own': 1.0}
    >>> keep_better_on_validation(g, {"personal.val.auroc": 0.6, "personal.test.auroc": 0.9})
    {'personal.val.auroc': 0.7, 'personal.test.auroc': 0.72, 'personal.own': 0.0}
    """
    mine = personal_metrics.get(f"{keys.PERSONAL_PREFIX}val.auroc")
    theirs = global_metrics.get("val.auroc")
    if mine is not None and theirs is not None and mine >= theirs:
        return {**personal_metrics, keys.M_PERSONAL_OWN: 1.0}
    fallback = {
        f"{keys.PERSONAL_PREFIX}{name}": value
        for name, value in global_metrics.items()
        if not keys.is_release_metric(name)
        and not keys.is_personal_metric(name)
        and not keys.is_group_metric(name)
    }
    return {**fallback, keys.M_PERSONAL_OWN: 0.0}


def _train_payload(result: RoundResult) -> dict[str, Any]:
    return {
        "state": result.state,
        "n_train": result.n_train,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "mechanism": None if result.mechanism is None else vars(result.mechanism),
        "epsilon": result.epsilon,
        "delta": result.delta,
        "grad_sample_mode": result.grad_sample_mode,
        "run_epsilon": result.run_epsilon,
        "noise": result.noise,
    }


def _train_result(payload: Mapping[str, Any]) -> RoundResult:
    mech = payload["mechanism"]
    return RoundResult(
        state=payload["state"],
        n_train=payload["n_train"],
        steps=payload["steps"],
        train_loss=payload["train_loss"],
        mechanism=None if mech is None else Mechanism(**mech),
        epsilon=payload["epsilon"],
        delta=payload["delta"],
        grad_sample_mode=payload["grad_sample_mode"],
        replayed=True,
        run_epsilon=payload["run_epsilon"],
        noise=payload["noise"],
    )


def _torch_bytes(payload: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return buffer.getvalue()


def settings_from_run(
    cfg: FederationConfig, *, proximal_mu: float | None = None
) -> tuple[TrainConfig, DPConfig]:
    """A site's local-training and DP settings for a federated run's config.

    ``proximal_mu`` overrides the run's (FedProx sends it in each round's config).
    """
    train = TrainConfig(
        model=cfg.model or None,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.learning_rate,
        optimizer=cfg.optimizer,
        proximal_mu=cfg.proximal_mu if proximal_mu is None else proximal_mu,
        device=cfg.device,
    )
    dp = DPConfig(
        enabled=cfg.dp,
        target_epsilon=None if cfg.noise_multiplier > 0 else cfg.target_epsilon,
        noise_multiplier=cfg.noise_multiplier if cfg.noise_multiplier > 0 else None,
        delta=cfg.target_delta,
        max_grad_norm=cfg.max_grad_norm,
        accountant=cfg.accountant,
    )
    return train, dp


def _dp_fit(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    dataset: torch.utils.data.Dataset[Any],
    cfg: TrainConfig,
    plan: DPPlan,
    mode: str,
    generators: tuple[torch.Generator, torch.Generator],
    device: torch.device,
    hooks: Sequence[StepHook],
    what: str,
) -> tuple[dict[str, torch.Tensor], TrainStats]:
    """DP-SGD of ``model`` with exactly ``plan`` (which a charge already covers): the trained
    weights on the CPU and the loop's stats. Every DP-SGD copy a round runs (the global one,
    Ditto's, a fine-tune) goes through here.

    Raises
    ------
    RoundFailed
        The loop ran another number of steps than ``plan`` charged (the accounting would be
        wrong, so nothing it trained may leave or be kept).
    """
    sampling_gen, noise_gen = generators
    private = make_private(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        dataset=dataset,
        batch_size=cfg.batch_size,
        plan=plan,
        grad_sample_mode=mode,
        sampling_generator=sampling_gen,
        noise_generator=noise_gen,
    )
    stats = fit(
        private.model,
        private.loader,
        optimizer=private.optimizer,
        criterion=private.criterion,
        epochs=cfg.epochs,
        device=device,
        hooks=hooks,
    )
    if stats.steps != plan.steps:
        raise RoundFailed(
            f"{what} ran {stats.steps} steps but {plan.steps} were charged; the accounting "
            "would be wrong, so nothing it trained leaves or is kept"
        )
    return _cpu_state(private.unwrapped()), stats


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
