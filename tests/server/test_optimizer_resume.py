"""The server optimizer's state survives a resume (FedAdam, FedYogi, FedAdagrad).

A run is driven through :class:`~fedcare.server.guard.GuardedStrategy` and Flower's own
``Strategy.start`` loop by a grid whose two sites answer deterministically (each update is a
fixed function of the model received, the absolute round and the site). A run interrupted
after round 2 and resumed from its checkpoint must end with the model an uninterrupted run
reaches, and that model must be the one an independent numpy FedAdam computes; a resume that
forgets the moments must not (the comparison is sensitive). Old checkpoints without optimizer
state still resume (fresh moments, said once), and a state that does not fit the model is one
:class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedYogi,
    Strategy,
)
from flwr.supercore.task_identity import TaskIdentity

import fedcare.server.checkpoint as checkpoint_module
from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record, unpack
from fedcare.server.app import FINAL_MODEL_NAME, RECORD_NAME, run_federation
from fedcare.server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    OptimizerState,
    load_checkpoint,
    save_checkpoint,
)
from fedcare.server.guard import GuardedStrategy, arrays_to_numpy
from fedcare.server.strategies import (
    OPTIMIZER_MOMENTS,
    inner_strategy,
    optimizer_state,
    restore_optimizer_state,
)
from tests._flower import task_identity

#: The two sites: node id -> number of training examples (FedAvg's weights).
NODES = {11: 10, 12: 30}
ETA = 0.05
BETA_1, BETA_2, TAU = 0.9, 0.99, 1e-3
ROUNDS, CUT = 4, 2
RUN_ID = "adam-run"


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }


def _site_update(x: np.ndarray, rnd: int, node: int) -> np.ndarray:
    """What site ``node`` sends back in round ``rnd`` for the global array ``x``: float32, as
    a real site's model is, whatever dtype the server sent."""
    step = 0.1 * np.cos(7.0 * x + 1.3 * rnd + node) + 0.02 * (node - 11.5) * rnd
    return (x + step).astype(np.float32)


class _ServerCrash(RuntimeError):
    """The server dies while a round is under way."""


class _Sites:
    """Just enough of a Grid: two sites answering training deterministically.

    Evaluation messages get no reply (the guard records an empty evaluation). With
    ``crash_at``, the server "dies" when it sends that (absolute) round's training.
    """

    pull_interval = 0.0  # like Flower's InMemoryGrid: fedcare.server.grid.prompt keeps it as is

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.rounds_sent: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            if message.metadata.message_type != "train":
                continue
            content = message.content
            rnd = content.config_records[keys.REC_CONFIG][keys.CFG_FEDCARE_ROUND]
            assert isinstance(rnd, int)
            if rnd == self.crash_at:
                raise _ServerCrash(f"the server died in round {rnd}")
            self.rounds_sent.append(rnd)
            node = message.metadata.dst_node_id
            received = arrays_to_numpy(content.array_records[keys.REC_ARRAYS])
            update = {k: _site_update(v, rnd, node) for k, v in received.items()}
            TaskIdentity.node_id = node
            replies.append(
                Message(
                    RecordDict(
                        {
                            keys.REC_ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}),
                            keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: NODES[node]}),
                            keys.REC_SITE: ConfigRecord(
                                {keys.S_SITE_ID: f"site-{node}", keys.S_DP: False}
                            ),
                        }
                    ),
                    reply_to=message,
                )
            )
            TaskIdentity.node_id = 1  # the server's side again
        return replies


def _common() -> dict[str, Any]:
    return {"min_train_nodes": 2, "min_evaluate_nodes": 2, "min_available_nodes": 2}


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedadam": lambda: FedAdam(eta=ETA, beta_1=BETA_1, beta_2=BETA_2, tau=TAU, **_common()),
    "fedyogi": lambda: FedYogi(eta=ETA, **_common()),
    "fedadagrad": lambda: FedAdagrad(eta=ETA, **_common()),
    # Hospital-level DP wraps the optimizer; noise 0 keeps the runs comparable.
    "dp-fedadam": lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAdam(eta=ETA, beta_1=BETA_1, beta_2=BETA_2, tau=TAU, **_common()),
        noise_multiplier=0.0,
        clipping_norm=1e6,
        num_sampled_clients=len(NODES),
    ),
}


def _cfg() -> FederationConfig:
    return FederationConfig.from_run_config(
        {"min-sites": 2, "num-server-rounds": ROUNDS, "round-timeout": 5, "strategy": "fedadam"}
    )


def _run(
    strategy: Strategy,
    run_dir: Path,
    *,
    start: dict[str, np.ndarray],
    rounds: int,
    offset: int = 0,
    grid: _Sites | None = None,
) -> dict[str, np.ndarray]:
    """Rounds ``offset + 1 .. offset + rounds`` through the guard; the final global model."""
    guard = GuardedStrategy(
        strategy, cfg=_cfg(), run_dir=run_dir, run_id=RUN_ID, round_offset=offset
    )
    result = guard.start(
        grid=grid or _Sites(),  # type: ignore[arg-type]
        initial_arrays=pack_record(start),  # as fedcare's ServerApp sends it
        num_rounds=rounds,
        timeout=5,
        evaluate_fn=guard.after_round,
    )
    return arrays_to_numpy(result.arrays)


def _moments(strategy: Strategy) -> dict[str, dict[str, np.ndarray] | None]:
    inner = inner_strategy(strategy)
    # By tensor name: the strategy keeps them packed, as the model travels.
    return {
        name: None if getattr(inner, name) is None else unpack(getattr(inner, name))
        for name in OPTIMIZER_MOMENTS
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _reference_fedadam(rounds: int) -> list[dict[str, dict[str, np.ndarray]]]:
    """FedAdam written out in numpy (Reddi et al. 2020, Alg. 2, with the bias-corrected
    step size of Kingma & Ba that Flower uses): per round, the model and both moments."""
    x = {k: v.astype(np.float64) for k, v in _initial().items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(a) for k, a in x.items()}
    weights = np.array(list(NODES.values()), dtype=np.float64)
    history = []
    for t in range(1, rounds + 1):
        for k in x:
            updates = [_site_update(x[k], t, node) for node in NODES]
            delta = np.average(updates, axis=0, weights=weights) - x[k]
            m[k] = BETA_1 * m[k] + (1 - BETA_1) * delta
            v[k] = BETA_2 * v[k] + (1 - BETA_2) * delta**2
            step = ETA * np.sqrt(1 - BETA_2 ** (t + 1)) / (1 - BETA_1 ** (t + 1))
            x[k] = x[k] + step * m[k] / (np.sqrt(v[k]) + TAU)
        history.append({"x": dict(x), "m_t": dict(m), "v_t": dict(v)})
    return history


# ------------------------------------------------------------------ resume = no interruption


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_resumed_run_takes_the_steps_an_uninterrupted_one_takes(
    tmp_path: Path, name: str
) -> None:
    make = STRATEGIES[name]
    uninterrupted = make()
    expected = _run(uninterrupted, tmp_path / "whole", start=_initial(), rounds=ROUNDS)

    first = make()
    _run(first, tmp_path / "cut", start=_initial(), rounds=CUT)
    saved = load_checkpoint(tmp_path / "cut")
    assert saved is not None and saved.round == CUT
    assert saved.optimizer is not None
    assert saved.optimizer.strategy == type(inner_strategy(first)).__name__
    live = _moments(first)
    assert set(saved.optimizer.moments) == {n for n, m in live.items() if m}

    resumed = make()
    note = restore_optimizer_state(
        resumed, saved, model=saved.arrays, path=tmp_path / "cut" / CHECKPOINT_NAME
    )
    assert note is None
    restored = _moments(resumed)
    for moment, arrays in live.items():  # the moments the first server held when it stopped
        if arrays:
            _assert_same(restored[moment], arrays)  # type: ignore[arg-type]
        else:
            assert not restored[moment]
    got = _run(resumed, tmp_path / "cut", start=saved.arrays, rounds=ROUNDS - CUT, offset=CUT)
    _assert_same(got, expected)
    final = load_checkpoint(tmp_path / "cut")
    assert final is not None and final.round == ROUNDS
    assert final.optimizer is not None
    for moment, arrays in _moments(uninterrupted).items():
        if arrays:
            _assert_same(final.optimizer.moments[moment], arrays)

    forgetful = make()  # the old behaviour: a fresh optimizer on resume
    again = _run(forgetful, tmp_path / "forgot", start=saved.arrays, rounds=1, offset=CUT)
    one_more = _run(make(), tmp_path / "one", start=_initial(), rounds=CUT + 1)
    assert any(not np.allclose(again[k], one_more[k], rtol=1e-6, atol=1e-9) for k in again), (
        "a resume without the moments must differ, or this test proves nothing"
    )


def test_checkpointed_moments_and_model_are_those_of_an_independent_fedadam(
    tmp_path: Path,
) -> None:
    reference = _reference_fedadam(ROUNDS)
    _run(STRATEGIES["fedadam"](), tmp_path, start=_initial(), rounds=CUT)
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.optimizer is not None
    after_cut = reference[CUT - 1]
    for moment in OPTIMIZER_MOMENTS:
        for k, value in after_cut[moment].items():
            np.testing.assert_allclose(
                saved.optimizer.moments[moment][k], value, rtol=1e-4, atol=1e-8
            )
    for k, value in after_cut["x"].items():
        np.testing.assert_allclose(saved.arrays[k], value, rtol=1e-5, atol=1e-6)

    resumed = STRATEGIES["fedadam"]()
    restore_optimizer_state(resumed, saved, model=saved.arrays, path=tmp_path / CHECKPOINT_NAME)
    got = _run(resumed, tmp_path, start=saved.arrays, rounds=1, offset=CUT)  # round 3
    for k, value in reference[CUT]["x"].items():
        np.testing.assert_allclose(got[k], value, rtol=1e-5, atol=1e-6)


def test_the_wrapped_strategy_counts_absolute_rounds(tmp_path: Path) -> None:
    """FedAdam's bias correction reads the round number: after a resume it is the run's."""
    seen: list[int] = []

    class Counting(FedAdam):
        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            seen.append(server_round)
            return super().aggregate_train(server_round, replies)

    grid = _Sites()
    _run(Counting(eta=ETA, **_common()), tmp_path, start=_initial(), rounds=2, offset=5, grid=grid)
    assert seen == [6, 7]
    assert sorted(set(grid.rounds_sent)) == [6, 7]


# ------------------------------------------------------------------ what the file holds


def test_the_optimizer_state_is_written_with_the_model_in_one_file(tmp_path: Path) -> None:
    strategy = STRATEGIES["dp-fedadam"]()
    final = _run(strategy, tmp_path, start=_initial(), rounds=CUT)
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.format == checkpoint_module.CHECKPOINT_FORMAT
    _assert_same(saved.arrays, final)
    assert saved.optimizer is not None
    taken = optimizer_state(strategy)  # what the guard takes from the live (wrapped) strategy
    assert taken is not None and taken.strategy == saved.optimizer.strategy == "FedAdam"
    for moment, arrays in _moments(strategy).items():
        assert arrays
        _assert_same(saved.optimizer.moments[moment], arrays)
        _assert_same(taken.moments[moment], arrays)
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".tmp")] == [CHECKPOINT_NAME]


def test_a_crash_while_writing_leaves_the_previous_model_and_moments_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = STRATEGIES["fedadam"]()
    _run(strategy, tmp_path, start=_initial(), rounds=CUT)
    before = load_checkpoint(tmp_path)
    assert before is not None and before.optimizer is not None

    def dies_half_way(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_half_way)
    later = Checkpoint(
        RUN_ID,
        CUT + 1,
        {k: v + 1 for k, v in before.arrays.items()},
        optimizer=OptimizerState("FedAdam", {"m_t": before.arrays}),
    )
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, later)
    monkeypatch.undo()
    after = load_checkpoint(tmp_path)
    assert after is not None and after.round == CUT and after.optimizer is not None
    _assert_same(after.arrays, before.arrays)
    for moment, arrays in before.optimizer.moments.items():
        _assert_same(after.optimizer.moments[moment], arrays)


def test_a_stateless_strategy_saves_no_optimizer_state(tmp_path: Path) -> None:
    _run(FedAvg(**_common()), tmp_path, start=_initial(), rounds=1)
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.optimizer is None
    assert (
        restore_optimizer_state(
            FedAvg(**_common()), saved, model=saved.arrays, path=tmp_path / CHECKPOINT_NAME
        )
        is None
    )


# ------------------------------------------------------------------ older checkpoints


def _write_old_checkpoint(run_dir: Path, rnd: int, arrays: dict[str, np.ndarray]) -> Path:
    """A checkpoint as fedcare wrote it before it saved the optimizer's state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    payload = {
        "run_id": RUN_ID,
        "round": rnd,
        "arrays": {k: torch.from_numpy(v) for k, v in arrays.items()},
        "record": {"sites": {}, "rounds": [], "events": [], "nodes": {}},
    }
    torch.save(payload, path)
    return path


def test_an_old_checkpoint_without_optimizer_state_resumes_with_fresh_moments(
    tmp_path: Path,
) -> None:
    path = _write_old_checkpoint(tmp_path, CUT, _initial())
    old = load_checkpoint(tmp_path)
    assert old is not None and old.format == 1 and old.optimizer is None
    strategy = STRATEGIES["dp-fedadam"]()
    note = restore_optimizer_state(strategy, old, model=old.arrays, path=path)
    assert note is not None and "older fedcare" in note and "FedAdam" in note
    assert all(not m for m in _moments(strategy).values())
    got = _run(strategy, tmp_path, start=old.arrays, rounds=1, offset=CUT)
    assert all(np.isfinite(a).all() for a in got.values())
    new = load_checkpoint(tmp_path)  # the next checkpoint carries the state
    assert new is not None and new.format == 2 and new.optimizer is not None
    assert set(new.optimizer.moments) == {"m_t", "v_t"}
    assert (
        restore_optimizer_state(FedAvg(**_common()), old, model=old.arrays, path=path) is None
    )  # a stateless strategy has nothing to say


# ------------------------------------------------------------------ state that does not fit


def _saved_adam(tmp_path: Path) -> Checkpoint:
    _run(STRATEGIES["fedadam"](), tmp_path, start=_initial(), rounds=1)
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.optimizer is not None
    return saved


def _one_clear_line(error: CheckpointError, path: Path) -> str:
    message = str(error)
    assert "\n" not in message and str(path) in message and "Fix:" in message
    return message


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda m: m.pop("b"), "lacks the model's array 'b'"),
        (lambda m: m.update(extra=np.zeros(2)), "has array 'extra', which the model lacks"),
        (lambda m: m.update(w=np.zeros((4, 3))), "m_t['w'] has shape (4, 3)"),
        (lambda m: m["w"].__setitem__((0, 0), np.nan), "NaN or an infinity"),
    ],
)
def test_a_checkpoint_whose_moments_do_not_fit_its_model_is_a_checkpoint_error(
    tmp_path: Path, damage: Callable[[dict[str, np.ndarray]], object], words: str
) -> None:
    saved = _saved_adam(tmp_path)
    assert saved.optimizer is not None
    moments = {k: np.array(v) for k, v in saved.optimizer.moments["m_t"].items()}
    damage(moments)
    saved.optimizer.moments["m_t"] = moments
    path = save_checkpoint(tmp_path, saved)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = _one_clear_line(info.value, path)
    assert "optimizer state does not match its own model" in message and words in message


def test_moments_that_do_not_fit_the_run_s_model_are_a_checkpoint_error(tmp_path: Path) -> None:
    saved = _saved_adam(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    other_model = {"w": np.zeros((5, 4), np.float32), "b": np.zeros(4, np.float32)}
    strategy = STRATEGIES["fedadam"]()
    with pytest.raises(CheckpointError) as info:
        restore_optimizer_state(strategy, saved, model=other_model, path=path)
    message = _one_clear_line(info.value, path)
    assert "does not match this run's model" in message and "shape (3, 4)" in message
    assert "task and model the run was started with" in message
    assert all(not m for m in _moments(strategy).values())  # nothing half-restored


@pytest.mark.parametrize(
    "make, words",
    [
        (
            STRATEGIES["fedyogi"],
            "holds FedAdam's optimizer state, but this run's strategy is FedYogi",
        ),
        (lambda: FedAvg(**_common()), "but this run's strategy is FedAvg"),
    ],
)
def test_optimizer_state_of_another_strategy_is_a_checkpoint_error(
    tmp_path: Path, make: Callable[[], Strategy], words: str
) -> None:
    saved = _saved_adam(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    with pytest.raises(CheckpointError) as info:
        restore_optimizer_state(make(), saved, model=saved.arrays, path=path)
    message = _one_clear_line(info.value, path)
    assert words in message and "resume with the strategy the run was started with" in message


def test_a_stateless_run_resumed_with_an_optimizer_is_a_checkpoint_error(tmp_path: Path) -> None:
    _run(FedAvg(**_common()), tmp_path, start=_initial(), rounds=1)
    saved = load_checkpoint(tmp_path)
    assert saved is not None
    path = tmp_path / CHECKPOINT_NAME
    with pytest.raises(CheckpointError) as info:
        restore_optimizer_state(STRATEGIES["fedadam"](), saved, model=saved.arrays, path=path)
    assert "keeps no optimizer state, but this run's strategy is FedAdam" in _one_clear_line(
        info.value, path
    )


def test_a_checkpoint_from_a_newer_fedcare_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, Checkpoint(RUN_ID, 1, _initial()))
    payload = torch.load(path, weights_only=True)
    payload["format"] = checkpoint_module.CHECKPOINT_FORMAT + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert "written by a newer fedcare" in _one_clear_line(info.value, path)


# ------------------------------------------------------------------ the ServerApp resuming


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedcare.simulations.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("sites")
    synthesize(root, n_sites=len(NODES), seed=5, config=SynthConfig(patients_per_site=60))
    return root


def _federation(sites: Path, run_dir: Path) -> FederationConfig:
    return FederationConfig.from_run_config(
        {
            "data-root": str(sites),
            "task": "readmission",
            "strategy": "fedadam",
            "server-learning-rate": ETA,
            "num-server-rounds": ROUNDS,
            "min-sites": 2,
            "num-sites": 2,
            "run-id": RUN_ID,
            "run-dir": str(run_dir),
            "round-timeout": 5,
            "connect-timeout": 5,
            "dp": False,
        }
    )


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(run_dir / FINAL_MODEL_NAME, weights_only=True)
    return dict(saved["state_dict"])


def _crash_after_cut(sites: Path, run_dir: Path) -> None:
    with pytest.raises(_ServerCrash):
        run_federation(_Sites(crash_at=CUT + 1), _federation(sites, run_dir))  # type: ignore[arg-type]
    saved = load_checkpoint(run_dir)
    assert saved is not None and saved.round == CUT and saved.optimizer is not None


def test_the_server_app_resumes_fedadam_where_it_stopped(
    sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_federation(_Sites(), _federation(sites, tmp_path / "whole"))  # type: ignore[arg-type]
    expected = _final_model(tmp_path / "whole")

    _crash_after_cut(sites, tmp_path / "cut")
    grid = _Sites()
    record = run_federation(grid, _federation(sites, tmp_path / "cut"))  # type: ignore[arg-type]
    assert record.resumed_from == CUT and record.optimizer_reset is None
    assert sorted(set(grid.rounds_sent)) == list(range(CUT + 1, ROUNDS + 1))
    got = _final_model(tmp_path / "cut")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k

    # Control: the same resume with the moments forgotten ends elsewhere.
    _crash_after_cut(sites, tmp_path / "forgot")
    monkeypatch.setattr("fedcare.server.app.restore_optimizer_state", lambda *a, **k: None)
    run_federation(_Sites(), _federation(sites, tmp_path / "forgot"))  # type: ignore[arg-type]
    forgot = _final_model(tmp_path / "forgot")
    assert any(not torch.allclose(forgot[k], expected[k]) for k in expected)


def test_the_server_app_resumes_an_old_checkpoint_and_says_so_once(
    sites: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _crash_after_cut(sites, tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    del payload["format"], payload["optimizer"]  # as fedcare wrote it before
    torch.save(payload, path)

    caplog.set_level(logging.WARNING, logger="fedcare.server.app")
    record = run_federation(_Sites(), _federation(sites, tmp_path))  # type: ignore[arg-type]
    notes = [r for r in caplog.records if "older fedcare" in r.getMessage()]
    assert len(notes) == 1 and "FedAdam's moments start again from zero" in notes[0].getMessage()
    assert record.rounds_completed == ROUNDS
    assert record.optimizer_reset.after_round == CUT
    assert "older fedcare" in record.optimizer_reset.reason
    on_disk = json.loads((tmp_path / RECORD_NAME).read_text(encoding="utf-8"))
    assert on_disk["optimizer_reset"] == record.optimizer_reset.model_dump()
    final = load_checkpoint(tmp_path)
    assert final is not None and final.format == 2 and final.optimizer is not None


def test_fedadam_keeps_the_model_s_dtype_so_no_site_update_is_rejected(tmp_path: Path) -> None:
    """Flower's FedAdam returns float64 arrays for a float32 model (NumPy 2 promotes its
    float64 scale factor); every float32 site update of the next round was then rejected as
    the wrong dtype, and FedAdam trained one round only. The guard casts the aggregate back."""
    guard = GuardedStrategy(STRATEGIES["fedadam"](), cfg=_cfg(), run_dir=tmp_path, run_id=RUN_ID)
    result = guard.start(
        grid=_Sites(),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({k: Array(v) for k, v in _initial().items()}),
        num_rounds=ROUNDS,
        timeout=5,
        evaluate_fn=guard.after_round,
    )
    assert {v.dtype for v in arrays_to_numpy(result.arrays).values()} == {np.dtype(np.float32)}
    kinds = [e.kind for e in guard.record.events]
    assert "rejected" not in kinds and "round-skipped" not in kinds, guard.record.events
