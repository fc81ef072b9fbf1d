"""A thin Flower app: a folder holding only ``pyproject.toml`` that names installed modules.

Its FAB ships no code: the SuperLink and every SuperNode run the fedcare they have
installed, never code sent over the network (a hospital runs only what it installed), and a
copy in the FAB would shadow the installed packages anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import tomli_w

from common.errors import ConfigError

__all__ = ["ConfigValue", "write_app_dir", "check_values"]

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
    publisher: str = "fedcare",
    name: str = "fedcare-run",
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
                f"{role} component {ref!r} is not 'module:attribute' (e.g. 'server.app:app')"
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
        "project": {"name": name, "version": "1.0.0"},
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
