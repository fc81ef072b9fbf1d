"""Aggregation strategies by name: Flower's own, configured from a run's config.

A new strategy is one entry in :data:`_BUILDERS`. Every strategy sends each round to every
connected site (a hospital federation is small and every site matters) and goes on as long as
``min-sites`` are connected: the ServerApp waits for all ``num-sites`` before round 1, and a site
lost later (no reply within the round timeout, or gone offline) is recorded as a drop-out by
:class:`server.guard.GuardedStrategy` while the others carry on.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.errors import ConfigError
from common.federation import STRATEGIES, FederationConfig

__all__ = ["build_strategy", "available_strategies"]

Builder = Callable[[FederationConfig, dict], Strategy]

_BUILDERS: dict[str, Builder] = {
    "fedavg": lambda cfg, common: FedAvg(**common),
    "fedprox": lambda cfg, common: FedProx(proximal_mu=cfg.proximal_mu, **common),
    "fedadam": lambda cfg, common: FedAdam(eta=cfg.server_learning_rate, **common),
    "fedyogi": lambda cfg, common: FedYogi(eta=cfg.server_learning_rate, **common),
    "fedmedian": lambda cfg, common: FedMedian(**common),
    "fedtrimmedavg": lambda cfg, common: FedTrimmedAvg(beta=cfg.trim_beta, **common),
    "krum": lambda cfg, common: Krum(num_malicious_nodes=cfg.krum_malicious, **common),
}
assert set(_BUILDERS) == set(STRATEGIES), "every configurable strategy needs a builder"


def available_strategies() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def build_strategy(cfg: FederationConfig, *, n_sites: int) -> Strategy:
    """The run's aggregation strategy, optionally wrapped in hospital-level DP.

    Hospital-level DP uses Flower's server-side fixed clipping: each site's update is clipped
    to ``hospital_dp_clip`` and Gaussian noise of ``hospital_dp_noise x clip`` is added to
    the aggregate, protecting whole hospitals on top of the record-level DP-SGD at each site.
    """
    if n_sites < 1:
        raise ConfigError("a federation needs at least one site")
    # Flower waits, without a timeout, until ``min_available_nodes`` are connected: with all
    # n_sites there, one site going offline would stall the whole federation.
    quorum = max(1, min(cfg.min_sites, n_sites))
    common = {
        "min_train_nodes": quorum,
        "min_evaluate_nodes": quorum,
        "min_available_nodes": quorum,
    }
    strategy = _BUILDERS[cfg.strategy](cfg, common)
    if cfg.hospital_dp_noise > 0:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=cfg.hospital_dp_noise,
            clipping_norm=cfg.hospital_dp_clip,
            num_sampled_clients=n_sites,
        )
    return strategy
