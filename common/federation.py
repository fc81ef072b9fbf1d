"""A federated run's configuration, read from Flower's run config by server and sites alike.

Flower's run config is flat (``[tool.flwr.app.config]`` merged with ``flwr run --run-config``)
and holds only bool/int/float/str. :class:`FederationConfig` is its validated, typed form: an
unknown key, a wrong type or an impossible value is one :class:`~fedcare.common.errors.ConfigError`
naming the key and the fix, before anything runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedcare.common.errors import ConfigError, format_validation_error

__all__ = ["FederationConfig", "STRATEGY_NAME", "PERSONALIZATIONS", "RUN_CONFIG_DEFAULTS"]

#: What a strategy's name looks like: ``strategy`` in a run config, and the names
#: :func:`fedcare.server.strategies.register_strategy` takes. Which names exist is the
#: server's registry's to say (plug-ins add some): the ServerApp refuses a name no strategy
#: is registered under, listing those that are. A site never builds a strategy, so it
#: needs no centre's strategy plug-in to accept a run.
STRATEGY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
#: How sites may keep a personal model beside the global one (``client/personal/``).
PERSONALIZATIONS = ("none", "finetune", "fedper", "ditto")


class FederationConfig(BaseModel):
    """Typed run config. Field names are the run-config keys with ``-`` as ``_``.

    ``noise_multiplier`` 0 means "calibrate from ``target_epsilon``"; ``target_epsilon`` is
    the cumulative ε each site's dataset may reach by the end of the run (each site's own
    budget caps it). ``hospital_dp_noise`` z > 0 adds hospital-level DP on top (fedavg/fedprox:
    updates clipped to ``hospital_dp_clip`` C, uniform mean, noise z C / n for n averaged).
    ``audit_key`` is the server's Ed25519 audit signing key (PEM); empty means
    ``<run-dir>/audit/server-key.pem``, created on first use (see ``server/audit.py``).
    ``evaluate_every`` k runs federated evaluation after every k-th round and the last one
    (round 0 always): each evaluation is one more query per site and (where a site releases
    evaluations with DP) one more charge to its ledger, planned into the run's ε. Round r's
    evaluation travels with round r + 1's train message (``server/guard.py``); round 0's and
    the last round's are messages of their own.
    ``run_signature`` is the centre's signature of the rest (``common/run_signing.py``): a
    deployed site trains only for a run its pinned run-signing key signed.
    The training defaults are the recipe (``client/recipe.py``, with the evidence behind each
    choice): 10 rounds of 1 local epoch; ``optimizer`` ``auto`` is momentum SGD in a private
    run and Adam otherwise, ``batch_size`` 0 lets each private site take about a quarter of
    its training patients per step (64 without DP), ``learning_rate`` 0 is the recipe's rate
    for the optimizer and model. Any other value is used as given.
    ``seed`` seeds what the server draws (the initial model); it decides nothing at a site:
    a site's split is fixed by its ``site.toml`` and its DP noise comes from its own entropy.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    task: str = "multimodal_outcome"
    num_server_rounds: int = Field(default=10, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=0, ge=0)
    learning_rate: float = Field(default=0.0, ge=0)
    optimizer: Literal["auto", "adam", "sgd"] = "auto"
    model: str = ""
    strategy: str = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0)
    server_learning_rate: float = Field(default=0.01, gt=0)
    trim_beta: float = Field(default=0.2, gt=0, lt=0.5)
    krum_malicious: int = Field(default=0, ge=0)
    dp: bool = True
    target_epsilon: float = Field(default=8.0, gt=0)
    noise_multiplier: float = Field(default=0.0, ge=0)
    target_delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    hospital_dp_noise: float = Field(default=0.0, ge=0)
    hospital_dp_clip: float = Field(default=10.0, gt=0)
    max_update_norm: float = Field(default=0.0, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_root: str = "runs/sites"
    sites_manifest: str = ""
    state_root: str = ""
    spec_path: str = ""
    run_id: str = ""
    run_dir: str = ""
    audit_key: str = ""
    run_signature: str = ""
    round_timeout: float = Field(default=600.0, gt=0)
    evaluate_every: int = Field(default=1, ge=1)
    min_sites: int = Field(default=2, ge=1)
    num_sites: int = Field(default=0, ge=0)
    connect_timeout: float = Field(default=120.0, gt=0)
    site_epsilon_budget: float = Field(default=10.0, gt=0)
    site_min_count: int = Field(default=10, ge=1)
    # Personalization (client/personal/): each site's own model beside the global one. Part
    # of the signed run config; every site plans its cost into the run's target ε.
    personalization: Literal[PERSONALIZATIONS] = "none"  # type: ignore[valid-type]
    personal_epochs: int = Field(default=1, ge=1)
    ditto_lambda: float = Field(default=1.0, gt=0)
    # Secure aggregation (common/secagg.py): the centre sees only the sum of the updates.
    # secagg-threshold 0: a majority of the round's sites (at least 2); scale: 2^bits.
    secure_aggregation: bool = False
    secagg_threshold: int = Field(default=0, ge=0)
    secagg_scale_bits: int = Field(default=24, ge=1, le=52)
    # Feature attributions of the final model (models/explain.py): one more Gaussian release
    # in each site's last evaluation, planned into the run's ε from its first round.
    explain: bool = False

    @field_validator("strategy")
    @classmethod
    def _strategy_name(cls, value: str) -> str:
        if not STRATEGY_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a strategy name: give a registered strategy's name, "
                "lowercase letters, digits, '-' or '_' (e.g. fedavg, fedprox, fedadam)"
            )
        return value

    @field_validator("target_epsilon", mode="before")
    @classmethod
    def _finite_epsilon(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(
                f"{value} is not a privacy target; for training without DP set dp = false "
                "(`--epsilon inf` on the command line does that)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            raise ValueError(
                "strategy 'fedprox' needs proximal-mu > 0 (e.g. 0.01; on the command line "
                "`--set proximal-mu=0.01`)"
            )
        if self.secure_aggregation and self.strategy != "fedavg":
            raise ValueError(
                f"secure-aggregation = true with strategy {self.strategy!r}: the centre then "
                "sees only the sum of the updates, which only fedavg aggregates (a median, "
                "trimmed mean, Krum or a server optimizer needs each update). Fix: strategy = "
                "'fedavg', or secure-aggregation = false"
            )
        if self.secure_aggregation and self.secagg_bound <= 0:
            raise ValueError(
                "secure-aggregation = true needs a bound on each site's update, which each "
                "site enforces before masking (the centre can no longer check one update): "
                "set max-update-norm > 0 (e.g. 10), or use hospital-level DP "
                "(hospital-dp-noise > 0 bounds updates by hospital-dp-clip)"
            )
        return self

    @property
    def secagg_bound(self) -> float:
        """The L2 bound each site clips its update to before masking (secure aggregation):
        ``hospital-dp-clip`` with hospital-level DP, else ``max-update-norm``."""
        return self.hospital_dp_clip if self.hospital_dp_noise > 0 else self.max_update_norm

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, source: str = "run config"
    ) -> FederationConfig:
        """Validate Flower's flat run config (``-`` in keys) into a config object."""
        data = {str(k).replace("-", "_"): v for k, v in run_config.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            # Keys as the run config spells them: target-epsilon, not target_epsilon.
            message = format_validation_error(source, e, spell=lambda k: k.replace("_", "-"))
            raise ConfigError(message) from e

    @property
    def evaluation_rounds(self) -> tuple[int, ...]:
        """The rounds after which the server evaluates: 0, every k-th, and the last."""
        last = self.num_server_rounds
        rounds = [r for r in range(1, last + 1) if r % self.evaluate_every == 0 or r == last]
        return (0, *rounds)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat form Flower's run config takes (``-`` in keys)."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}


RUN_CONFIG_DEFAULTS: dict[str, bool | int | float | str] = FederationConfig().to_run_config()
