"""What a site allows: its own privacy budget and limits, enforced before any training.

The budget belongs to the site, not the server: a request from the coordinating server that
would exceed it, use a task or model the site has not approved, ask for more local epochs than
allowed, or add less noise than the site's floor is refused with a :class:`PolicyViolation`
(or :class:`PrivacyBudgetExceeded` from the ledger) whose message says why.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcare.common.errors import PolicyViolation
from fedcare.common.federation import FederationConfig

__all__ = ["SitePolicy", "simulated_site_policy"]


class SitePolicy(BaseModel):
    """A site's own rules. Frozen; unknown keys are errors.

    Attributes
    ----------
    epsilon_budget:
        The most ε this site's dataset may ever reach, across every run.
    delta:
        The δ every ε of this site is stated at.
    min_noise_multiplier:
        The least DP-SGD noise the site accepts, whatever ε a run asks for.
    require_dp:
        Refuse non-private training (the default); a research sandbox may turn it off.
    allowed_tasks, allowed_models:
        ``None`` allows every task the site's ``site.toml`` defines / every registered model.
    max_local_epochs:
        Upper bound on local epochs per round.
    min_count:
        Small-count suppression: no metric computed on fewer than this many patients
        leaves the site.
    max_run_epsilon:
        The most ε one run may add to the dataset's lifetime ε (a run asking for more is
        refused before anything is charged).
    max_rounds:
        The most training rounds one run may plan.
    max_evaluations:
        The most evaluation messages one run may send this site.
    evaluation_noise_multiplier:
        Noise of the differentially private evaluation release (``models/evaluation.py``),
        in units of one patient's contribution; each evaluation is charged to the ledger
        as a Gaussian mechanism with this noise multiplier.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    epsilon_budget: float = Field(default=10.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"
    min_noise_multiplier: float = Field(default=0.3, ge=0)
    require_dp: bool = True
    allowed_tasks: tuple[str, ...] | None = None
    allowed_models: tuple[str, ...] | None = None
    max_local_epochs: int = Field(default=5, ge=1)
    min_count: int = Field(default=10, ge=1)
    max_run_epsilon: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    max_rounds: int = Field(default=100, ge=1)
    max_evaluations: int = Field(default=25, ge=0)
    evaluation_noise_multiplier: float = Field(default=5.0, gt=0, allow_inf_nan=False)

    def check_run(
        self,
        *,
        site_id: str,
        rounds: int,
        evaluations: int,
        target_epsilon: float | None,
    ) -> None:
        """Refuse a run whose plan exceeds this site's per-run limits.

        ``target_epsilon`` is what the run asks to add to the dataset's ε (``None`` when it
        fixes the noise instead; the ledger then bounds each charge).
        """
        if rounds > self.max_rounds:
            raise PolicyViolation(
                f"site {site_id} allows at most {self.max_rounds} rounds per run; the run "
                f"plans {rounds}. Fix: plan fewer rounds, or the site raises max_rounds"
            )
        if evaluations > self.max_evaluations:
            raise PolicyViolation(
                f"site {site_id} allows at most {self.max_evaluations} evaluations per run; "
                f"the run plans {evaluations}. Fix: raise evaluate-every, or the site raises "
                "max_evaluations_per_run"
            )
        if target_epsilon is not None and target_epsilon > self.max_run_epsilon:
            raise PolicyViolation(
                f"site {site_id} lets one run add at most epsilon={self.max_run_epsilon:g}; "
                f"the run asks for {target_epsilon:g}. Fix: ask for a smaller target-epsilon"
            )

    def check_request(
        self, *, site_id: str, task: str, model: str, local_epochs: int, dp_enabled: bool
    ) -> None:
        """Refuse a training request the site does not allow."""
        if self.allowed_tasks is not None and task not in self.allowed_tasks:
            raise PolicyViolation(
                f"site {site_id} does not allow task {task!r} (allowed: "
                f"{', '.join(self.allowed_tasks)}); its administrator can add it to allowed_tasks"
            )
        if self.allowed_models is not None and model not in self.allowed_models:
            raise PolicyViolation(
                f"site {site_id} does not allow model {model!r} (allowed: "
                f"{', '.join(self.allowed_models)})"
            )
        if local_epochs > self.max_local_epochs:
            raise PolicyViolation(
                f"site {site_id} allows at most {self.max_local_epochs} local epochs per round; "
                f"the run asked for {local_epochs}"
            )
        if self.require_dp and not dp_enabled:
            raise PolicyViolation(
                f"site {site_id} requires differential privacy; the run asked for non-private "
                "training"
            )

    def check_noise(self, *, site_id: str, noise_multiplier: float) -> None:
        """Refuse noise below the site's floor (a run calibrated for too large an ε)."""
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyViolation(
                f"site {site_id} requires a noise multiplier >= {self.min_noise_multiplier}; "
                f"this run would use {noise_multiplier:.3f} (ask for a smaller ε or fewer steps)"
            )


def simulated_site_policy(cfg: FederationConfig) -> SitePolicy:
    """The policy of a simulated site: the one constructor every simulated site uses.

    A simulated site belongs to the experimenter who also plans the run, so it allows what
    the run plans (its epochs, rounds and evaluations) under the budget the run config
    gives every simulated site (``site-epsilon-budget``, ``site-min-count``). The ClientApp
    and the local-only baseline both build their policy here, so they can never disagree.
    """
    defaults = SitePolicy()
    return SitePolicy(
        epsilon_budget=cfg.site_epsilon_budget,
        delta=cfg.target_delta,
        accountant=cfg.accountant,
        require_dp=cfg.dp,
        min_count=cfg.site_min_count,
        max_local_epochs=max(cfg.local_epochs, cfg.personal_epochs, defaults.max_local_epochs),
        max_run_epsilon=cfg.site_epsilon_budget,
        max_rounds=max(cfg.num_server_rounds, defaults.max_rounds),
        max_evaluations=max(cfg.num_server_rounds + 1, defaults.max_evaluations),
    )
