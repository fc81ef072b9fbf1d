"""What a site allows: its own privacy budget and limits, enforced before any training.

The budget belongs to the site, not the server: a request from the coordinating server that
would exceed it, use a task or model the site has not approved, ask for more local epochs than
allowed, or add less noise than the site's floor is refused with a :class:`PolicyViolation`
(or :class:`PrivacyBudgetExceeded` from the ledger) whose message says why.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.errors import PolicyViolation

__all__ = ["SitePolicy"]


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
