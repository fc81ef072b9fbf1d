"""``server/app.py`` without a federation: where the schema comes from, the seeded initial
model, waiting for the sites (on a fake clock), and the run record and files a run leaves.

The last group drives ``run_federation`` in-process with a grid of two scripted sites (no
SuperLink, no ClientApp): one round of FedAvg, whose result is checked against numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.common.summary import load_summary
from fedcare.models import default_model_for
from fedcare.server import app as app_module
from fedcare.server.app import (
    FINAL_MODEL_NAME,
    RECORD_NAME,
    federation_spec,
    initial_state,
    run_federation,
)
from tests._flower import task_identity

TASK = "readmission"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedcare.simulations.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("sites")
    synthesize(root, n_sites=2, seed=5, config=SynthConfig(patients_per_site=40))
    return root


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _cfg(**values: object) -> FederationConfig:
    return FederationConfig.from_run_config(
        {"task": TASK, "dp": False, **{k.replace("_", "-"): v for k, v in values.items()}}
    )


# ------------------------------------------------------------------ federation_spec


def test_the_schema_comes_from_spec_path_then_the_manifest_then_site_0(
    sites: Path, tmp_path: Path
) -> None:
    by_path = federation_spec(_cfg(spec_path=str(sites / "site-1" / "site.toml")))
    assert by_path.site_id == "site-1"
    manifest = tmp_path / "sites.json"
    manifest.write_text(json.dumps([str(sites / "site-1"), str(sites / "site-0")]), "utf-8")
    assert federation_spec(_cfg(sites_manifest=str(manifest))).site_id == "site-1"  # its first
    assert federation_spec(_cfg(data_root=str(sites))).site_id == "site-0"
    # spec-path wins over both.
    both = _cfg(spec_path=str(sites / "site-1"), sites_manifest=str(manifest), data_root="x")
    assert federation_spec(both).site_id == "site-1"


def test_an_empty_manifest_is_a_config_error_naming_it(tmp_path: Path) -> None:
    manifest = tmp_path / "sites.json"
    manifest.write_text("[]", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{manifest} lists no site"):
        federation_spec(_cfg(sites_manifest=str(manifest)))


# ------------------------------------------------------------------ initial_state


def test_the_initial_model_is_the_task_s_default_seeded_by_the_run(sites: Path) -> None:
    spec = federation_spec(_cfg(data_root=str(sites)))
    name, first = initial_state(_cfg(seed=11), spec)
    assert name == default_model_for(spec.task(TASK).modalities)
    _, again = initial_state(_cfg(seed=11), spec)
    _, other = initial_state(_cfg(seed=12), spec)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed, same weights
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_an_unknown_task_is_a_config_error_listing_the_known_ones(sites: Path) -> None:
    spec = federation_spec(_cfg(data_root=str(sites)))
    with pytest.raises(
        ConfigError, match=r"defines no task 'no_such_task' \(defined: .*readmission"
    ):
        initial_state(_cfg(task="no_such_task"), spec)


# ------------------------------------------------------------------ waiting for the sites


class _Clock:
    """``time`` for the app module: ``sleep`` advances ``monotonic``, and calls ``tick``."""

    def __init__(self, tick: object = None) -> None:
        self.now = 1000.0
        self.slept = 0.0
        self.tick = tick

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        if callable(self.tick):
            self.tick()


class _Connected:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(100, 100 + self.n))


@pytest.mark.parametrize(
    "num_sites, min_sites, connected, expected",
    [(0, 2, 3, 3), (0, 2, 2, 2), (2, 1, 5, 2), (3, 2, 3, 3)],
)
def test_the_run_takes_num_sites_or_every_site_connected(
    monkeypatch: pytest.MonkeyPatch, num_sites: int, min_sites: int, connected: int, expected: int
) -> None:
    clock = _Clock()
    monkeypatch.setattr(app_module, "time", clock)
    cfg = _cfg(num_sites=num_sites, min_sites=min_sites)
    assert app_module._wait_for_sites(_Connected(connected), cfg) == expected  # type: ignore[arg-type]
    assert clock.slept == 0


def test_it_waits_for_sites_still_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _Connected(1)

    def one_more() -> None:
        grid.n += 1

    clock = _Clock(tick=one_more)
    monkeypatch.setattr(app_module, "time", clock)
    assert app_module._wait_for_sites(grid, _cfg(num_sites=4, min_sites=2)) == 4  # type: ignore[arg-type]
    assert grid.n == 4 and clock.slept > 0


def test_too_few_sites_within_the_connect_timeout_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(app_module, "time", clock)
    cfg = _cfg(num_sites=3, min_sites=2, connect_timeout=7.5)
    with pytest.raises(ConfigError) as info:
        app_module._wait_for_sites(_Connected(1), cfg)  # type: ignore[arg-type]
    message = str(info.value)
    assert "only 1 site(s) connected within connect-timeout=7.5 s" in message
    assert "the run needs 3" in message and "start the missing SuperNodes" in message
    assert 7.5 <= clock.slept <= 7.5 + 1.0  # gave up once the timeout had passed, no later


# ------------------------------------------------------------------ one whole round


#: node id -> (number of patients, the constant the site adds to every weight).
SITES = {11: (10, 0.5), 12: (30, -0.25)}


class _Sites:
    """Two sites answering training: each adds its constant to every weight it received.
    Evaluation gets no reply (the guard records an evaluation without metrics)."""

    pull_interval = 0.0  # like Flower's InMemoryGrid: used as is (fedcare.server.grid.prompt)

    def get_node_ids(self) -> list[int]:
        return list(SITES)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            if message.metadata.message_type != "train":
                continue
            node = message.metadata.dst_node_id
            n, step = SITES[node]
            received = unpack_record(message.content.array_records[keys.REC_ARRAYS])
            update = {k: (v + step).astype(v.dtype) for k, v in received.items()}
            TaskIdentity.node_id = node
            replies.append(
                Message(
                    RecordDict(
                        {
                            keys.REC_ARRAYS: pack_record(update),
                            keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: n}),
                            keys.REC_SITE: ConfigRecord(
                                {keys.S_SITE_ID: f"site-{node}", keys.S_DP: False}
                            ),
                        }
                    ),
                    reply_to=message,
                )
            )
            TaskIdentity.node_id = 1
        return replies


def _run_cfg(sites: Path, run_dir: Path, rounds: int) -> FederationConfig:
    return _cfg(
        data_root=str(sites),
        strategy="fedavg",
        num_server_rounds=rounds,
        min_sites=2,
        num_sites=2,
        run_id="app-run",
        run_dir=str(run_dir),
        round_timeout=5,
        connect_timeout=5,
        seed=3,
    )


def test_a_run_writes_its_record_summary_and_final_model(sites: Path, tmp_path: Path) -> None:
    cfg = _run_cfg(sites, tmp_path, rounds=1)
    record = run_federation(_Sites(), cfg)  # type: ignore[arg-type]
    spec = federation_spec(cfg)
    name, start = initial_state(cfg, spec)
    assert (record.run_id, record.task, record.model) == ("app-run", TASK, name)
    assert (record.strategy, record.personalization) == ("fedavg", "none")
    assert (record.rounds_planned, record.rounds_completed) == (1, 1)
    assert record.config == cfg.to_run_config() and record.resumed_from is None
    assert sorted(record.sites) == ["site-11", "site-12"]

    on_disk = json.loads((tmp_path / RECORD_NAME).read_text(encoding="utf-8"))
    assert on_disk == record.to_dict()
    summary = load_summary(tmp_path / "summary.json")
    assert (summary.run_id, summary.rounds_completed) == ("app-run", 1)

    # FedAvg of "weights + 0.5" (10 patients) and "weights - 0.25" (30): weights + 0.0625.
    saved = torch.load(tmp_path / FINAL_MODEL_NAME, weights_only=True)
    assert (saved["model"], saved["task"]) == (name, TASK)
    shift = (10 * 0.5 + 30 * -0.25) / 40
    for k, v in start.items():
        expected = v.numpy().astype(np.float64) + shift
        # float32 weights: |w| + |shift| ≲ 2, so the mean's three roundings stay within
        # 3 · 2^-24 · 2 ≈ 4e-7.
        np.testing.assert_allclose(saved["state_dict"][k].numpy(), expected, rtol=0, atol=4e-7)


def test_a_resumed_run_records_where_it_resumed(sites: Path, tmp_path: Path) -> None:
    run_federation(_Sites(), _run_cfg(sites, tmp_path, rounds=1))  # type: ignore[arg-type]
    record = run_federation(_Sites(), _run_cfg(sites, tmp_path, rounds=2))  # type: ignore[arg-type]
    assert record.resumed_from == 1
    assert (record.rounds_planned, record.rounds_completed) == (2, 2)
    assert [e.round for e in record.rounds] == sorted(e.round for e in record.rounds)
    assert {1, 2} <= {e.round for e in record.rounds}


def test_a_finished_run_resubmitted_trains_no_more(sites: Path, tmp_path: Path) -> None:
    run_federation(_Sites(), _run_cfg(sites, tmp_path, rounds=1))  # type: ignore[arg-type]
    before = torch.load(tmp_path / FINAL_MODEL_NAME, weights_only=True)["state_dict"]

    class _NoSites(_Sites):
        def send_and_receive(self, messages: Iterable[Message], **kw: object) -> list[Message]:
            raise AssertionError("a finished run sent a message")

    record = run_federation(_NoSites(), _run_cfg(sites, tmp_path, rounds=1))  # type: ignore[arg-type]
    assert record.rounds_completed == 1 and record.resumed_from == 1
    after = torch.load(tmp_path / FINAL_MODEL_NAME, weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
