"""Aggregation strategies by name: Flower's own, configured from a run's config.

A new strategy is one entry in :data:`_BUILDERS`. Every strategy sends each round to every
connected site (a hospital federation is small and every site matters) and goes on as long as
``min-sites`` are connected: the ServerApp waits for all ``num-sites`` before round 1, and a site
lost later (no reply within the round timeout, or gone offline) is recorded as a drop-out by
:class:`fedcare.server.guard.GuardedStrategy` while the others carry on.

A server optimizer's state survives a resume: :func:`optimizer_state` takes the moments of
Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad; inside any wrapper) for the round's
checkpoint, and :func:`restore_optimizer_state` puts them back into the freshly built
strategy before the resumed run's first round. Together with the absolute round number the
guard passes to the strategy (FedAdam's bias correction reads it), the resumed run takes the
same steps an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
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
from flwr.serverapp.strategy.fedopt import FedOpt

from fedcare.common.errors import ConfigError
from fedcare.common.federation import STRATEGIES, FederationConfig
from fedcare.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    OptimizerState,
    optimizer_mismatch,
)

__all__ = [
    "build_strategy",
    "inner_strategy",
    "optimizer_state",
    "restore_optimizer_state",
    "OPTIMIZER_MOMENTS",
]

#: What Flower's FedOpt (``flwr/serverapp/strategy/fedopt.py``) carries from one round to
#: the next: the first and second moments, one array per model array (``None`` until the
#: first aggregation). Its other state needs no saving: ``current_arrays`` is set from the
#: global model (which the checkpoint holds) by every ``configure_train``; FedAdam's bias
#: correction counts rounds with ``server_round`` (the guard passes the absolute round);
#: ``eta``, ``beta_1``, ``beta_2`` and ``tau`` come from the run's configuration.
OPTIMIZER_MOMENTS = ("m_t", "v_t")

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


def inner_strategy(strategy: Strategy) -> Strategy:
    """The aggregation strategy inside any wrappers.

    fedcare's :class:`~fedcare.server.guard.GuardedStrategy` and Flower's DP wrappers
    (``DifferentialPrivacyServerSideFixedClipping``, ...) keep the strategy they wrap in
    ``.strategy``; follow it down to the one that aggregates.

    Examples
    --------
    >>> fedadam = FedAdam()
    >>> wrapped = DifferentialPrivacyServerSideFixedClipping(
    ...     fedadam, noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=2
    ... )
    >>> inner_strategy(wrapped) is fedadam
    True
    """
    seen: set[int] = set()
    while isinstance(getattr(strategy, "strategy", None), Strategy) and id(strategy) not in seen:
        seen.add(id(strategy))
        strategy = strategy.strategy  # type: ignore[attr-defined]
    return strategy


def optimizer_state(strategy: Strategy) -> OptimizerState | None:
    """A copy of the server optimizer's state, for the round's checkpoint.

    ``None`` for a strategy that keeps none (FedAvg, FedProx, FedMedian, ...); for Flower's
    FedOpt family (FedAdam, FedYogi, FedAdagrad), its moments (:data:`OPTIMIZER_MOMENTS`)
    that have started.
    """
    inner = inner_strategy(strategy)
    if not isinstance(inner, FedOpt):
        return None
    moments: dict[str, dict[str, np.ndarray]] = {}
    for name in OPTIMIZER_MOMENTS:
        value = getattr(inner, name)
        if value:  # FedOpt starts a moment from zeros where it is None or empty
            moments[name] = {k: np.array(v, copy=True) for k, v in value.items()}
    return OptimizerState(strategy=type(inner).__name__, moments=moments)


def restore_optimizer_state(
    strategy: Strategy,
    checkpoint: Checkpoint,
    *,
    model: Mapping[str, np.ndarray],
    path: Path,
) -> str | None:
    """Put the checkpoint's optimizer state back into the freshly built ``strategy``.

    Parameters
    ----------
    strategy:
        The resumed run's strategy, before its first round (wrappers are looked through).
    checkpoint:
        The checkpoint the run resumes from.
    model:
        The model the run resumes (its arrays by name): each moment must match it.
    path:
        The checkpoint's file, named in errors.

    Returns
    -------
    str or None
        ``None`` when the state was restored or the strategy keeps none; a sentence to log
        and record when the strategy keeps optimizer state but the checkpoint, written by an
        older fedcare, holds none: the moments start from zero.

    Raises
    ------
    CheckpointError
        The checkpoint's optimizer state belongs to another strategy than the run's, or does
        not match ``model`` (array names, shapes) or holds a NaN or an infinity.
    """
    inner = inner_strategy(strategy)
    name = type(inner).__name__
    saved = checkpoint.optimizer
    keeps_state = isinstance(inner, FedOpt)
    if checkpoint.format < 2:
        if not keeps_state:
            return None
        return (
            f"the checkpoint of round {checkpoint.round} was written by an older fedcare "
            f"that did not save the server optimizer's state: {name}'s moments start again "
            "from zero"
        )
    if (saved is None) == keeps_state or (saved is not None and saved.strategy != name):
        written_by = (
            f"it holds {saved.strategy}'s optimizer state"
            if saved is not None
            else "it was written by a strategy that keeps no optimizer state"
        )
        raise CheckpointError(
            path,
            f"{written_by}, but this run's strategy is {name}",
            fix="resume with the strategy the run was started with (strategy in its "
            "config.toml), or start a new run (without --resume, or in another --out)",
        )
    if saved is None:
        return None
    problem = optimizer_mismatch(saved, model)
    if problem is not None:
        raise CheckpointError(
            path,
            f"its optimizer state does not match this run's model: {problem}",
            fix="resume with the task and model the run was started with (its config.toml), "
            "or start a new run (without --resume, or in another --out)",
        )
    for moment in OPTIMIZER_MOMENTS:
        arrays = saved.moments.get(moment)
        setattr(inner, moment, None if not arrays else {k: np.array(v) for k, v in arrays.items()})
    return None
