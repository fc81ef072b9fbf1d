"""Hospital-level DP: ``hospital-dp-noise`` z > 0 wraps fedavg or fedprox in fedcare's
:class:`~fedcare.server.hospital_dp.HospitalDP`.

Each round the wrapper clips each site's update Δ = x - g to L2 norm at most C =
``hospital-dp-clip`` (all arrays together; a zero update stays zero), averages the clipped
updates with uniform weights over the n updates it received, and adds Gaussian noise of
standard deviation σ = z C / n to every coordinate (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"): one hospital moves the pre-noise mean by
at most C / n, so each hospital gets noise multiplier z.

The tests check the result against numpy references (``_strategy_harness.py``: the uniform
mean of clipped updates, written without fedcare's code) and the residual (result -
reference) against N(0, σ²) over ~22 000 coordinates, with bounds derived from that sample
size: each bound is five standard errors, so it holds for any noise with probability
> 1 - 1e-6; the tests inject seeded generators only so that a rerun is identical. They
replace the strict xfails that found Flower's ``DifferentialPrivacyServerSideFixedClipping``
wrong here: a zero update divided by zero, patient-weighted FedAvg (99:1 -> 0.99 C), the
median, trimmed mean, Krum and the server optimizers had sensitivities other than C / n, and
a round with a drop-out was noised for the sites sent to, not those averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import is_packed
from fedcare.server import strategies
from fedcare.server.guard import GuardedStrategy
from fedcare.server.hospital_dp import (
    MEAN_STRATEGIES,
    HospitalDP,
    HospitalDPRound,
    check_hospital_dp,
)
from fedcare.server.strategies import build_strategy, inner_strategy, register_strategy
from tests._flower import task_identity
from tests.server._strategy_harness import (
    CLASSES,
    STRATEGIES,
    U32,
    clipped,
    config,
    flat,
    reference_aggregate,
    reply,
    send,
    to_numpy,
    train_round,
    weighted_mean,
)

#: ~22 000 coordinates: enough for the noise's standard deviation to be measured to ±2.4 %
#: (five standard errors, below).
SHAPES = {"w": (100, 200), "b": (2000,)}
N_COORDS = sum(int(np.prod(s)) for s in SHAPES.values())

#: The strategies hospital-level DP refuses: every built-in one that is not a mean.
REFUSED = tuple(name for name in STRATEGIES if name not in MEAN_STRATEGIES)


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _cfg(strategy: str, **more: object) -> FederationConfig:
    return config(
        **{
            "strategy": strategy,
            "min_sites": 1,
            "proximal_mu": 0.1,
            "server_learning_rate": 0.05,
            "trim_beta": 0.2,
            "krum_malicious": 1,
            **more,
        }
    )


def _built(cfg: FederationConfig, *, n_sites: int, seed: int) -> HospitalDP:
    """The run's wrapper, as ``build_strategy`` makes it, with a seeded generator injected
    (the tests' only seeding: a rerun draws the same noise)."""
    strategy = build_strategy(cfg, n_sites=n_sites)
    assert isinstance(strategy, HospitalDP)
    strategy.rng = np.random.default_rng(seed)
    return strategy


def _model(seed: int) -> dict[str, np.ndarray]:
    """A float32 global model of weights ~ N(0, 0.1²) (norm ≈ 15)."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=0.1, size=s).astype(np.float32) for k, s in SHAPES.items()}


def _direction(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random unit vector over all the model's coordinates."""
    d = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    norm = np.sqrt(sum(np.sum(v**2) for v in d.values()))
    return {k: v / norm for k, v in d.items()}


def _site_models(
    model: dict[str, np.ndarray], norms: list[float], seed: int
) -> list[dict[str, np.ndarray]]:
    """One site per update norm: the global model plus that norm along a random direction."""
    rng = np.random.default_rng(seed)
    out = []
    for norm in norms:
        u = _direction(rng)
        out.append({k: (model[k] + norm * u[k]).astype(np.float32) for k in model})
    return out


def _uniform_mean_of_clipped(
    model: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], clip: float
) -> dict[str, np.ndarray]:
    """The reference: each update clipped to ``clip``, then averaged with equal weights."""
    return weighted_mean([clipped(model, u, clip) for u in updates], [1.0] * len(updates))


def _assert_gaussian(residual: np.ndarray, sigma: float) -> None:
    """``residual`` looks like N(0, sigma²) iid: its mean within five standard errors
    (σ/√N) of 0, its standard deviation within five standard errors (≈ σ/√(2N) for a normal
    sample) of sigma."""
    n = residual.size
    assert abs(residual.mean()) < 5 * sigma / np.sqrt(n), (residual.mean(), sigma)
    assert residual.std() == pytest.approx(sigma, rel=5 / np.sqrt(2 * n)), (residual.std(), sigma)


# ------------------------------------------------------------------ no noise, no wrapper


@pytest.mark.parametrize("name", STRATEGIES)
def test_without_hospital_noise_there_is_no_wrapper_and_no_clipping(name: str) -> None:
    """``hospital-dp-noise`` 0 (the default): the strategy itself, whatever the clip; an
    update far beyond the clip counts in full and the aggregate is the plain one."""
    cfg = _cfg(name, hospital_dp_noise=0.0, hospital_dp_clip=0.1)
    strategy = build_strategy(cfg, n_sites=5)
    assert not isinstance(strategy, HospitalDP)
    assert type(strategy) is CLASSES[name] and inner_strategy(strategy) is strategy
    model = _model(1)
    updates = _site_models(model, [5.0, 300.0, 8.0, 2.0, 7.0], seed=2)  # all beyond 0.1
    weights = [10, 20, 30, 40, 50]
    got, _ = train_round(strategy, 1, model, updates, weights)
    assert got is not None
    expected = reference_aggregate(name, cfg, model, updates, weights)
    # float32 arithmetic on values of magnitude ≤ S: a few dozen roundings of relative
    # 2^-24 at most (64 U32 S), amplified ≤ 1/τ = 1e3 by FedAdam's and FedYogi's division
    # by √v + τ, times their η = 0.05 (×50). With S ≈ 10 that is ≤ 4e-4 for those two and
    # ≤ 1e-5 for the others, far below what clipping to 0.1 would change (the 300-norm
    # update alone moves the mean by 60/√N ≈ 0.4 per coordinate on average).
    scale = max(float(np.max(np.abs(a))) for u in updates for a in u.values())
    amplification = 50.0 if name in ("fedadam", "fedyogi") else 1.0
    np.testing.assert_allclose(
        flat(got), flat(expected), rtol=0, atol=64 * amplification * U32 * scale
    )


# ------------------------------------------------------------------ the wrapper


@pytest.mark.parametrize("name", MEAN_STRATEGIES)
def test_the_wrapper_carries_the_run_s_noise_and_clip(name: str) -> None:
    cfg = _cfg(name, hospital_dp_noise=0.7, hospital_dp_clip=2.5, min_sites=2)
    strategy = build_strategy(cfg, n_sites=6)
    assert isinstance(strategy, HospitalDP)
    assert (strategy.noise_multiplier, strategy.clipping_norm) == (0.7, 2.5)
    assert isinstance(strategy.rng, np.random.Generator)
    assert strategy.last_round is None
    assert type(inner_strategy(strategy)) is CLASSES[name]


@pytest.mark.parametrize("name", REFUSED)
def test_hospital_dp_refuses_a_strategy_that_is_not_a_mean(name: str) -> None:
    """One hospital moves a median, a trimmed mean or Krum's choice by up to C, and a server
    optimizer's step by an amount unrelated to C: noise z C / n would not protect it at z."""
    with pytest.raises(ConfigError) as info:
        build_strategy(_cfg(name, hospital_dp_noise=1.0), n_sites=5)
    message = str(info.value)
    assert "\n" not in message
    assert f"strategy {name!r}" in message
    assert "sensitivity" in message and "C / n" in message  # why
    assert "'fedavg' or 'fedprox'" in message and "hospital-dp-noise = 0" in message  # the fix
    assert type(build_strategy(_cfg(name), n_sites=5)) is CLASSES[name]  # without DP: fine
    # The same check, for a caller that validates a config before any run (a sweep):
    with pytest.raises(ConfigError, match=f"strategy {name!r}"):
        check_hospital_dp(_cfg(name, hospital_dp_noise=1.0))
    check_hospital_dp(_cfg(name))
    check_hospital_dp(_cfg("fedprox", hospital_dp_noise=1.0))


def test_hospital_dp_refuses_a_registered_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in's strategy may aggregate any way it likes: fedcare cannot know one
    hospital's effect on it, so hospital-level DP is refused for it too."""
    monkeypatch.setattr(strategies, "_BUILDERS", dict(strategies._BUILDERS))
    register_strategy("meanish", lambda cfg, quorum: FedAvg(**quorum))
    assert type(build_strategy(_cfg("meanish"), n_sites=3)) is FedAvg
    with pytest.raises(ConfigError, match="strategy 'meanish'.*Fix: use strategy = 'fedavg'"):
        build_strategy(_cfg("meanish", hospital_dp_noise=0.5), n_sites=3)


@pytest.mark.parametrize("name", MEAN_STRATEGIES)
def test_each_update_is_clipped_and_the_uniform_mean_gets_noise_of_std_z_clip_over_n(
    name: str,
) -> None:
    """Five sites, one of them sending an update of norm 1000 against a clip of 1: the
    result is the uniform mean of the clipped updates plus N(0, (z C / 5)²) per coordinate.
    An unclipped 1000-norm update would add ≈ 200/√N ≈ 1.3 per coordinate to the residual's
    spread (σ = 0.16), far outside the bound; a wrong σ fails the spread check too."""
    z, clip, n = 0.8, 1.0, 5
    cfg = _cfg(name, hospital_dp_noise=z, hospital_dp_clip=clip)
    strategy = _built(cfg, n_sites=n, seed=40)
    model = _model(3)
    updates = _site_models(model, [0.5, 3.0, 1000.0, 2.0, 0.8], seed=4)
    weights = [12, 40, 25, 8, 30]
    got, _ = train_round(strategy, 1, model, updates, weights)
    assert got is not None
    assert all(got[k].dtype == np.float32 for k in model)
    expected = _uniform_mean_of_clipped(model, updates, clip)
    # float32 rounding of the result (≲ 1e-7 per coordinate) is six orders below σ = 0.16.
    _assert_gaussian(flat(got) - flat(expected), sigma=z * clip / n)
    assert strategy.last_round == HospitalDPRound(server_round=1, n=5, clipped=3, std=z * clip / n)


@pytest.mark.parametrize("name", MEAN_STRATEGIES)
def test_the_mean_is_uniform_whatever_the_numbers_of_patients(name: str) -> None:
    """Weights 1000 : 10 : 1 patients: the release is the plain mean of the (clipped)
    updates. With noise far below float32's resolution the result is that mean to float32
    rounding, and far (≈ 0.4 in norm) from the patient-weighted mean."""
    cfg = _cfg(name, hospital_dp_noise=1e-9, hospital_dp_clip=1.0)
    model = _model(21)
    updates = _site_models(model, [0.3, 0.6, 2.0], seed=22)
    weights = [1000, 10, 1]
    got, _ = train_round(_built(cfg, n_sites=3, seed=47), 1, model, updates, weights)
    assert got is not None
    uniform = flat(_uniform_mean_of_clipped(model, updates, 1.0))
    weighted = flat(weighted_mean([clipped(model, u, 1.0) for u in updates], weights))
    # |x| ≲ 0.6: rounding to float32 changes a coordinate by ≤ 0.6 U32 ≈ 4e-8.
    np.testing.assert_allclose(flat(got), uniform, rtol=0, atol=1e-7)
    assert np.linalg.norm(weighted - uniform) > 0.1


@pytest.mark.parametrize("z, clip, n_sites", [(0.5, 1.0, 4), (2.0, 0.1, 2), (1.0, 10.0, 8)])
def test_the_noise_std_scales_with_z_and_clip_and_inversely_with_the_sites(
    z: float, clip: float, n_sites: int
) -> None:
    cfg = _cfg("fedavg", hospital_dp_noise=z, hospital_dp_clip=clip)
    strategy = _built(cfg, n_sites=n_sites, seed=41)
    model = _model(5)
    updates = _site_models(model, [3 * clip * (i + 1) for i in range(n_sites)], seed=6)
    got, _ = train_round(strategy, 1, model, updates, [1] * n_sites)
    assert got is not None
    expected = _uniform_mean_of_clipped(model, updates, clip)
    _assert_gaussian(flat(got) - flat(expected), sigma=z * clip / n_sites)


@pytest.mark.parametrize("name", MEAN_STRATEGIES)
def test_an_update_of_any_norm_moves_the_model_by_at_most_clip_along_it(name: str) -> None:
    """One site sends an update of norm 10⁶ along u: the model moves by C along u (plus the
    noise's component along u, N(0, σ²) for a unit u: within 5σ)."""
    z, clip = 0.01, 2.0
    cfg = _cfg(name, hospital_dp_noise=z, hospital_dp_clip=clip)
    strategy = _built(cfg, n_sites=1, seed=42)
    model = _model(7)
    u = _direction(np.random.default_rng(8))
    update = {k: (model[k] + 1e6 * u[k]).astype(np.float32) for k in model}
    got, _ = train_round(strategy, 1, model, [update], [100])
    assert got is not None
    moved = flat(got) - flat(model)
    along = float(moved @ flat(u))
    sigma = z * clip / 1
    # float32: the update's own representation error (1e6 · 2^-24 ≈ 0.06 per coordinate on
    # the sent model) is scaled down with it by the clipping (C / 1e6), so negligible here.
    assert along == pytest.approx(clip, abs=5 * sigma)


# ------------------------------------------------------------------ what the noise protects


#: Each case: strategy, the sites' update norms along one direction u (in units of C), their
#: numbers of patients, the site whose update becomes zero (it sends back the model it
#: received) in the neighbouring federation, and how many sites the round was sent to (the
#: others dropped out). The pre-noise change along u, by hand, with n the updates averaged:
#:   fedavg, equal weights [C, C]:       C/2 -> 0: change C/2;
#:   fedprox, equal weights [C, C, C]:   C -> 2C/3: change C/3;
#:   fedavg, weights 99:1 [C, 0]:        the large hospital goes: C/2 -> 0, change C/2
#:                                       (weighted by patients it was 0.99 C);
#:   fedavg, weights 99:1 [0, C]:        the small one goes: change C/2;
#:   fedavg, [5C, 5C] beyond the clip:   each clipped to C: change C/2;
#:   fedavg, [C, C, C] of 4 sites sent:  one dropped out, n = 3: change C/3.
SENSITIVITY_CASES = [
    pytest.param("fedavg", [1.0, 1.0], [50, 50], 0, 2, id="fedavg-equal-weights"),
    pytest.param("fedprox", [1.0, 1.0, 1.0], [7, 7, 7], 2, 3, id="fedprox-equal-weights"),
    pytest.param("fedavg", [1.0, 0.0], [99, 1], 0, 2, id="fedavg-99-to-1-large-changes"),
    pytest.param("fedavg", [0.0, 1.0], [99, 1], 1, 2, id="fedavg-99-to-1-small-changes"),
    pytest.param("fedavg", [5.0, 5.0], [3, 1], 0, 2, id="fedavg-beyond-the-clip"),
    pytest.param("fedavg", [1.0, 1.0, 1.0], [1, 2, 3], 1, 4, id="fedavg-a-drop-out"),
]


@pytest.mark.parametrize("name, norms, weights, changed, connected", SENSITIVITY_CASES)
def test_one_hospital_moves_the_aggregate_by_at_most_clip_over_the_n_averaged(
    name: str, norms: list[float], weights: list[int], changed: int, connected: int
) -> None:
    """The noise std z·C/n gives each hospital noise multiplier z only if one hospital's
    data moves the pre-noise aggregate by at most C/n, n the updates averaged (McMahan et
    al. 2018: the sensitivity of a mean of n clipped updates). Two federations differing in
    one hospital's update (replaced by a zero update), the same noise drawn in both
    (generators of the same seed): their difference is the pre-noise one. Every case here
    attains the bound, so a mean over the sites sent to, or weighted by patients, fails."""
    clip, n = 1.0, len(norms)
    cfg = _cfg(name, hospital_dp_noise=1.0, hospital_dp_clip=clip)
    model = _model(9)
    u = _direction(np.random.default_rng(10))
    results = []
    for neighbour in (False, True):
        sent = [0.0 if neighbour and i == changed else s for i, s in enumerate(norms)]
        updates = [{k: (model[k] + s * u[k]).astype(np.float32) for k in model} for s in sent]
        strategy = _built(cfg, n_sites=connected, seed=31)  # the same noise in both
        got, _ = train_round(strategy, 1, model, updates, weights, connected=connected)
        assert got is not None
        assert strategy.last_round is not None and strategy.last_round.n == n
        results.append(flat(got))
    change = float(np.linalg.norm(results[0] - results[1]))
    # float32: each result rounds by ≤ U32 |x| per coordinate (|x| ≲ 3 here: the model's
    # 0.1 plus noise of σ ≤ 0.5) on N coordinates: 2 · 3 U32 √N ≈ 5e-5 for both; 1.4e-4 of
    # slack on the bound.
    slack = 2 * 4 * 2 * U32 * np.sqrt(N_COORDS)
    assert change <= clip / n + slack, (change, clip / n)
    assert change == pytest.approx(clip / n, abs=slack)  # attained: the bound is C/n, not less


def test_a_round_with_a_drop_out_is_noised_for_the_sites_it_averaged() -> None:
    """Four sites sent the round, three answered: the mean of three clipped updates, noised
    with std z·C/3 (the mean of 3 moves by up to C/3 per hospital), not z·C/4."""
    z, clip, n_sites = 1.0, 1.0, 4
    cfg = _cfg("fedavg", hospital_dp_noise=z, hospital_dp_clip=clip)
    strategy = _built(cfg, n_sites=n_sites, seed=43)
    model = _model(11)
    updates = _site_models(model, [2.0, 0.5, 4.0], seed=12)  # the 4th site dropped out
    got, _ = train_round(strategy, 1, model, updates, [5, 1, 2], connected=n_sites)
    assert got is not None
    expected = _uniform_mean_of_clipped(model, updates, clip)
    _assert_gaussian(flat(got) - flat(expected), sigma=z * clip / len(updates))
    assert strategy.last_round == HospitalDPRound(1, n=3, clipped=2, std=z * clip / 3)


def test_a_site_sending_back_the_model_it_received_does_not_stop_the_round(
    tmp_path: Path,
) -> None:
    """Through the ServerApp's guard: an unchanged model (a zero update) is a valid update
    of norm 0; clipping leaves it as it is, and the round averages it with the others."""
    cfg = _cfg("fedavg", hospital_dp_noise=0.5, hospital_dp_clip=1.0, min_sites=2)
    dp = _built(cfg, n_sites=2, seed=44)
    guard = GuardedStrategy(dp, cfg=cfg, run_dir=tmp_path, run_id="dp-run")
    model = _model(13)
    messages = send(guard, 1, model, 2)
    moved = _site_models(model, [0.5], seed=14)[0]
    replies = [
        reply(messages[0], model, 10, 0.3, packed=True),  # the model back, unchanged
        reply(messages[1], moved, 30, 0.3, packed=True),
    ]
    got, _ = guard.aggregate_train(1, replies)
    assert got is not None
    expected = _uniform_mean_of_clipped(model, [model, moved], 1.0)
    _assert_gaussian(flat(to_numpy(got)) - flat(expected), sigma=0.5 * 1.0 / 2)
    assert dp.last_round == HospitalDPRound(1, n=2, clipped=0, std=0.25)


# ------------------------------------------------------------------ the round's form


def test_error_replies_are_not_averaged_and_no_valid_reply_releases_nothing() -> None:
    cfg = _cfg("fedavg", hospital_dp_noise=1.0, hospital_dp_clip=1.0)
    strategy = _built(cfg, n_sites=3, seed=45)
    model = _model(15)
    messages = send(strategy, 1, model, 3)
    refusal = Error(code=keys.ERR_BUDGET, reason="site-101: budget spent")
    moved = _site_models(model, [0.3], seed=16)[0]
    replies = [
        reply(messages[0], moved, 10, 0.4, packed=True),
        *(Message(refusal, reply_to=m) for m in messages[1:]),
    ]
    got, _ = strategy.aggregate_train(1, replies)
    assert got is not None
    _assert_gaussian(flat(to_numpy(got)) - flat(moved), sigma=1.0)  # n = 1: σ = z C
    assert strategy.last_round is not None and strategy.last_round.n == 1
    messages = send(strategy, 2, model, 2)
    only_errors = [Message(refusal, reply_to=m) for m in messages]
    assert strategy.aggregate_train(2, only_errors) == (None, None)
    assert strategy.last_round.server_round == 1  # nothing released in round 2


@pytest.mark.parametrize("packed", [True, False])
def test_the_release_has_the_sent_model_s_form_dtypes_and_names(packed: bool) -> None:
    """A round sent packed (the ServerApp's form) comes back packed in the same layout; one
    sent as plain named arrays comes back plain; every tensor keeps its dtype."""
    model: dict[str, Any] = {
        "w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "scale": np.array([0.5, 2.0], np.float64),
        "b": np.zeros(3, np.float32),
    }
    strategy = HospitalDP(
        FedAvg(), noise_multiplier=0.1, clipping_norm=1.0, rng=np.random.default_rng(46)
    )
    messages = send(strategy, 1, model, 2, packed=packed)
    updates = [
        {k: v + np.asarray(0.01 * (i + 1), v.dtype) for k, v in model.items()} for i in (0, 1)
    ]
    replies = [reply(m, u, 5, 0.2, packed=packed) for m, u in zip(messages, updates, strict=True)]
    got, _ = strategy.aggregate_train(1, replies)
    assert got is not None
    sent = messages[0].content[keys.REC_ARRAYS]
    assert list(got) == list(sent)  # the same array names, in the same order
    assert all(is_packed(name) == packed for name in got)
    assert {k: v.dtype for k, v in to_numpy(got).items()} == {k: v.dtype for k, v in model.items()}


def test_the_metrics_are_the_wrapped_strategy_s() -> None:
    """The training metrics are FedAvg's own (weighted by patients); only the model is the
    wrapper's."""
    strategy = HospitalDP(FedProx(proximal_mu=0.1), noise_multiplier=1.0, clipping_norm=1.0)
    model = _model(17)
    updates = _site_models(model, [0.2, 0.4], seed=18)
    _, metrics = train_round(strategy, 1, model, updates, [1, 3], losses=[0.2, 0.8])
    assert isinstance(metrics, MetricRecord)
    assert metrics[keys.M_TRAIN_LOSS] == pytest.approx((0.2 * 1 + 0.8 * 3) / 4)


def test_aggregating_a_round_that_was_not_configured_is_an_error() -> None:
    strategy = HospitalDP(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(RuntimeError, match="configure_train must come first"):
        strategy.aggregate_train(1, [])


# ------------------------------------------------------------------ where the noise comes from


def _one_round(strategy: Strategy) -> np.ndarray:
    model = _model(19)
    got, _ = train_round(strategy, 1, model, _site_models(model, [0.5, 2.0], seed=20), [1, 1])
    assert got is not None
    return flat(got)


def test_the_noise_comes_from_the_injected_generator() -> None:
    """Generators of the same seed give the same release, bit for bit; another seed another
    one; numpy's global generator is neither used nor moved."""

    def wrapper(seed: int) -> HospitalDP:
        return HospitalDP(
            FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, rng=np.random.default_rng(seed)
        )

    state = np.random.get_state()
    first, again, other = (_one_round(wrapper(s)) for s in (50, 50, 51))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


def test_the_noise_is_never_seeded_from_the_run_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise the centre's run config (``seed``, ...) could regenerate could be subtracted:
    the wrapper build_strategy makes draws from a generator seeded by OS entropy
    (``default_rng()`` without a seed), so two runs of one config, even with numpy's global
    generator seeded alike, are noised differently."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    real = np.random.default_rng

    def spy(*args: Any, **kwargs: Any) -> np.random.Generator:
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(np.random, "default_rng", spy)
    cfg = _cfg("fedavg", hospital_dp_noise=1.0, hospital_dp_clip=1.0, seed=1234)
    releases = []
    state = np.random.get_state()
    try:
        for _ in range(2):
            np.random.seed(1234)
            calls.clear()
            strategy = build_strategy(cfg, n_sites=2)
            assert calls == [((), {})]  # one generator, from OS entropy
            releases.append(_one_round(strategy))
    finally:
        np.random.set_state(state)
    assert not np.allclose(releases[0], releases[1])
