"""Tiny synthetic federations and attack targets for the attack tests (no Flower)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from fedcare.client.accounting import Mechanism, calibrate_noise, epsilon
from fedcare.client.data.datasets import TaskData, build_task_data
from fedcare.client.data.loaders import load_site
from fedcare.client.dpsgd import DPPlan, sampling
from fedcare.client.training import TrainConfig
from fedcare.models import build_model
from fedcare.models.tasks import task_definition
from fedcare.simulations.audit.attacks import AttackTarget, SiteMechanism, example_losses
from fedcare.simulations.synth import SynthConfig, synthesize

TASK = "drug_response"
MODEL = "genomics_mlp"
DELTA = 1e-5
CPU = torch.device("cpu")
FAKE_SIGMA = 2.0


def tiny_federation(
    root: Path, *, sites: int = 3, patients: int = 200, seed: int = 0, genes: int = 100
) -> dict[str, TaskData]:
    """Synthesize ``sites`` small hospitals and build their task data."""
    config = SynthConfig(
        patients_per_site=patients,
        n_genes=genes,
        image_size=16,
        image_format="npy",
        table_format="csv",
    )
    folders = synthesize(root, n_sites=sites, seed=seed, config=config)
    datas = [build_task_data(load_site(f), TASK, seed=0) for f in folders]
    return {d.site_id: d for d in datas}


def factory(data: TaskData) -> Callable[[torch.Generator], nn.Module]:
    """Fresh-model factory of the fixtures' model for ``data``'s inputs."""
    dims = dict(data.input_dims)

    def build(generator: torch.Generator) -> nn.Module:
        return build_model(MODEL, input_dims=dims, generator=generator)

    return build


def plain_mechanism(
    *, epochs: int, rounds: int = 1, lr: float = 1e-2, batch_size: int = 32
) -> SiteMechanism:
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, device="cpu")
    return SiteMechanism(train=train, rounds=rounds, plans=None, model_name=MODEL)


def dp_mechanism(
    n_train: int,
    *,
    target_epsilon: float,
    epochs: int,
    rounds: int = 1,
    lr: float = 1e-2,
    batch_size: int = 32,
    max_grad_norm: float = 1.0,
) -> tuple[SiteMechanism, float]:
    """A DP-SGD mechanism calibrated (RDP) to ``target_epsilon``, and its ε (RDP)."""
    q, steps = sampling(n_train, batch_size=batch_size, epochs=epochs)
    sigma = calibrate_noise(
        target_epsilon=target_epsilon,
        delta=DELTA,
        sample_rate=q,
        steps=steps * rounds,
        accountant="rdp",
    )
    plans = tuple(DPPlan(sigma, q, steps, max_grad_norm) for _ in range(rounds))
    claimed = epsilon([Mechanism(sigma, q, steps * rounds)], delta=DELTA, accountant="rdp")
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, device="cpu")
    return SiteMechanism(train=train, rounds=rounds, plans=plans, model_name=MODEL), claimed


def target_for(
    datas: dict[str, TaskData], site_id: str, model: nn.Module, mechanism: SiteMechanism
) -> AttackTarget:
    """The attack target of ``site_id`` under ``model`` (population: the other sites)."""
    data = datas[site_id]
    kind = task_definition(data.task, model=MODEL).kind
    nonmembers: Dataset[Any] = ConcatDataset([data.val, data.test])
    others: list[Dataset[Any]] = [
        ConcatDataset([d.train, d.val, d.test]) for s, d in datas.items() if s != site_id
    ]
    return AttackTarget(
        site_id=site_id,
        members=data.train,
        nonmembers=nonmembers,
        member_losses=example_losses(model, data.train, kind=kind, device=CPU),
        nonmember_losses=example_losses(model, nonmembers, kind=kind, device=CPU),
        population=ConcatDataset(others) if others else None,
        build_model=factory(data),
        kind=kind,
        mechanism=mechanism,
        device=CPU,
    )


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC estimate (Hanley and McNeil 1982)."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return float(np.sqrt(max(var, 0.0)))


@functools.lru_cache(maxsize=8)
def _fake_epsilon(q: float, steps: int) -> float:
    return epsilon([Mechanism(FAKE_SIGMA, q, steps)], delta=DELTA, accountant="rdp")


def fake_run_dir(
    out: Path, sites_root: Path, datas: dict[str, TaskData], *, dp: bool, epochs: int = 2
) -> Path:
    """A finished run directory as ``fedcare simulate`` leaves it, without running Flower.

    ``sites_root`` holds the site folders and ``datas`` their task data (both from
    :func:`tiny_federation`).

    ``config.toml``, ``sites.json``, ``summary.json`` (each site's mechanism: the batch-32
    Poisson rate 1/4, ``epochs`` epochs, σ = :data:`FAKE_SIGMA`, ε by RDP) and
    ``final_model.pt`` (freshly initialised weights: the CLI's mechanics do not need a
    trained model).
    """
    import json

    import tomli_w

    from fedcare.common.federation import FederationConfig
    from fedcare.common.summary import RunSummary, write_summary

    out.mkdir(parents=True, exist_ok=True)
    cfg = FederationConfig(
        task=TASK,
        num_server_rounds=1,
        local_epochs=epochs,
        batch_size=32,
        learning_rate=1e-2,
        dp=dp,
        target_epsilon=2.0,
        target_delta=DELTA,
        accountant="rdp",
        run_id="fake-0",
        run_dir=str(out),
        sites_manifest=str(out / "sites.json"),
        device="cpu",
    )
    (out / "config.toml").write_text(
        tomli_w.dumps({"scenario": {"name": "fake"}, "federation": cfg.to_run_config()}),
        encoding="utf-8",
    )
    folders = sorted(p for p in sites_root.iterdir() if (p / "site.toml").is_file())
    (out / "sites.json").write_text(json.dumps([str(f) for f in folders]), encoding="utf-8")
    sites = []
    for site_id, data in sorted(datas.items()):
        privacy: dict = {"enabled": dp}
        if dp:  # every site at q = 1/4 (any rate the site's size allows will do)
            q, steps = 0.25, 4 * epochs
            claimed = _fake_epsilon(q, steps)
            privacy = {
                "enabled": True,
                "epsilon": claimed,
                "delta": DELTA,
                "accountant": "rdp",
                "mechanisms": [{"noise_multiplier": FAKE_SIGMA, "sample_rate": q, "steps": steps}],
            }
        sites.append(
            {
                "site_id": site_id,
                "n_train": data.n["train"],
                "n_test": data.n["test"],
                "status": "completed",
                "rounds_participated": [1],
                "privacy": privacy,
            }
        )
    summary = RunSummary.model_validate(
        {
            "run_id": "fake-0",
            "fedcare_version": "0.1.0",
            "flwr_version": "1.42.0",
            "task": TASK,
            "strategy": "fedavg",
            "rounds_planned": 1,
            "rounds_completed": 1,
            "sites": sites,
            "global": {},
        }
    )
    write_summary(summary, out / "summary.json")
    data = next(iter(datas.values()))
    model = factory(data)(torch.Generator().manual_seed(0))
    torch.save(
        {"model": MODEL, "task": TASK, "state_dict": model.state_dict()}, out / "final_model.pt"
    )
    return out
