"""A site's data kept warm between messages: loaded once while unchanged, afresh when not.

Checked for the cache itself (:class:`fedcare.client.warm.WarmSites`: its bounds, what pickling it
carries) and for the ClientApp's handlers, which keep every simulated site a process serves.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import fedcare.client.app as client_app
import fedcare.client.warm as warm_module
from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.warm import WarmSites, site_nbytes
from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import server_message, task_identity


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    synthesize(root, n_sites=2, seed=7, config=SynthConfig(patients_per_site=40))
    return root


@pytest.fixture
def sites(synthetic: Path, tmp_path: Path) -> Path:
    """The synthetic sites, copied: a test may edit them."""
    return Path(shutil.copytree(synthetic, tmp_path / "sites"))


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders :mod:`fedcare.client.warm` loaded from disk, in order."""
    folders: list[Path] = []

    def counting(folder: Path) -> SiteData:
        folders.append(Path(folder))
        return load_site(folder)

    monkeypatch.setattr(warm_module, "load_site", counting)
    return folders


def _flip_first_label(site: Path) -> None:
    """A valid edit of the site's bytes: the first patient's last outcome flips."""
    table = site / "outcomes.csv"
    lines = table.read_text().splitlines()
    lines[1] = lines[1][:-1] + ("0" if lines[1].endswith("1") else "1")
    table.write_text("\n".join(lines) + "\n")


def test_a_site_is_loaded_once_while_its_files_are_unchanged(
    sites: Path, loaded: list[Path]
) -> None:
    warm = WarmSites()
    site, tasks = warm.load(sites / "site-0")
    tasks["readmission"] = "encoded"  # type: ignore[assignment]  # any value the trainer keeps
    # The site's own state folder is not its data: a ledger write leaves it warm.
    (sites / "site-0" / ".fedcare").mkdir()
    (sites / "site-0" / ".fedcare" / "ledger.sqlite").write_bytes(b"charges")
    again, tasks_again = warm.load(sites / "site-0")
    assert again is site and tasks_again is tasks
    assert warm.loads == 1 and len(loaded) == 1


def test_a_changed_file_loads_the_site_afresh_with_the_fingerprint_of_its_bytes(
    sites: Path, loaded: list[Path]
) -> None:
    warm = WarmSites()
    before, tasks = warm.load(sites / "site-0")
    tasks["readmission"] = "encoded"  # type: ignore[assignment]
    _flip_first_label(sites / "site-0")
    after, fresh_tasks = warm.load(sites / "site-0")
    assert warm.loads == 2 and after is not before and fresh_tasks == {}
    assert after.fingerprint != before.fingerprint
    assert after.fingerprint == load_site(sites / "site-0").fingerprint
    # The same bytes written again are a new file too: loaded afresh, same fingerprint.
    table = sites / "site-0" / "outcomes.csv"
    table.write_bytes(table.read_bytes())
    rewritten, _ = warm.load(sites / "site-0")
    assert warm.loads == 3 and rewritten.fingerprint == after.fingerprint
    # A new file in the folder also makes the data cold.
    (sites / "site-0" / "notes.txt").write_text("x")
    warm.load(sites / "site-0")
    assert warm.loads == 4


def test_the_least_recently_used_site_is_dropped_beyond_max_sites(
    sites: Path, loaded: list[Path]
) -> None:
    warm = WarmSites(max_sites=1)
    first, _ = warm.load(sites / "site-0")
    warm.load(sites / "site-1")
    assert len(warm) == 1
    again, _ = warm.load(sites / "site-0")
    assert again is not first and [p.name for p in loaded] == ["site-0", "site-1", "site-0"]


def test_a_site_larger_than_max_bytes_is_not_kept_and_drops_nothing(sites: Path) -> None:
    sizes = {name: site_nbytes(load_site(sites / name)) for name in ("site-0", "site-1")}
    small, large = sorted(sizes, key=sizes.__getitem__)
    assert sizes[small] < sizes[large], "the synthetic sites should differ in size"
    warm = WarmSites(max_bytes=sizes[small])
    kept, _ = warm.load(sites / small)
    for _ in range(2):
        warm.load(sites / large)
    assert warm.loads == 3  # the large site, every time
    assert warm.load(sites / small)[0] is kept and len(warm) == 1


def test_the_byte_bound_drops_the_least_recently_used_site(sites: Path) -> None:
    one = site_nbytes(load_site(sites / "site-0"))
    two = site_nbytes(load_site(sites / "site-1"))
    warm = WarmSites(max_bytes=max(one, two) + min(one, two) // 2)  # room for one of them
    warm.load(sites / "site-0")
    warm.load(sites / "site-1")
    assert len(warm) == 1
    warm.load(sites / "site-1")
    assert warm.loads == 2  # site-1, the most recent, was kept


def test_a_pickled_cache_carries_no_site(sites: Path) -> None:
    warm = WarmSites(max_sites=3)
    site, _ = warm.load(sites / "site-0")
    blob = pickle.dumps(warm)
    assert site.patient_ids[0].encode() not in blob
    copy = pickle.loads(blob)
    assert isinstance(copy, WarmSites) and len(copy) == 0 and copy.max_sites == 3


def test_bounds_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="max_sites"):
        WarmSites(max_sites=0)


# ----------------------------------------------------------------- the ClientApp's handlers


@pytest.fixture
def process_sites(monkeypatch: pytest.MonkeyPatch) -> WarmSites:
    """A fresh cache in place of the one this process's ClientApp keeps."""
    fresh = WarmSites()
    monkeypatch.setattr(client_app, "_process_sites", fresh)
    return fresh


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


def _context(sites: Path, state: Path) -> Context:
    cfg = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": "readmission",
        "num-server-rounds": 3,
        "local-epochs": 1,
    }
    rc = FederationConfig.from_run_config(cfg).to_run_config()
    return Context(
        run_id=3,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=rc,
    )


def _answer(kind: str, sites: Path, context: Context, *, rnd: int) -> None:
    handler = {"train": client_app._train, "evaluate": client_app._evaluate}[kind]
    reply = handler(server_message(sites / "site-0", kind=kind, rnd=rnd), context)
    assert not reply.has_error(), reply.error.reason


def test_the_clientapp_keeps_a_simulated_site_between_messages_until_it_changes(
    sites: Path, tmp_path: Path, loaded: list[Path], process_sites: WarmSites
) -> None:
    context = _context(sites, tmp_path / "state")
    _answer("train", sites, context, rnd=1)
    _answer("evaluate", sites, context, rnd=1)
    _answer("train", sites, context, rnd=2)
    assert process_sites.loads == 1, "a later message loaded the simulated site again"
    # The trainer's encoded task is kept with the site, for the next message.
    site, tasks = process_sites.load(sites / "site-0")
    assert site.spec.site_id == "site-0" and set(tasks) == {"readmission"}
    # The ledger is the site's, opened for every message: both rounds were charged to it.
    ledger = PrivacyLedger(tmp_path / "state" / "site-0" / "ledger.sqlite")
    assert ledger.count_charges() >= 2
    _flip_first_label(sites / "site-0")
    _answer("evaluate", sites, context, rnd=2)
    assert process_sites.loads == 2 and len(loaded) == 2


def test_a_warm_site_answers_exactly_as_a_freshly_loaded_one(sites: Path, tmp_path: Path) -> None:
    """The kept data is not changed by the messages it answers: with the simulated site's
    reproducible noise, every reply is the same bit for bit as from a site loaded afresh."""

    def replies(warm: WarmSites | None, state: Path) -> list[dict[str, Any]]:
        context = _context(sites, state)
        out: list[dict[str, Any]] = []
        for rnd, kind in ((1, "train"), (1, "evaluate"), (2, "train")):
            handler = {"train": client_app.handle_train, "evaluate": client_app.handle_evaluate}
            msg = server_message(sites / "site-0", kind=kind, rnd=rnd)
            reply = handler[kind](msg, context, warm=warm)
            assert not reply.has_error(), reply.error.reason
            arrays = reply.content.array_records.get(keys.REC_ARRAYS)
            out.append(
                {
                    "metrics": dict(reply.content[keys.REC_METRICS]),
                    "arrays": {} if arrays is None else arrays.to_numpy_ndarrays(),
                }
            )
        return out

    warm = WarmSites()
    cold, hot = replies(None, tmp_path / "cold"), replies(warm, tmp_path / "warm")
    assert warm.loads == 1
    for a, b in zip(cold, hot, strict=True):
        assert a["metrics"] == b["metrics"]
        assert len(a["arrays"]) == len(b["arrays"])
        assert all(np.array_equal(x, y) for x, y in zip(a["arrays"], b["arrays"], strict=True))
