"""A finished run directory, read back for an audit: config, summary, sites, final model.

:func:`load_run` checks that everything an attack needs is there and names the fix when it
is not; :meth:`RunArtifacts.site_task_data` rebuilds a site's train / val / test split and
encoders exactly as training did (same loader, the site's own split from its site.toml,
encoders fitted on the train split); :meth:`RunArtifacts.mechanism` is what the site did
in the run, from ``config.toml`` and the mechanisms ``summary.json`` lists.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcare.client.data.datasets import TaskData, build_task_data
from fedcare.client.data.loaders import load_site
from fedcare.client.dpsgd import DPPlan
from fedcare.client.local import settings_from_run
from fedcare.common.errors import ConfigError, FedcareError
from fedcare.common.federation import FederationConfig
from fedcare.common.run_files import CONFIG_NAME, SITES_MANIFEST_NAME
from fedcare.common.summary import SUMMARY_NAME, RunSummary, SiteResult, load_summary
from fedcare.common.tomlcompat import tomllib
from fedcare.models import build_model
from fedcare.models.tasks import TaskKind, task_definition
from fedcare.server.app import FINAL_MODEL_NAME
from fedcare.simulations.audit.attacks.training import ModelFactory, SiteMechanism

__all__ = ["RunArtifacts", "load_run", "CONFIG_FILE", "SUMMARY_FILE", "SITES_FILE"]

CONFIG_FILE = CONFIG_NAME
SUMMARY_FILE = SUMMARY_NAME
SITES_FILE = SITES_MANIFEST_NAME


@dataclass(frozen=True)
class RunArtifacts:
    """What a finished run left, validated.

    Attributes
    ----------
    run_dir:
        The run directory.
    config:
        The run's resolved federation config (``config.toml``, ``[federation]``).
    summary:
        ``summary.json``.
    site_dirs:
        The site folders the run trained on (``sites.json``).
    model_name, task:
        The final model's registered name and its task.
    state_dict:
        The final global model's weights.
    """

    run_dir: Path
    config: FederationConfig
    summary: RunSummary
    site_dirs: tuple[Path, ...]
    model_name: str
    task: str
    state_dict: dict[str, torch.Tensor]

    @property
    def dp(self) -> bool:
        """Whether the run trained with DP-SGD."""
        return self.config.dp

    def site_result(self, site_id: str) -> SiteResult | None:
        """The site's entry in ``summary.json`` (``None`` if the summary has none)."""
        return next((s for s in self.summary.sites if s.site_id == site_id), None)

    def site_task_data(self) -> dict[str, TaskData]:
        """Every site's task data, rebuilt as training built it, by site id.

        Raises
        ------
        ConfigError
            A site folder cannot be loaded any more (the message names it and the fix).
        """
        out: dict[str, TaskData] = {}
        for folder in self.site_dirs:
            try:
                site = load_site(folder)
                data = build_task_data(site, self.task)
            except FedcareError as e:
                raise ConfigError(
                    f"site folder {folder} (listed in {self.run_dir / SITES_FILE}) cannot be "
                    f"read as the run read it: {e}. The attacks rebuild each site's split "
                    "from its data; restore the folder as it was for the run"
                ) from e
            out[data.site_id] = data
        return out

    def kind(self, data: TaskData) -> TaskKind:
        """The task kind (loss) of the run's task, checked against the final model."""
        return task_definition(data.task, model=self.model_name).kind

    def model_factory(self, data: TaskData) -> ModelFactory:
        """A fresh-model factory ``build(generator) -> nn.Module`` of the run's architecture."""
        name, dims = self.model_name, dict(data.input_dims)

        def build(generator: torch.Generator) -> nn.Module:
            return build_model(name, input_dims=dims, generator=generator)

        return build

    def final_model(self, data: TaskData, device: torch.device) -> nn.Module:
        """The final global model, loaded, on ``device``."""
        model = build_model(self.model_name, input_dims=dict(data.input_dims))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise ConfigError(
                f"{self.run_dir / FINAL_MODEL_NAME} does not fit model {self.model_name!r} on "
                f"site {data.site_id}'s inputs ({e}); the site data changed since the run"
            ) from e
        return model.to(device)

    def mechanism(self, site_id: str) -> SiteMechanism:
        """How ``site_id`` trained: the run's local settings and, with DP, its mechanisms.

        Raises
        ------
        ConfigError
            A DP run whose summary lists no mechanism for the site (it never trained).
        """
        train, _ = settings_from_run(self.config)
        site = self.site_result(site_id)
        # The recipe's values (client/recipe.py), as the site filled them in for its patients.
        train = train.for_site(
            n_train=0 if site is None else site.n_train,
            model=self.model_name,
            private=self.config.dp,
        )
        rounds = self.summary.rounds_completed or self.config.num_server_rounds
        if not self.config.dp:
            return SiteMechanism(train=train, rounds=rounds, plans=None, model_name=self.model_name)
        mechanisms = () if site is None else site.privacy.mechanisms
        if not mechanisms:
            raise ConfigError(
                f"{self.run_dir / SUMMARY_FILE} lists no DP mechanism for site {site_id}, so "
                "its training cannot be replayed; audit only sites that trained (--site)"
            )
        plans = tuple(
            DPPlan(
                noise_multiplier=m.noise_multiplier,
                sample_rate=m.sample_rate,
                steps=m.steps,
                max_grad_norm=self.config.max_grad_norm,
            )
            for m in mechanisms
        )
        return SiteMechanism(
            train=train, rounds=len(plans), plans=plans, model_name=self.model_name
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e}); rerun the simulation") from e


def load_run(run_dir: Path) -> RunArtifacts:
    """Read and check a finished run directory (as ``fedcare simulate`` writes it).

    Raises
    ------
    ConfigError
        Not a directory, a file missing or unreadable, or a site folder gone; the message
        names the path and the fix.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir}: no such run directory; pass the --out folder of a finished "
            "`fedcare simulate` run"
        )
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(
            f"{run_dir}: not a run directory (no {CONFIG_FILE}); pass the --out folder of a "
            "`fedcare simulate` run"
        )
    federation = _read_toml(config_path).get("federation")
    if not isinstance(federation, dict):
        raise ConfigError(f"{config_path}: no [federation] table; rerun the simulation")
    config = FederationConfig.from_run_config(federation, source=str(config_path))
    summary = load_summary(run_dir / SUMMARY_FILE)

    model_path = run_dir / FINAL_MODEL_NAME
    if not model_path.is_file():
        raise ConfigError(
            f"{model_path}: no final model; the run did not finish. Finish it with "
            f"`fedcare simulate --resume --out {run_dir}` before attacking it"
        )
    try:
        payload = torch.load(model_path, weights_only=True, map_location="cpu")
        model_name, task, state = payload["model"], payload["task"], payload["state_dict"]
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as e:
        raise ConfigError(
            f"{model_path}: not a fedcare final model ({type(e).__name__}: {e}); rerun the "
            "simulation"
        ) from e

    sites_path = run_dir / SITES_FILE
    try:
        listed = json.loads(sites_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{sites_path}: cannot read the list of site folders ({e}); rerun the simulation"
        ) from e
    folders = tuple(Path(p) for p in listed)
    gone = [str(f) for f in folders if not f.is_dir()]
    if gone:
        raise ConfigError(
            f"site folder(s) {', '.join(gone)} listed in {sites_path} are gone; the attacks "
            "need each site's data to rebuild its train / held-out split. Restore them (or "
            "regenerate them with the same `fedcare data synth` seed and settings)"
        )
    return RunArtifacts(
        run_dir=run_dir,
        config=config,
        summary=summary,
        site_dirs=folders,
        model_name=str(model_name),
        task=str(task),
        state_dict=dict(state),
    )
