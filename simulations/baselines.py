"""Reference points for a federated run: every site alone, and all data pooled.

* **local-only**: each site trains on its own data for the same budget as the federation
  (rounds x local epochs, the same DP target), and is evaluated on its own splits. It uses a
  throwaway ledger per site under ``ledger_dir``: a simulation's baseline must not spend the
  site's real budget (in a real hospital, a local-only model would spend real budget).
* **pooled**: the centralized, non-private reference: one model trained on the union of the
  sites' train splits and evaluated on the union of their test splits. Each site's rows are
  encoded with that site's own train-fitted encoders, exactly as in the federation, so the
  comparison isolates where the data sits, not how it was preprocessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from client.data.site import SiteData
from client.ledger import PrivacyLedger
from client.local import RoundRequest, SiteTrainer
from client.policy import SitePolicy
from client.privacy import DPConfig
from client.training import TrainConfig, fit, make_optimizer, predict, resolve_device
from models import binary_metrics, build_model
from models.tasks import task_definition

__all__ = ["local_only", "pooled"]


def local_only(
    sites: Sequence[SiteData],
    *,
    task: str,
    train: TrainConfig,
    dp: DPConfig,
    rounds: int,
    ledger_dir: Path,
    seed: int = 0,
    policy: SitePolicy | None = None,
) -> dict[str, dict[str, float]]:
    """Each site trained alone; site id -> its validation and test metrics."""
    results: dict[str, dict[str, float]] = {}
    for site in sites:
        site_policy = policy or SitePolicy(
            epsilon_budget=dp.target_epsilon or 10.0,
            delta=dp.delta,
            accountant=dp.accountant,
            require_dp=dp.enabled,
            max_local_epochs=max(train.epochs, 1),
        )
        ledger = None
        if dp.enabled:
            path = ledger_dir / site.spec.site_id / "ledger.sqlite"
            path.unlink(missing_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            ledger = PrivacyLedger(path)
        trainer = SiteTrainer(site=site, policy=site_policy, ledger=ledger, seed=seed)
        state = None
        for rnd in range(1, rounds + 1):
            request = RoundRequest(
                run_id="baseline-local-only",
                round=rnd,
                rounds_planned=rounds,
                task=task,
                train=train,
                dp=dp,
            )
            state = trainer.train_round(request, state).state
        results[site.spec.site_id] = trainer.evaluate(
            task, state, model=train.model, device=train.device
        )
    return results


def pooled(
    sites: Sequence[SiteData],
    *,
    task: str,
    train: TrainConfig,
    rounds: int,
    seed: int = 0,
) -> dict[str, float]:
    """One non-private model on all sites' train data; metrics on all their test data."""
    trainers = [
        SiteTrainer(site=s, policy=SitePolicy(require_dp=False), ledger=None, seed=seed)
        for s in sites
    ]
    data = [t.task_data(task) for t in trainers]
    train_set = ConcatDataset([d.train for d in data])
    device = resolve_device(train.device)
    name = trainers[0].model_name(task, train.model)
    definition = task_definition(data[0].task, model=name)
    model = build_model(
        name, input_dims=data[0].input_dims, generator=torch.Generator().manual_seed(seed)
    ).to(device)
    loader = DataLoader(
        train_set,
        batch_size=train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    fit(
        model,
        loader,
        optimizer=make_optimizer(model.parameters(), train),
        criterion=definition.kind.make_loss(),
        epochs=rounds * train.epochs,
        device=device,
    )
    out: dict[str, float] = {}
    for split in ("val", "test"):
        y, p = predict(model, ConcatDataset([d.dataset(split) for d in data]), device=device)
        for metric, value in binary_metrics(y, p).items():
            out[f"{split}.{metric}"] = float(value)
    return out
