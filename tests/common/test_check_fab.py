"""``check_fab``: the one test of "is this FAB fedcare's approved thin app?" that the centre's
ServerApp executor and every site's worker apply before running anything for a run.

FABs are built by Flower's own builder (``flwr.cli.build.build_fab_from_disk``, what
``flwr run`` and ``flwr build`` use) from app folders: the real thin app is accepted, and
each way of smuggling code or naming other code is refused with a reason that says what.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import get_fab_metadata

from fedcare.common.errors import PolicyViolation
from fedcare.common.federation import RUN_CONFIG_DEFAULTS
from fedcare.common.flower_app import APP_COMPONENTS, check_fab, fedcare_version, write_app_dir


def _thin_app(folder: Path, **overrides: str) -> Path:
    """fedcare's thin app, as ``fedcare server submit`` writes it (with ``overrides``)."""
    kwargs: dict[str, str] = dict(APP_COMPONENTS)
    kwargs.update(overrides)
    return write_app_dir(folder, config_defaults=RUN_CONFIG_DEFAULTS, **kwargs)  # type: ignore[arg-type]


def _build(app: Path) -> tuple[bytes, str, str]:
    """The FAB Flower builds from ``app``, and the id and version a run would carry."""
    fab = build_fab_from_disk(app)
    fab_id, fab_version = get_fab_metadata(fab)
    return fab, fab_id, fab_version


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in entries:
            z.writestr(name, content)
    return buf.getvalue()


def _manifest(*files: tuple[str, bytes]) -> bytes:
    return "\n".join(
        f"{name},{hashlib.sha256(c).hexdigest()},{len(c) * 8}" for name, c in files
    ).encode()


def test_the_thin_app_flower_builds_is_accepted(tmp_path: Path) -> None:
    fab, fab_id, fab_version = _build(_thin_app(tmp_path / "app"))
    assert (fab_id, fab_version) == ("fedcare/fedcare-run", fedcare_version())
    assert sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()) == [
        ".info/CONTENT",
        "pyproject.toml",
    ]
    check_fab(fab, fab_id, fab_version)  # no exception


def test_a_fab_shipping_a_python_file_is_refused(tmp_path: Path) -> None:
    app = _thin_app(tmp_path / "app")
    # A module that would shadow the installed one if the FAB's folder were on sys.path.
    (app / "server").mkdir()
    (app / "server" / "app.py").write_text("import os; os.system('id')\n")
    (app / "evil.py").write_text("print('hello')\n")
    fab, fab_id, fab_version = _build(app)
    with pytest.raises(PolicyViolation, match=r"ships 'evil.py', 'server/app.py' besides"):
        check_fab(fab, fab_id, fab_version)


def test_another_version_is_refused(tmp_path: Path) -> None:
    app = write_app_dir(tmp_path / "app", config_defaults={}, version="9.9.9", **APP_COMPONENTS)
    fab, fab_id, fab_version = _build(app)
    assert fab_version == "9.9.9"
    with pytest.raises(PolicyViolation, match=r"version is '9.9.9'.*same fedcare version"):
        check_fab(fab, fab_id, fab_version)
    # Claiming the right version does not help: the FAB's own pyproject.toml is read.
    with pytest.raises(PolicyViolation, match=r"\[project\] is .*'9.9.9'"):
        check_fab(fab, fab_id, fedcare_version())


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"serverapp": "evilmod:app"}, "components are"),
        ({"clientapp": "fedcare.client.app:other"}, "components are"),
    ],
)
def test_other_components_are_refused(
    tmp_path: Path, overrides: dict[str, str], reason: str
) -> None:
    fab, fab_id, fab_version = _build(_thin_app(tmp_path / "app", **overrides))
    with pytest.raises(PolicyViolation, match=reason):
        check_fab(fab, fab_id, fab_version)


@pytest.mark.parametrize(
    ("overrides", "claimed", "reason"),
    [
        ({"name": "other-run"}, "fedcare/other-run", r"\[project\] is"),
        ({"publisher": "mallory"}, "mallory/fedcare-run", "publisher is 'mallory'"),
    ],
)
def test_another_app_name_or_publisher_is_refused(
    tmp_path: Path, overrides: dict[str, str], claimed: str, reason: str
) -> None:
    fab, fab_id, fab_version = _build(_thin_app(tmp_path / "app", **overrides))
    assert fab_id == claimed
    with pytest.raises(PolicyViolation, match=f"the run's app is '{claimed}'"):
        check_fab(fab, fab_id, fab_version)
    # Claiming fedcare's id does not help: the FAB's own pyproject.toml is read.
    with pytest.raises(PolicyViolation, match=reason):
        check_fab(fab, "fedcare/fedcare-run", fab_version)


def test_extra_pyproject_settings_are_refused(tmp_path: Path) -> None:
    app = _thin_app(tmp_path / "app")
    text = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        text.replace("[project]\n", '[project]\ndependencies = ["evil-package"]\n', 1)
    )
    fab, fab_id, fab_version = _build(app)
    with pytest.raises(PolicyViolation, match=r"\[project\] is .*evil-package"):
        check_fab(fab, fab_id, fab_version)


def test_hand_made_archives_are_refused(tmp_path: Path) -> None:
    fab, fab_id, fab_version = _build(_thin_app(tmp_path / "app"))
    pyproject = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml")
    good = [
        ("pyproject.toml", pyproject),
        (".info/CONTENT", _manifest(("pyproject.toml", pyproject))),
    ]
    check_fab(_zip(good), fab_id, fab_version)  # the same two entries, zipped by hand

    cases = {
        "not a readable zip": b"PK\x03\x04 not really a zip",
        "same name twice": _zip([*good, ("pyproject.toml", pyproject)]),
        "lacks .info/CONTENT": _zip(good[:1]),
        "manifest": _zip([good[0], (".info/CONTENT", _manifest(("pyproject.toml", b"other")))]),
        "ships '.info/CONTENT.sig'": _zip([*good, (".info/CONTENT.sig", b"x")]),
    }
    for reason, archive in cases.items():
        with pytest.raises(PolicyViolation, match=reason):
            check_fab(archive, fab_id, fab_version)


def test_an_oversized_entry_is_refused_without_inflating_it(tmp_path: Path) -> None:
    big = b"#" * (2 * 1024 * 1024)  # compresses to a few KiB
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pyproject.toml", big)
        z.writestr(".info/CONTENT", _manifest(("pyproject.toml", big)))
    with pytest.raises(PolicyViolation, match="inflates to"):
        check_fab(buf.getvalue(), "fedcare/fedcare-run", fedcare_version())


def test_the_reason_says_how_to_submit(tmp_path: Path) -> None:
    with pytest.raises(PolicyViolation) as e:
        check_fab(b"", "fedcare/fedcare-run", fedcare_version())
    assert "fedcare server submit" in str(e.value)


@pytest.mark.parametrize("how", ["lzma", "corrupt-deflate"])
def test_an_archive_its_reader_chokes_on_is_a_refusal_not_a_crash(tmp_path: Path, how: str) -> None:
    fab, fab_id, fab_version = _build(_thin_app(tmp_path / "app"))
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    buf = io.BytesIO()
    method = zipfile.ZIP_LZMA if how == "lzma" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for name, content in entries:
            z.writestr(name, content)
    data = bytearray(buf.getvalue())
    if how == "corrupt-deflate":
        start = data.index(b"pyproject.toml") + len(b"pyproject.toml")
        for i in range(start + 4, start + 40):  # inside the compressed stream
            data[i] ^= 0x5A
    with pytest.raises(PolicyViolation, match="compression method|not a readable zip|differs"):
        check_fab(bytes(data), fab_id, fab_version)
