"""Reference points for a federated run: every site alone, and all data pooled.

Both are orchestration over the pieces the federation itself uses (``SiteTrainer``,
``build_task_data``, ``fedcare.client.training.fit``); there is no second training loop. Both split
each site's patients with the same seed as the federation, so every site's val and test
patients are the ones the federated model is evaluated on.

* :func:`local_only`: each site trains alone for the federation's budget -- ``rounds`` rounds
  of ``train.epochs`` local epochs, and with DP the same target ε, calibrated for the whole
  run -- and is evaluated on its own val and test splits. The privacy accounting runs on a
  **throwaway ledger** per site, a new file in a new folder under ``ledger_dir``: a
  simulation's baseline must never charge (or read) the site's real ledger. In a real
  deployment a local-only model *would* spend real budget, and a site wanting one would train
  it through its own ledger.
* :func:`pooled`: the centralized, **non-private** reference: one model trained on the union
  of the sites' train splits and evaluated on the union of their val and test splits. Each
  site's rows are encoded with that site's own train-fitted encoders, exactly as in the
  federation (encoders are never refitted on the pooled train split), so the comparison
  isolates where the data sits, not how it was preprocessed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from fedcare.client.data.datasets import TaskData
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig, fit, make_optimizer, predict, resolve_device
from fedcare.common.errors import ConfigError
from fedcare.common.run_files import LEDGER_NAME
from fedcare.models import build_model
from fedcare.models.metrics import split_metrics
from fedcare.models.survival import SurvivalTask

__all__ = ["LOCAL_ONLY_RUN_ID", "local_only", "pooled"]

LOCAL_ONLY_RUN_ID = "baseline-local"
"""The run id the local-only baseline charges its throwaway ledgers under."""

_EVAL_SPLITS = ("val", "test")


def local_only(
    sites: Sequence[SiteData],
    *,
    task: str,
    train: TrainConfig,
    dp: DPConfig,
    rounds: int,
    policy: SitePolicy,
    seed: int = 0,
    ledger_dir: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Train every site alone for the federation's budget; its metrics on its own splits.

    Each site runs ``rounds`` calls of :meth:`SiteTrainer.train_round` under run id
    :data:`LOCAL_ONLY_RUN_ID`, carrying its own weights from one round to the next (a fresh
    optimizer each round, as in the federation). With DP on, the noise is calibrated once for
    ``rounds`` rounds against an empty history, so the site ends at ``dp.target_epsilon``
    (capped by the policy's budget) exactly as a first federated run would.

    Parameters
    ----------
    sites:
        The loaded sites (unique site ids).
    task:
        A task every site's ``site.toml`` declares.
    train, dp:
        The federation's local training and DP settings.
    rounds:
        The federation's number of rounds (>= 1).
    seed:
        Split, initialisation, batch-sampling and noise seed (the federation's seed, so the
        splits match it).
    policy:
        The policy every site applies: a simulated site's, built by
        :func:`fedcare.client.policy.simulated_site_policy` from the run's config, so the
        baseline enforces exactly what the federation's sites enforce.
    ledger_dir:
        Where the throwaway ledgers go: each call makes a new folder
        ``ledger_dir/local-only-*/`` holding ``<site_id>/ledger.sqlite`` and the stored
        releases, and leaves it there for inspection. It must not lie inside a site's data
        folder. ``None``: a temporary folder, deleted before returning. Unused without DP.

    Returns
    -------
    dict[str, dict[str, float]]
        Site id -> ``SiteTrainer.evaluate`` metrics: ``"val.auroc"``, ``"test.auroc"``,
        ``"test.n"``, ... (a split smaller than the policy's ``min_count`` is withheld).

    Raises
    ------
    ConfigError
        No sites, duplicate site ids, ``rounds < 1``, or ``ledger_dir`` inside a site folder.
    PolicyViolation, PrivacyBudgetExceeded
        As the site's policy and (throwaway) ledger would refuse the federation.
    """
    _check_sites(sites)
    _check_rounds(rounds)
    if dp.enabled and ledger_dir is not None:
        _check_outside_sites(Path(ledger_dir), sites)
    results: dict[str, dict[str, float]] = {}
    with _throwaway_ledgers(ledger_dir, needed=dp.enabled) as root:
        for site in sites:
            ledger = None
            if root is not None:
                ledger = PrivacyLedger(root / site.spec.site_id / LEDGER_NAME)
            trainer = SiteTrainer(site=site, policy=policy, ledger=ledger, seed=seed)
            state: Mapping[str, torch.Tensor] | None = None
            for rnd in range(1, rounds + 1):
                request = RoundRequest(
                    run_id=LOCAL_ONLY_RUN_ID,
                    round=rnd,
                    rounds_planned=rounds,
                    task=task,
                    train=train,
                    dp=dp,
                )
                state = trainer.train_round(request, state).state
            results[site.spec.site_id] = trainer.evaluate(
                task, state, model=train.model, splits=_EVAL_SPLITS, device=train.device
            )
    return results


def pooled(
    sites: Sequence[SiteData],
    *,
    task: str,
    train: TrainConfig,
    rounds: int,
    seed: int = 0,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One non-private model on every site's train split; metrics on the pooled splits.

    The model is trained by :func:`fedcare.client.training.fit` for ``rounds * train.epochs`` epochs
    (one optimizer throughout) over the concatenated train splits, shuffled by a generator
    seeded with ``seed``; there is no DP and no policy, since it is a reference that no real
    deployment could compute. Encoders stay per site (see the module docstring).

    Parameters
    ----------
    sites:
        The loaded sites (unique site ids).
    task:
        A task every site's ``site.toml`` declares.
    train:
        The federation's local training settings (``proximal_mu`` is ignored).
    rounds:
        The federation's number of rounds (>= 1).
    seed:
        Split, initialisation and shuffling seed.
    max_grad_norm:
        Each step's gradient is clipped to this norm (the federation's ``max-grad-norm``):
        the recipe's learning rate (:mod:`fedcare.client.recipe`, applied as if one site held every
        training patient) is tuned for clipped steps, and diverges without them.

    Returns
    -------
    dict[str, float]
        ``"val.<metric>"`` and ``"test.<metric>"`` of :func:`models.binary_metrics` on the
        union of the sites' val / test patients; ``"test.n"`` is the sum of their test sizes.

    Raises
    ------
    ConfigError
        No sites, duplicate site ids, ``rounds < 1``, or sites whose encoded inputs differ.
    """
    _check_sites(sites)
    _check_rounds(rounds)
    # Not a site's policy: the pooled reference trains no site's model and asks no site's
    # consent; its trainers only encode each site's data (SitePolicy's defaults, no DP).
    trainers = [
        SiteTrainer(site=s, policy=SitePolicy(require_dp=False), ledger=None, seed=seed)
        for s in sites
    ]
    data = [t.task_data(task) for t in trainers]
    _check_same_inputs(data)
    name = trainers[0].model_name(task, train.model)
    definition = trainers[0].definition(task, train.model)  # its kind: binary or survival
    # The recipe as one site holding every site's training patients would apply it.
    n_train = sum(len(d.patient_ids.train) for d in data)
    train = train.for_site(n_train=n_train, model=name, private=False)
    device = resolve_device(train.device)
    model = definition.kind.wrap(
        build_model(
            name, input_dims=data[0].input_dims, generator=torch.Generator().manual_seed(seed)
        )
    ).to(device)
    loader: DataLoader[Any] = DataLoader(
        ConcatDataset([d.train for d in data]),
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
        clip_norm=max_grad_norm,
    )
    ys, ps = {}, {}
    for split in _EVAL_SPLITS:
        union: ConcatDataset[Any] = ConcatDataset([d.dataset(split) for d in data])
        ys[split], ps[split] = predict(
            model, union, device=device, batch_size=train.eval_batch_size
        )
    if isinstance(definition.kind, SurvivalTask):  # IPCW from the pooled train patients
        targets = np.concatenate([d.train.y.numpy() for d in data])  # type: ignore[attr-defined]
        return {
            f"{split}.{k}": v
            for split in _EVAL_SPLITS
            for k, v in definition.kind.metrics(ys[split], ps[split], train=targets).items()
        }
    return split_metrics(ys, ps)


# ------------------------------------------------------------------ helpers


@contextmanager
def _throwaway_ledgers(ledger_dir: Path | None, *, needed: bool) -> Iterator[Path | None]:
    """A new, empty folder for this call's ledgers; ``None`` when no ledger is ``needed``."""
    if not needed:
        yield None
        return
    if ledger_dir is None:
        with tempfile.TemporaryDirectory(prefix="fedcare-local-only-") as tmp:
            yield Path(tmp)
        return
    ledger_dir = Path(ledger_dir)
    ledger_dir.mkdir(parents=True, exist_ok=True)
    yield Path(tempfile.mkdtemp(prefix="local-only-", dir=ledger_dir))


def _check_outside_sites(ledger_dir: Path, sites: Sequence[SiteData]) -> None:
    where = ledger_dir.resolve()
    for site in sites:
        root = Path(site.root).resolve()
        if where == root or root in where.parents:
            raise ConfigError(
                f"baseline ledger_dir {ledger_dir} lies inside site {site.spec.site_id}'s data "
                f"folder {site.root}, where a throwaway ledger could be taken for the site's "
                "real one; give a folder outside every site (e.g. the run's output folder)"
            )


def _check_sites(sites: Sequence[SiteData]) -> None:
    if not sites:
        raise ConfigError("a baseline needs at least one site; pass the loaded sites")
    ids = [s.spec.site_id for s in sites]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(
            f"site id(s) {', '.join(dupes)} appear more than once; every site must have its "
            "own site_id in site.toml"
        )


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")


def _check_same_inputs(data: Sequence[TaskData]) -> None:
    first = data[0]
    for other in data[1:]:
        if other.modalities != first.modalities or other.input_dims != first.input_dims:
            raise ConfigError(
                f"sites {first.site_id} and {other.site_id} encode task {first.task.name!r} "
                f"differently ({first.input_dims} vs {other.input_dims}); pooling needs one "
                "feature schema: give every site the same [schema] in site.toml"
            )
