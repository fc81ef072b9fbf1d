"""Every aggregation strategy fedcare offers, built from a run config and driven as the
ServerApp drives it, against numpy references written from each algorithm's definition.

``build_strategy`` hands back one of Flower's Message-API strategies; the ServerApp's guard
calls its ``configure_train`` and ``aggregate_train`` with real ``Message`` replies. The
references (``_strategy_harness.py``) compute the same round in float64 from the papers:
FedAvg's weighted mean (FedProx aggregates the same way; it changes the sites' objective),
FedAdam's and FedYogi's server step from the global model, the coordinate-wise median, the
β-trimmed mean and Krum's choice. Tolerances are float rounding bounds, derived where used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import unpack
from fedcare.server.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from fedcare.server.guard import GuardedStrategy
from fedcare.server.hospital_dp import HospitalDP
from fedcare.server.krum import Krum as FedcareKrum
from fedcare.server.strategies import (
    available_strategies,
    build_strategy,
    inner_strategy,
    optimizer_state,
    restore_optimizer_state,
)
from tests._flower import task_identity
from tests.server._strategy_harness import (
    BETA_1,
    BETA_2,
    STRATEGIES,
    TAU,
    U32,
    U64,
    config,
    coordinate_median,
    fedadam_step,
    fedyogi_step,
    krum_choice,
    send,
    train_round,
    trimmed_mean,
    weighted_mean,
)

#: Both forms a strategy may see: the ServerApp's packed model, and plain named arrays.
WIRE = pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])

#: Settings that differ from every default, so a setting that does not reach the strategy
#: shows.
SETTINGS = {
    "proximal_mu": 0.3,
    "server_learning_rate": 0.05,
    "trim_beta": 0.25,
    "krum_malicious": 1,
}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _cfg(strategy: str, **more: object) -> FederationConfig:
    return config(strategy=strategy, **{"min_sites": 1, **SETTINGS, **more})


def _model(rng: np.random.Generator, dtype: type = np.float64) -> dict[str, np.ndarray]:
    return {
        "w": rng.normal(size=(3, 4)).astype(dtype),
        "b": rng.normal(size=(4,)).astype(dtype),
    }


def _sites(
    model: dict[str, np.ndarray], n: int, seed: int, dtype: type = np.float64
) -> list[dict[str, np.ndarray]]:
    """``n`` site models near ``model`` (different updates per site)."""
    rng = np.random.default_rng(seed)
    return [
        {k: (v + rng.normal(scale=0.3, size=v.shape)).astype(dtype) for k, v in model.items()}
        for _ in range(n)
    ]


def _scale(*groups: list[dict[str, np.ndarray]] | dict[str, np.ndarray]) -> float:
    """The largest magnitude among the arrays (the scale rounding errors are relative to)."""
    items = [g for group in groups for g in (group if isinstance(group, list) else [group])]
    return max(float(np.max(np.abs(a))) for m in items for a in m.values())


def _assert_close(
    got: dict[str, np.ndarray] | None, expected: dict[str, np.ndarray], atol: float
) -> None:
    assert got is not None
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=atol, err_msg=k)


def _mean_atol(n: int, scale: float, u: float) -> float:
    """A weighted mean of n arrays as Flower computes it (x_i · w_i/W, summed): each of the n
    products and n - 1 sums rounds once, relative error u each, on terms whose absolute sum
    is at most ``scale`` (the weights sum to 1): at most (2n + 1) u scale with the division."""
    return (2 * n + 1) * u * scale


# ------------------------------------------------------------------ build_strategy


@pytest.mark.parametrize("n_sites", [0, -2])
def test_a_federation_without_sites_is_a_config_error(n_sites: int) -> None:
    with pytest.raises(ConfigError, match="at least one site"):
        build_strategy(_cfg("fedavg"), n_sites=n_sites)


@pytest.mark.parametrize(
    "min_sites, n_sites, quorum",
    [(2, 5, 2), (5, 3, 3), (1, 1, 1), (3, 3, 3), (4, 1, 1)],
)
def test_the_quorum_is_min_sites_but_never_more_than_the_sites_there_are(
    min_sites: int, n_sites: int, quorum: int
) -> None:
    for name in STRATEGIES:
        strategy = build_strategy(_cfg(name, min_sites=min_sites), n_sites=n_sites)
        assert isinstance(strategy, FedAvg), name  # every one of Flower's derives from it
        got = (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes)
        assert got == (quorum, quorum, quorum), name
        assert (strategy.fraction_train, strategy.fraction_evaluate) == (1.0, 1.0), name


#: Each name's Flower class and the run settings it must carry (values from SETTINGS).
EXPECTED = {
    "fedavg": (FedAvg, {}),
    "fedprox": (FedProx, {"proximal_mu": 0.3}),
    "fedadam": (FedAdam, {"eta": 0.05, "beta_1": BETA_1, "beta_2": BETA_2, "tau": TAU}),
    "fedyogi": (FedYogi, {"eta": 0.05, "beta_1": BETA_1, "beta_2": BETA_2, "tau": TAU}),
    "fedmedian": (FedMedian, {}),
    "fedtrimmedavg": (FedTrimmedAvg, {"beta": 0.25}),
    # fedcare's Krum: Flower's, with float64 distances (server/krum.py)
    "krum": (FedcareKrum, {"num_malicious_nodes": 1, "num_nodes_to_select": 1}),
}


def test_fedcare_registers_flower_s_seven_strategies() -> None:
    assert set(STRATEGIES) <= set(available_strategies())  # plug-ins may add more


def test_an_unregistered_strategy_is_a_config_error_naming_those_there_are() -> None:
    with pytest.raises(ConfigError) as info:
        build_strategy(_cfg("fedsomething"), n_sites=2)
    message = str(info.value)
    assert "'fedsomething'" in message
    assert all(name in message for name in STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_name_builds_flower_s_strategy_with_the_run_s_settings(name: str) -> None:
    cls, attributes = EXPECTED[name]
    strategy = build_strategy(_cfg(name), n_sites=3)
    assert type(strategy) is cls
    assert {a: getattr(strategy, a) for a in attributes} == attributes
    assert strategy.weighted_by_key == keys.M_NUM_EXAMPLES
    assert (strategy.arrayrecord_key, strategy.configrecord_key) == (
        keys.REC_ARRAYS,
        keys.REC_CONFIG,
    )


# ------------------------------------------------------------------ aggregation vs numpy


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
@WIRE
def test_fedavg_and_fedprox_aggregate_the_patient_weighted_mean(name: str, packed: bool) -> None:
    rng = np.random.default_rng(1)
    model = _model(rng)
    updates = _sites(model, 3, seed=2)
    weights, losses = [10, 30, 7], [0.9, 0.4, 0.2]
    strategy = build_strategy(_cfg(name), n_sites=3)
    got, metrics = train_round(strategy, 1, model, updates, weights, losses=losses, packed=packed)
    _assert_close(got, weighted_mean(updates, weights), _mean_atol(3, _scale(updates), U64))
    assert metrics is not None
    expected_loss = np.average(losses, weights=weights)  # (9 + 12 + 1.4) / 47
    assert metrics[keys.M_TRAIN_LOSS] == pytest.approx(expected_loss, rel=8 * U64)


@WIRE
def test_fedavg_of_float32_models_is_the_weighted_mean_within_float32_rounding(
    packed: bool,
) -> None:
    """Sites send float32 models; Flower averages them in float32."""
    rng = np.random.default_rng(4)
    model = _model(rng, np.float32)
    updates = _sites(model, 4, seed=5, dtype=np.float32)
    weights = [1, 1000, 37, 250]
    strategy = build_strategy(_cfg("fedavg"), n_sites=4)
    got, _ = train_round(strategy, 1, model, updates, weights, packed=packed)
    _assert_close(got, weighted_mean(updates, weights), _mean_atol(4, _scale(updates), U32))


def test_fedprox_sends_its_proximal_mu_to_every_site() -> None:
    strategy = build_strategy(_cfg("fedprox", proximal_mu=0.125), n_sites=3)
    messages = send(strategy, 4, _model(np.random.default_rng(0)), 3)
    assert len(messages) == 3
    for message in messages:
        sent = message.content.config_records[keys.REC_CONFIG]
        assert sent[keys.CFG_PROXIMAL_MU] == 0.125


def _adam_atol(n: int, scale: float, eta: float) -> float:
    """The server step's one ill-conditioned operation is the division by √v + τ ≥ τ: it
    amplifies the rounding of Δ = aggregate - x (at most (2n + 3) u S, the mean's bound plus
    the subtraction) by at most 1/τ; the moment recursions add a few roundings more (×4).
    The model itself rounds once more (u S)."""
    return eta / TAU * 4 * (2 * n + 3) * U64 * scale + U64 * scale


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
@WIRE
def test_fedadam_and_fedyogi_step_from_the_global_model_with_their_moments(
    name: str, packed: bool
) -> None:
    """Two rounds: the second step uses the first round's moments and the new global model."""
    cfg = _cfg(name)
    eta = cfg.server_learning_rate
    strategy = build_strategy(cfg, n_sites=3)
    rng = np.random.default_rng(7)
    x = _model(rng)
    m = v = None
    for t, weights in ((1, [5, 20, 11]), (2, [8, 3, 13])):
        updates = _sites(x, 3, seed=10 + t)
        aggregate = weighted_mean(updates, weights)
        if name == "fedadam":
            expected, m, v = fedadam_step(x, aggregate, m, v, t=t, eta=eta)
        else:
            expected, m, v = fedyogi_step(x, aggregate, m, v, eta=eta)
        got, _ = train_round(strategy, t, x, updates, weights, packed=packed)
        scale = _scale(updates, x)
        _assert_close(got, expected, _adam_atol(3, scale, eta))
        inner = inner_strategy(strategy)
        moment_atol = 8 * (2 * 3 + 3) * U64 * max(scale, scale**2)
        _assert_close(unpack(inner.m_t), m, moment_atol)  # type: ignore[attr-defined]
        _assert_close(unpack(inner.v_t), v, moment_atol)  # type: ignore[attr-defined]
        # The global model of the next round is the reference's (as the guard hands it on).
        assert got is not None
        x = expected


def test_fedadam_s_step_counts_the_round_it_is_given() -> None:
    """The guard passes the absolute round (a resumed run keeps counting); FedAdam's bias
    correction reads it: round 1 and round 6 from the same state take different steps."""
    rng = np.random.default_rng(8)
    x = _model(rng)
    updates = _sites(x, 2, seed=9)
    cfg = _cfg("fedadam")
    got = {}
    for t in (1, 6):
        got[t], _ = train_round(build_strategy(cfg, n_sites=2), t, x, updates, [1, 1])
        expected, _, _ = fedadam_step(
            x, weighted_mean(updates, [1, 1]), None, None, t=t, eta=cfg.server_learning_rate
        )
        _assert_close(got[t], expected, _adam_atol(2, _scale(updates, x), cfg.server_learning_rate))
    assert not np.allclose(got[1]["w"], got[6]["w"])  # type: ignore[index]


@pytest.mark.parametrize("n", [5, 4])
@WIRE
def test_fedmedian_is_the_coordinate_wise_median_whatever_the_weights(n: int, packed: bool) -> None:
    rng = np.random.default_rng(20 + n)
    model = _model(rng)
    updates = _sites(model, n, seed=30 + n)
    updates[0] = {k: v + 1e3 for k, v in updates[0].items()}  # one site far off
    weights = [10_000, *range(1, n)]  # the far site holds nearly all patients
    strategy = build_strategy(_cfg("fedmedian"), n_sites=n)
    got, _ = train_round(strategy, 1, model, updates, weights, packed=packed)
    expected = coordinate_median(updates)
    # The median is one of the values (n odd) or the mean of two: at most one rounding.
    _assert_close(got, expected, 2 * U64 * _scale(updates))
    if n % 2:  # hand-checked: the middle one of five values
        col = sorted(float(u["b"][0]) for u in updates)
        assert got is not None and got["b"][0] == col[2]


@pytest.mark.parametrize("n, beta, cut", [(5, 0.25, 1), (10, 0.3, 3), (4, 0.2, 0)])
@WIRE
def test_fedtrimmedavg_is_the_beta_trimmed_mean(
    n: int, beta: float, cut: int, packed: bool
) -> None:
    """⌊β n⌋ values cut at each end (hand-computed ``cut``), the rest averaged unweighted."""
    assert int(np.floor(beta * n)) == cut
    rng = np.random.default_rng(40 + n)
    model = _model(rng)
    updates = _sites(model, n, seed=50 + n)
    for i in range(cut):  # outliers at both ends, as many as are cut
        updates[i] = {k: v + 1e3 * (-1) ** i for k, v in updates[i].items()}
    weights = [1000 * (i + 1) for i in range(n)]
    strategy = build_strategy(_cfg("fedtrimmedavg", trim_beta=beta), n_sites=n)
    got, _ = train_round(strategy, 1, model, updates, weights, packed=packed)
    expected = trimmed_mean(updates, beta)
    if cut:  # the outliers (±1000) are among the cut values: none reaches the mean
        assert all(float(np.max(np.abs(e))) < 1e2 for e in expected.values())
    _assert_close(got, expected, _mean_atol(n, _scale(updates), U64))


#: Five sites along one direction u, at these distances from the global model: Krum scores
#: (sum of the squared distances to the n - f - 2 nearest others), by hand:
#:   f = 0 (3 nearest): 0 -> 1+4.84+12.25 = 18.09, 1 -> 1+1.44+6.25 = 8.69,
#:                      2.2 -> 1.44+1.69+4.84 = 7.97, 3.5 -> 20.19, 20 -> 1 000+: picks 2.2;
#:   f = 1 (2 nearest): 0 -> 5.84, 1 -> 2.44, 2.2 -> 3.13, 3.5 -> 7.94, 20 -> 548: picks 1.
KRUM_OFFSETS = (0.0, 1.0, 2.2, 3.5, 20.0)


@WIRE
@pytest.mark.parametrize("f, chosen", [(0, 2.2), (1, 1.0)])
def test_krum_selects_the_update_nearest_its_n_minus_f_minus_2_neighbours(
    f: int, chosen: float, packed: bool
) -> None:
    rng = np.random.default_rng(60)
    model = _model(rng)
    direction = {k: rng.normal(size=v.shape) for k, v in model.items()}
    norm = np.sqrt(sum(np.sum(d**2) for d in direction.values()))
    updates = [{k: model[k] + s * direction[k] / norm for k in model} for s in KRUM_OFFSETS]
    weights = [50, 1, 1, 1, 1000]  # Krum picks one update; the weights play no part
    assert KRUM_OFFSETS[krum_choice(updates, f)] == chosen  # the reference agrees by hand
    strategy = build_strategy(_cfg("krum", krum_malicious=f), n_sites=5)
    got, metrics = train_round(
        strategy, 1, model, updates, weights, losses=[0.1, 0.2, 0.3, 0.4, 0.5], packed=packed
    )
    expected = updates[KRUM_OFFSETS.index(chosen)]
    _assert_close(got, expected, U64 * _scale(updates))  # the chosen update, as sent
    assert metrics is not None  # ... and that site's numbers
    assert metrics[keys.M_TRAIN_LOSS] == pytest.approx(0.1 * (1 + KRUM_OFFSETS.index(chosen)))


def test_krum_s_choice_does_not_depend_on_the_global_model_the_updates_are_added_to() -> None:
    """Krum's scores are distances between models: adding the same global model to every
    update changes none of them. Float32 models of 100 000 weights of size ~0.1 (norm ~30),
    updates of norm 1e-4..2e-3 (late rounds, small learning rates). Flower 1.42's own Krum
    (|x|^2 + |y|^2 - 2 x.y in float32) picked the outlier here; fedcare's (server/krum.py)
    sums squared differences in float64."""
    rng = np.random.default_rng(0)
    d = 100_000
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    offsets = [1e-4 * s for s in KRUM_OFFSETS]
    strategy = build_strategy(_cfg("krum", krum_malicious=1), n_sites=5)
    picks = {}
    for label, base in (("at zero", np.zeros(d)), ("on a model", rng.normal(0, 0.1, d))):
        model = {"w": base.astype(np.float32)}
        updates = [{"w": (base + s * direction).astype(np.float32)} for s in offsets]
        got, _ = train_round(strategy, 1, model, updates, [1] * 5)
        assert got is not None
        picks[label] = int(np.argmin([np.max(np.abs(got["w"] - u["w"])) for u in updates]))
    assert picks["at zero"] == KRUM_OFFSETS.index(1.0)  # as by hand above (f = 1)
    assert picks["on a model"] == picks["at zero"], "Krum picked another site"


# ------------------------------------------------------------------ inner_strategy


def test_inner_strategy_looks_through_the_guard_and_the_dp_wrapper(tmp_path: Path) -> None:
    strategy = build_strategy(_cfg("fedprox", hospital_dp_noise=1.0, proximal_mu=0.1), n_sites=2)
    assert isinstance(strategy, HospitalDP)
    guard = GuardedStrategy(strategy, cfg=_cfg("fedprox"), run_dir=tmp_path, run_id="r")
    assert inner_strategy(guard) is strategy.strategy
    assert type(inner_strategy(guard)) is FedProx
    plain = build_strategy(_cfg("krum"), n_sites=4)
    assert inner_strategy(plain) is plain


def test_inner_strategy_of_a_wrapper_that_wraps_itself_ends() -> None:
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=1
    )
    wrapper.strategy = wrapper
    assert inner_strategy(wrapper) is wrapper


# ------------------------------------------------------------------ optimizer state


@pytest.mark.parametrize(
    "name, noise",
    [(n, 0.0) for n in ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum")]
    + [("fedavg", 1.0), ("fedprox", 1.0)],  # hospital-level DP takes only the mean strategies
)
def test_stateless_strategies_keep_no_optimizer_state(name: str, noise: float) -> None:
    strategy = build_strategy(_cfg(name, hospital_dp_noise=noise), n_sites=2)
    assert optimizer_state(strategy) is None


@pytest.mark.parametrize("name, cls", [("fedadam", "FedAdam"), ("fedyogi", "FedYogi")])
def test_optimizer_state_is_a_copy_taken_once_the_moments_exist(name: str, cls: str) -> None:
    strategy = build_strategy(_cfg(name), n_sites=2)
    before = optimizer_state(strategy)
    assert before is not None and before.strategy == cls and before.moments == {}
    x = _model(np.random.default_rng(70))
    train_round(strategy, 1, x, _sites(x, 2, seed=71), [3, 4])
    state = optimizer_state(strategy)
    assert state is not None and set(state.moments) == {"m_t", "v_t"}
    inner = inner_strategy(strategy)
    for moment in ("m_t", "v_t"):
        live = unpack(getattr(inner, moment))  # views of the strategy's own (packed) arrays
        assert live.keys() == state.moments[moment].keys() == x.keys()  # by tensor name
        for k, value in live.items():
            np.testing.assert_array_equal(state.moments[moment][k], value)
            value += 1.0  # the strategy goes on; the checkpointed copy must not move
            assert not np.array_equal(state.moments[moment][k], value)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_moments_saved_and_restored_take_the_step_the_original_takes(
    name: str, tmp_path: Path
) -> None:
    """Round 1 by one strategy, its state through a checkpoint file into a freshly built
    one; round 2 from both must agree exactly (the same operations on the same numbers), and
    differ from a fresh strategy's round 2 (the moments matter)."""
    cfg = _cfg(name)
    x = _model(np.random.default_rng(80))
    original = build_strategy(cfg, n_sites=2)
    x1, _ = train_round(original, 1, x, _sites(x, 2, seed=81), [3, 4])
    assert x1 is not None
    save_checkpoint(tmp_path, Checkpoint("run", 1, x1, optimizer=optimizer_state(original)))
    saved = load_checkpoint(tmp_path)
    assert saved is not None
    restored, fresh = build_strategy(cfg, n_sites=2), build_strategy(cfg, n_sites=2)
    note = restore_optimizer_state(restored, saved, model=x1, path=tmp_path / CHECKPOINT_NAME)
    assert note is None
    updates = _sites(x1, 2, seed=82)
    steps = {}
    for label, strategy in (("original", original), ("restored", restored), ("fresh", fresh)):
        steps[label], _ = train_round(strategy, 2, x1, updates, [5, 1])
    for k in x1:
        np.testing.assert_array_equal(steps["restored"][k], steps["original"][k])  # type: ignore[index]
    assert any(not np.allclose(steps["fresh"][k], steps["original"][k]) for k in x1)  # type: ignore[index]


def test_a_server_optimizer_is_refused_with_hospital_dp() -> None:
    """A server optimizer's step moves by more than C / n per hospital: no calibrated noise."""
    with pytest.raises(ConfigError, match="fedadam"):
        build_strategy(_cfg("fedadam", hospital_dp_noise=0.5), n_sites=2)
