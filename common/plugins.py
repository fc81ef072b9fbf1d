"""Plug-ins: modules that add models, task kinds or strategies, loaded in every process.

A plug-in is an importable Python module that registers what it adds when it is imported:
a model with :func:`fedcare.models.register_model`, a task kind with
:func:`fedcare.models.register_task_kind`, an aggregation strategy with
:func:`fedcare.server.strategies.register_strategy`. A federation runs in several processes
(the ServerApp's, a Ray actor per few simulated sites, each deployed site's ClientApp
process), and each has its own registries: a model registered by code typed into a notebook
is unknown to the others. A plug-in module is imported in every one of them, by
:func:`load_plugins`, from two lists:

* the entry points of group ``fedcare.plugins`` that installed distributions declare, each
  naming the module to import (in the plug-in's own ``pyproject.toml``)::

      [project.entry-points."fedcare.plugins"]
      my-models = "my_package.fedcare_plugin"

* the environment variable ``FEDCARE_PLUGINS``: importable module names separated by
  commas, e.g. ``FEDCARE_PLUGINS=my_plugin,lab.models``. The processes fedcare and Flower
  start inherit it (the local SuperLink and its simulation, Ray's actors, a site's worker),
  as they inherit ``PYTHONPATH``; the module must be importable there too.

Importing :mod:`fedcare.models` calls :func:`load_plugins` once its own models and task kinds
are registered, and every process that builds a model, trains or aggregates imports it first.
A plug-in should import only what it registers with (:mod:`fedcare.models`,
:mod:`fedcare.server.strategies`, :mod:`fedcare.common`): it is imported while
:mod:`fedcare.models` is being imported. Loading is idempotent: Python imports a module once
per process, so calling :func:`load_plugins` again only picks up modules named since.

This module imports nothing of fedcare's other packages (``common`` is at the bottom of the
import order); the plug-ins import the registries themselves.

Examples
--------
>>> load_plugins(environ={"FEDCARE_PLUGINS": "json, fractions"})[-2:]
('json', 'fractions')
>>> plugin_modules({"FEDCARE_PLUGINS": " json ,, fractions "})
('json', 'fractions')
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from fedcare.common.errors import ConfigError

__all__ = [
    "PLUGIN_GROUP",
    "PLUGINS_ENV",
    "plugin_entry_points",
    "plugin_modules",
    "plugin_code_modules",
    "load_plugins",
]

PLUGIN_GROUP = "fedcare.plugins"
"""The entry-point group whose entries name plug-in modules."""

PLUGINS_ENV = "FEDCARE_PLUGINS"
"""The environment variable naming plug-in modules, separated by commas."""


def plugin_entry_points() -> tuple[EntryPoint, ...]:
    """The installed entry points of group :data:`PLUGIN_GROUP`, sorted by name."""
    return tuple(sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: (ep.name, ep.value)))


def plugin_modules(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The module names :data:`PLUGINS_ENV` lists, in order, each once.

    Parameters
    ----------
    environ:
        The environment to read (default: this process's).

    Raises
    ------
    ConfigError
        An entry is not a dotted module name.
    """
    env = os.environ if environ is None else environ
    names: list[str] = []
    for raw in env.get(PLUGINS_ENV, "").split(","):
        name = raw.strip()
        if not name:
            continue
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(
                f"{PLUGINS_ENV}: {name!r} is not a module name; list importable modules "
                f"separated by commas, e.g. {PLUGINS_ENV}=my_plugin,lab.models"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def plugin_code_modules(
    environ: Mapping[str, str] | None = None, *, entry_points: bool = True
) -> tuple[str, ...]:
    """The top-level package (or lone module) of every plug-in a process imports (entry
    points', then :data:`PLUGINS_ENV`'s): the code the audit log's ``code_sha256`` covers
    beside fedcare's (:func:`fedcare.common.audit.running_code_hash`). The whole top-level
    package, because a plug-in module imports its package's other modules (its models)."""
    names = (
        [ep.value.partition(":")[0].strip() for ep in plugin_entry_points()] if entry_points else []
    )
    tops = [name.partition(".")[0] for name in [*names, *plugin_modules(environ)]]
    return tuple(dict.fromkeys(tops))


def _entry_point_source(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    owner = f" of {dist.name}" if dist is not None else ""
    return f"entry point {ep.name!r} ({ep.value}){owner} in group {PLUGIN_GROUP!r}"


def load_plugins(*, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Import every plug-in module: the :data:`PLUGIN_GROUP` entry points, then
    :data:`PLUGINS_ENV`'s modules.

    Parameters
    ----------
    environ:
        The environment to read :data:`PLUGINS_ENV` from (default: this process's).

    Returns
    -------
    tuple of str
        What was loaded, in order: each entry point's value, then each module name.

    Raises
    ------
    ConfigError
        A plug-in failed to import (or raised while registering what it adds); the message
        names the plug-in, where it was named, the error and the fix. Nothing is retried
        silently: the same call fails the same way until the plug-in is fixed or removed.
    """
    loaded: list[str] = []
    for ep in plugin_entry_points():
        try:
            ep.load()
        except Exception as e:  # any error of the plug-in's own code: named, then raised
            raise ConfigError(
                f"fedcare plug-in {ep.value!r} ({_entry_point_source(ep)}) failed to load: "
                f"{type(e).__name__}: {e}. Fix the plug-in, or uninstall the distribution "
                "that declares it"
            ) from e
        loaded.append(ep.value)
    for name in plugin_modules(environ):
        try:
            importlib.import_module(name)
        except Exception as e:  # any error of the plug-in's own code: named, then raised
            raise ConfigError(
                f"fedcare plug-in {name!r} (named in {PLUGINS_ENV}) failed to import: "
                f"{type(e).__name__}: {e}. Fix: make it importable in every process of the "
                f"run (install it, or put its folder on PYTHONPATH), fix its error, or remove "
                f"it from {PLUGINS_ENV}"
            ) from e
        loaded.append(name)
    return tuple(loaded)
