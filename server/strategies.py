"""Aggregation strategies by name: Flower's own, configured from a run's config.

Each strategy is registered under the name a run config's ``strategy`` gives, with a
builder: :func:`register_strategy`. fedcare registers Flower's FedAvg, FedProx, FedAdam,
FedYogi, FedMedian, FedTrimmedAvg and Krum below; a plug-in (:mod:`fedcare.common.plugins`)
registers more in every process that builds one, and :func:`build_strategy` refuses a name
no strategy is registered under, listing those that are. Every strategy sends each round to every
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
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from fedcare.common.errors import ConfigError
from fedcare.common.federation import STRATEGY_NAME, FederationConfig
from fedcare.common.packed_arrays import layout_of, pack, unpack
from fedcare.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    OptimizerState,
    optimizer_mismatch,
)
from fedcare.server.hospital_dp import HospitalDP, check_hospital_dp
from fedcare.server.krum import Krum

__all__ = [
    "StrategyBuilder",
    "register_strategy",
    "available_strategies",
    "strategy_builder",
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

StrategyBuilder = Callable[[FederationConfig, dict[str, Any]], Strategy]
"""Builds a strategy: ``builder(cfg, quorum) -> flwr.serverapp.strategy.Strategy``.

``cfg`` is the run's :class:`~fedcare.common.federation.FederationConfig` (its knobs:
``server_learning_rate``, ``proximal_mu``, ...); ``quorum`` holds the keyword arguments every
Flower strategy takes for how many sites it needs (``min_train_nodes``,
``min_evaluate_nodes``, ``min_available_nodes``), to pass on as ``**quorum``."""

#: Name -> builder: the strategies a run config may name (:func:`register_strategy`).
_BUILDERS: dict[str, StrategyBuilder] = {}


def register_strategy(name: str, builder: StrategyBuilder) -> StrategyBuilder:
    """Register ``builder`` as the strategy a run config names ``name``.

    Parameters
    ----------
    name:
        Lowercase letters, digits, ``-`` or ``_``, starting with a letter
        (:data:`fedcare.common.federation.STRATEGY_NAME`).
    builder:
        See :data:`StrategyBuilder`. fedcare's update checks go around whatever it builds;
        hospital-level DP (``hospital-dp-noise``) takes only ``fedavg`` and ``fedprox``.

    Returns
    -------
    StrategyBuilder
        ``builder``, unchanged.

    Raises
    ------
    ConfigError
        The name is malformed or already registered, or ``builder`` is not callable.

    Examples
    --------
    >>> "fedavg" in available_strategies()
    True
    >>> register_strategy("fedavg", lambda cfg, quorum: FedAvg(**quorum))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.common.errors.ConfigError: a strategy named 'fedavg' is already registered; ...
    """
    if not isinstance(name, str) or not STRATEGY_NAME.fullmatch(name):
        raise ConfigError(
            f"strategy name {name!r}: use lowercase letters, digits, '-' or '_', starting "
            "with a letter (e.g. 'fedavgm')"
        )
    if name in _BUILDERS:
        raise ConfigError(
            f"a strategy named {name!r} is already registered; pick another name for the "
            "new strategy"
        )
    if not callable(builder):
        raise ConfigError(
            f"strategy {name!r}: the builder must be callable as builder(cfg, quorum), got "
            f"{type(builder).__name__}"
        )
    _BUILDERS[name] = builder
    return builder


def available_strategies() -> tuple[str, ...]:
    """The names a run config's ``strategy`` may take, sorted."""
    return tuple(sorted(_BUILDERS))


def strategy_builder(name: str) -> StrategyBuilder:
    """The builder registered under ``name``.

    Raises
    ------
    ConfigError
        No strategy is registered under ``name``; the message lists those that are.
    """
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r}; registered strategies: "
            f"{', '.join(available_strategies())}. A plug-in registers another with "
            "fedcare.server.strategies.register_strategy (FEDCARE_PLUGINS, or the "
            "'fedcare.plugins' entry point group: see docs/api.md)"
        ) from None


register_strategy("fedavg", lambda cfg, quorum: FedAvg(**quorum))
register_strategy("fedprox", lambda cfg, quorum: FedProx(proximal_mu=cfg.proximal_mu, **quorum))
register_strategy("fedadam", lambda cfg, quorum: FedAdam(eta=cfg.server_learning_rate, **quorum))
register_strategy("fedyogi", lambda cfg, quorum: FedYogi(eta=cfg.server_learning_rate, **quorum))
register_strategy("fedmedian", lambda cfg, quorum: FedMedian(**quorum))
register_strategy("fedtrimmedavg", lambda cfg, quorum: FedTrimmedAvg(beta=cfg.trim_beta, **quorum))
register_strategy(
    "krum", lambda cfg, quorum: Krum(num_malicious_nodes=cfg.krum_malicious, **quorum)
)


def build_strategy(cfg: FederationConfig, *, n_sites: int) -> Strategy:
    """The run's aggregation strategy, optionally wrapped in hospital-level DP.

    The strategy is the one registered under ``cfg.strategy`` (:func:`register_strategy`).
    With ``hospital_dp_noise`` z > 0 it is wrapped in fedcare's hospital-level DP
    (:class:`~fedcare.server.hospital_dp.HospitalDP`): each site's update is clipped to
    ``hospital_dp_clip`` C, the clipped updates are averaged with uniform weights (not by
    patients) over the n updates the round actually averages, and Gaussian noise of standard
    deviation z C / n is added to every coordinate, so each whole hospital gets noise
    multiplier z, on top of the record-level DP-SGD at each site. The noise comes from OS
    entropy, never from the run config. Only the mean strategies ``fedavg`` and ``fedprox``
    take it: one hospital moves a median, a trimmed mean, Krum's choice or a server
    optimizer's step by more than C / n.

    Raises
    ------
    ConfigError
        No site, no strategy registered under ``cfg.strategy`` (the registered ones are
        listed), its builder returned something that is not a Flower ``Strategy``, or
        ``hospital_dp_noise`` > 0 with a strategy other than ``fedavg`` or ``fedprox``.
    """
    if n_sites < 1:
        raise ConfigError("a federation needs at least one site")
    builder = strategy_builder(cfg.strategy)
    # Flower waits, without a timeout, until ``min_available_nodes`` are connected: with all
    # n_sites there, one site going offline would stall the whole federation.
    quorum = max(1, min(cfg.min_sites, n_sites))
    common = {
        "min_train_nodes": quorum,
        "min_evaluate_nodes": quorum,
        "min_available_nodes": quorum,
    }
    strategy = builder(cfg, common)
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy {cfg.strategy!r}: its builder returned {type(strategy).__name__}, not a "
            "flwr.serverapp.strategy.Strategy; make it return one (e.g. FedAvg(**quorum))"
        )
    if cfg.hospital_dp_noise > 0:
        check_hospital_dp(cfg)
        strategy = HospitalDP(
            strategy,
            noise_multiplier=cfg.hospital_dp_noise,
            clipping_norm=cfg.hospital_dp_clip,
        )
    return strategy


def inner_strategy(strategy: Strategy) -> Strategy:
    """The aggregation strategy inside any wrappers.

    fedcare's :class:`~fedcare.server.guard.GuardedStrategy` and
    :class:`~fedcare.server.hospital_dp.HospitalDP` (like Flower's own DP wrappers) keep the
    strategy they wrap in ``.strategy``; follow it down to the one that aggregates.

    Examples
    --------
    >>> fedavg = FedAvg()
    >>> wrapped = HospitalDP(fedavg, noise_multiplier=1.0, clipping_norm=1.0)
    >>> inner_strategy(wrapped) is fedavg
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
            # Kept by tensor name, whatever packing the wire used (a checkpoint outlives it).
            moments[name] = {k: np.array(v, copy=True) for k, v in unpack(value).items()}
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
        # Packed as the model is on the wire, so each moment meets its own numbers.
        packed = None if not arrays else pack(arrays, layout=layout_of(model))
        setattr(inner, moment, packed)
    return None
