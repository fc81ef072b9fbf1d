"""A thin Flower app: a folder holding only ``pyproject.toml`` that names installed modules.

Its FAB ships no code: the SuperLink and every SuperNode run the fedcare they have
installed, never code sent over the network (a hospital runs only what it installed), and a
copy in the FAB would shadow the installed packages anyway.

:func:`write_app_dir` writes the app; :func:`check_fab` is the one test of "is this FAB
fedcare's approved thin app?" that both the centre's ServerApp executor
(``server/executor.py``) and each site's worker apply before they run anything for a run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import tomli_w

from fedcare.common.errors import ConfigError, PolicyViolation
from fedcare.common.tomlcompat import tomllib

__all__ = [
    "ConfigValue",
    "APP_PUBLISHER",
    "APP_NAME",
    "APP_COMPONENTS",
    "fedcare_version",
    "write_app_dir",
    "check_values",
    "check_fab",
]

#: The approved thin app: ``publisher/name`` is its FAB id, and it names these components.
APP_PUBLISHER = "fedcare"
APP_NAME = "fedcare-run"
APP_COMPONENTS: Mapping[str, str] = {
    "serverapp": "fedcare.server.app:app",
    "clientapp": "fedcare.client.app:app",
}

#: What a FAB built from a thin app holds: the app's ``pyproject.toml`` and Flower's manifest.
_FAB_CONFIG = "pyproject.toml"
_FAB_MANIFEST = ".info/CONTENT"
#: Flower's own ceiling on a FAB (``flwr.common.constant.FAB_MAX_SIZE``), and one on what
#: an entry may inflate to (a thin app's pyproject.toml is a few KiB).
_FAB_MAX_BYTES = 10 * 1024 * 1024
_ENTRY_MAX_BYTES = 1024 * 1024


def fedcare_version() -> str:
    """The installed fedcare's version: the version of every thin app it writes and accepts.

    Raises
    ------
    ConfigError
        fedcare is not installed (``pip install -e .``): nothing says which version runs.
    """
    try:
        return importlib.metadata.version("fedcare")
    except importlib.metadata.PackageNotFoundError as e:
        raise ConfigError(
            "fedcare is not installed in this environment (no package metadata); install it "
            "with `pip install -e .` so that its version names the apps it runs"
        ) from e


#: Values ``[tool.flwr.app.config]`` and ``--run-config`` accept (Flower's ``UserConfigValue``).
ConfigValue = bool | int | float | str


def check_values(config: Mapping[str, object], *, what: str) -> None:
    """Refuse values a Flower run config cannot hold."""
    bad = [k for k, v in config.items() if not isinstance(v, (bool, int, float, str))]
    if bad:
        raise ConfigError(
            f"{what}: values of {', '.join(map(repr, bad))} are not bool, int, float or str, "
            "the only types a Flower run config holds; encode them (e.g. as a JSON string)"
        )


def write_app_dir(
    dest: Path,
    *,
    config_defaults: Mapping[str, ConfigValue],
    serverapp: str,
    clientapp: str,
    publisher: str = APP_PUBLISHER,
    name: str = APP_NAME,
    version: str | None = None,
) -> Path:
    """Write a thin Flower app: a folder with only ``pyproject.toml``.

    The FAB built from it ships no code, so the simulation imports the installed (editable)
    packages; a copy in the FAB would shadow them.

    Parameters
    ----------
    dest : pathlib.Path
        The app folder; created if missing. Anything but ``pyproject.toml`` in it is an error
        (Flower would ship it).
    config_defaults : mapping of str to bool, int, float or str
        ``[tool.flwr.app.config]``: every key a run may override, with its default.
    serverapp, clientapp : str
        Component references ``"module:attribute"``. Flower checks them without importing:
        the attribute must be a module-level assignment (``app = ServerApp()``) or be
        listed in ``__all__``; a bare ``from x import app`` fails.
    publisher, name : str
        The app's publisher and project name (the FAB is ``publisher/name``).
    version : str, optional
        The app's version; default the installed fedcare's (:func:`fedcare_version`), the
        only version :func:`check_fab` accepts.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    ConfigError
        A component reference or a config value is malformed, or ``dest`` holds other files.
    """
    for role, ref in (("serverapp", serverapp), ("clientapp", clientapp)):
        module, _, attribute = ref.partition(":")
        if not module or not attribute:
            raise ConfigError(
                f"{role} component {ref!r} is not 'module:attribute' "
                "(e.g. 'fedcare.server.app:app')"
            )
    check_values(config_defaults, what="config_defaults")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in dest.iterdir() if p.name != "pyproject.toml")
    if others:
        raise ConfigError(
            f"{dest} holds {', '.join(others)}: a thin app folder must hold only "
            "pyproject.toml, else Flower ships those files in the FAB; use an empty folder"
        )
    doc = {
        "project": {"name": name, "version": fedcare_version() if version is None else version},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": dict(config_defaults),
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return dest


def check_fab(fab_content: bytes, fab_id: str, fab_version: str) -> None:
    """Refuse any FAB but fedcare's approved thin app, before anything of it is used.

    The approved app is what :func:`write_app_dir` writes with its defaults, built into a
    FAB by Flower (``flwr run``/``flwr build``): a zip holding exactly ``pyproject.toml``
    and Flower's ``.info/CONTENT`` manifest (which lists that file with its SHA-256),
    whose ``pyproject.toml`` names publisher ``fedcare``, project ``fedcare-run``, the
    installed fedcare's version (:func:`fedcare_version`), the components
    ``fedcare.server.app:app`` and ``fedcare.client.app:app``, and a flat table of run-config
    defaults
    (bool, int, float or str values) -- nothing else. Whoever runs a task for a run (the
    centre's ServerApp executor, a site's worker) calls this first, and then runs only the
    fedcare it installed: a FAB that ships a file besides ``pyproject.toml`` could shadow
    an installed module, and one naming other components could run other code.

    Parameters
    ----------
    fab_content : bytes
        The FAB as received (``Fab.content``).
    fab_id, fab_version : str
        What the run claims the FAB is (``Run.fab_id``, e.g. ``"fedcare/fedcare-run"``,
        and ``Run.fab_version``); both must match the approved app and the FAB's own
        ``pyproject.toml``.

    Raises
    ------
    PolicyViolation
        The FAB is not the approved app; the message names what is wrong (a shipped file,
        another component, publisher, name or version, a malformed archive).

    Examples
    --------
    >>> check_fab(b"not a zip", "fedcare/fedcare-run", fedcare_version())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.common.errors.PolicyViolation: the FAB is not a readable zip archive ...
    """
    expected_id = f"{APP_PUBLISHER}/{APP_NAME}"
    version = fedcare_version()
    if fab_id != expected_id:
        _refuse(f"the run's app is {fab_id!r}, not {expected_id!r}")
    if fab_version != version:
        _refuse(
            f"the run's app version is {fab_version!r}, but the installed fedcare is "
            f"{version!r} (centre and sites must run the same fedcare version)"
        )
    if len(fab_content) > _FAB_MAX_BYTES:
        _refuse(f"the FAB is {len(fab_content)} bytes, more than a thin app's pyproject.toml")
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
            entries = _read_entries(fab)
    except PolicyViolation:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure (zlib, lzma, bz2, OS) refuses
        _refuse(f"the FAB is not a readable zip archive ({type(e).__name__}: {str(e)[:200]})")
    _check_manifest(entries)
    try:
        doc = tomllib.loads(entries[_FAB_CONFIG].decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        _refuse(f"the FAB's pyproject.toml is not valid TOML ({e})")
    _check_pyproject(doc, version)


def _refuse(reason: str) -> NoReturn:
    raise PolicyViolation(
        f"{reason}; fedcare runs only its own thin app (fedcare server submit), never code "
        "it receives"
    )


def _read_entries(fab: zipfile.ZipFile) -> dict[str, bytes]:
    """The archive's two entries, read within bounds; anything else is refused."""
    names = [info.filename for info in fab.infolist()]
    if len(names) != len(set(names)):
        _refuse("the FAB holds the same name twice")
    extra = sorted(set(names) - {_FAB_CONFIG, _FAB_MANIFEST})
    if extra:
        shown = ", ".join(repr(n[:80]) for n in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        _refuse(f"the FAB ships {shown}{more} besides pyproject.toml")
    missing = sorted({_FAB_CONFIG, _FAB_MANIFEST} - set(names))
    if missing:
        _refuse(f"the FAB lacks {', '.join(missing)}")
    entries = {}
    for info in fab.infolist():
        if info.flag_bits & 0x1:
            _refuse(f"the FAB's {info.filename} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            _refuse(f"the FAB's {info.filename} uses compression method {info.compress_type}")
        if info.file_size > _ENTRY_MAX_BYTES:
            _refuse(f"the FAB's {info.filename} inflates to {info.file_size} bytes")
        with fab.open(info) as f:
            entries[info.filename] = f.read(_ENTRY_MAX_BYTES + 1)
        if len(entries[info.filename]) > _ENTRY_MAX_BYTES:
            _refuse(f"the FAB's {info.filename} is larger than its zip entry says")
    return entries


def _check_manifest(entries: Mapping[str, bytes]) -> None:
    """Flower's manifest lists exactly pyproject.toml, with its hash."""
    digest = hashlib.sha256(entries[_FAB_CONFIG]).hexdigest()
    try:
        lines = entries[_FAB_MANIFEST].decode("ascii").strip().split("\n")
    except UnicodeDecodeError:
        lines = []
    listed = [line.split(",") for line in lines]
    if [row[:2] for row in listed] != [[_FAB_CONFIG, digest]] or len(listed[0]) != 3:
        _refuse(
            "the FAB's manifest (.info/CONTENT) does not list exactly pyproject.toml with its "
            "SHA-256"
        )


def _check_pyproject(doc: Mapping[str, object], version: str) -> None:
    """The thin app's pyproject.toml, key for key."""
    project = doc.get("project")
    tool = doc.get("tool")
    flwr = tool.get("flwr") if isinstance(tool, dict) else None
    app = flwr.get("app") if isinstance(flwr, dict) else None
    if set(doc) != {"project", "tool"} or not isinstance(project, dict):
        _refuse(f"the FAB's pyproject.toml has the tables {sorted(doc)}, not [project] and [tool]")
    if not isinstance(tool, dict) or set(tool) != {"flwr"}:
        _refuse("the FAB's pyproject.toml has [tool] tables other than [tool.flwr.app]")
    if not isinstance(flwr, dict) or set(flwr) != {"app"} or not isinstance(app, dict):
        _refuse("the FAB's pyproject.toml has [tool.flwr] tables other than [tool.flwr.app]")
    wanted_project = {"name": APP_NAME, "version": version}
    if project != wanted_project:
        _refuse(
            f"the FAB's [project] is {project!r}, not {wanted_project!r} (only a name and "
            "fedcare's version)"
        )
    extra = sorted(set(app) - {"publisher", "components", "config"})
    if extra:
        _refuse(f"the FAB's [tool.flwr.app] sets {', '.join(extra)}")
    if app.get("publisher") != APP_PUBLISHER:
        _refuse(f"the FAB's publisher is {app.get('publisher')!r}, not {APP_PUBLISHER!r}")
    if app.get("components") != dict(APP_COMPONENTS):
        _refuse(
            f"the FAB's components are {app.get('components')!r}, not fedcare's installed "
            f"{dict(APP_COMPONENTS)!r}"
        )
    config = app.get("config", {})
    if not isinstance(config, dict):
        _refuse("the FAB's [tool.flwr.app.config] is not a table")
    try:
        check_values(config, what="the FAB's [tool.flwr.app.config]")
    except ConfigError as e:
        _refuse(str(e))
