"""The local-training recipe (client/recipe.py): a rule of what the site knows, filled in
only where the run leaves a value to it, and defaults that learn under DP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedcare.client import recipe
from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig, sampling
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer, settings_from_run
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig, make_optimizer, predict
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.models import binary_metrics


@given(st.integers(min_value=1, max_value=100_000))
def test_a_private_batch_is_about_a_quarter_of_the_site_within_bounds(n: int) -> None:
    b = recipe.batch_size_for(n, private=True)
    assert 1 <= b <= min(n, recipe.MAX_BATCH)
    if recipe.MIN_BATCH * recipe.STEPS_PER_EPOCH <= n <= recipe.MAX_BATCH * recipe.STEPS_PER_EPOCH:
        assert b == n // recipe.STEPS_PER_EPOCH
    if n >= recipe.MIN_BATCH:
        assert b >= recipe.MIN_BATCH


def test_a_non_private_run_takes_adam_and_batch_64() -> None:
    cfg = TrainConfig(optimizer="auto", batch_size=0, lr=0)
    plain = cfg.for_site(n_train=500, model="ehr_mlp", private=False)
    assert (plain.optimizer, plain.batch_size, plain.lr) == ("adam", 64, 3e-3)
    private = cfg.for_site(n_train=500, model="ehr_mlp", private=True)
    assert (private.optimizer, private.batch_size, private.lr) == ("sgd", 125, 0.3)


def test_values_the_run_sets_are_kept() -> None:
    cfg = TrainConfig(optimizer="adam", batch_size=32, lr=0.05)
    assert cfg.for_site(n_train=500, model="fusion", private=True) == cfg
    only_lr = TrainConfig(optimizer="sgd", batch_size=32, lr=0).for_site(
        n_train=500, model="fusion", private=True
    )
    assert (only_lr.optimizer, only_lr.batch_size, only_lr.lr) == ("sgd", 32, 0.3)


def test_an_unresolved_config_never_reaches_an_optimizer() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="for_site"):
        make_optimizer(model.parameters(), TrainConfig(optimizer="auto", batch_size=0, lr=0))


def test_the_run_defaults_leave_optimizer_batch_and_rate_to_the_recipe() -> None:
    train, dp = settings_from_run(FederationConfig())
    assert (train.optimizer, train.batch_size, train.lr) == ("auto", 0, 0.0)
    assert dp.enabled and not train.resolved


# ------------------------------------------------------------------ it learns under DP

PATIENTS = 300  # a small hospital: about 210 training patients


@pytest.fixture(scope="module")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteData, float]:
    from fedcare.simulations.synth import MANIFEST_FILENAME, SynthConfig, synthesize

    root = tmp_path_factory.mktemp("recipe")
    config = SynthConfig(patients_per_site=PATIENTS, size_skew=0.0, table_format="csv")
    synthesize(root, n_sites=1, seed=7, config=config)
    manifest = json.loads((root / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    return load_site(root / "site-0"), float(manifest["tasks"]["readmission"]["bayes_auroc"])


def _train(site: SiteData, folder: Path, train: TrainConfig, rounds: int) -> tuple[float, float]:
    """Train ``rounds`` rounds alone at ε = 8 through the site's own machinery; the held-out
    AUROC and the ε the ledger reached."""
    # RDP: the quick accountant (the recipe does not depend on which one accounts).
    policy = SitePolicy(
        epsilon_budget=8.0, max_local_epochs=train.epochs, max_rounds=rounds, accountant="rdp"
    )
    trainer = SiteTrainer(
        site=site, policy=policy, ledger=PrivacyLedger(folder / "ledger.sqlite"), seed=0
    )
    dp = DPConfig(target_epsilon=8.0, accountant="rdp")
    state = None
    for r in range(1, rounds + 1):
        request = RoundRequest(
            run_id="recipe", round=r, rounds_planned=rounds, task="readmission", train=train, dp=dp
        )
        result = trainer.train_round(request, state)
        state = result.state
    assert state is not None and result.epsilon is not None and result.mechanism is not None
    resolved = trainer.with_recipe(request).train
    n_train = len(trainer.task_data("readmission").train)
    q, _ = sampling(n_train, batch_size=resolved.batch_size, epochs=1)
    assert result.mechanism.sample_rate == pytest.approx(q)
    model = trainer.build_model("readmission")
    model.load_state_dict(state)
    data = trainer.task_data("readmission")
    held = [predict(model, data.dataset(s), device=torch.device("cpu")) for s in ("val", "test")]
    y = np.concatenate([h[0] for h in held])
    p = np.concatenate([h[1] for h in held])
    return float(binary_metrics(y, p)["auroc"]), float(result.epsilon)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_defaults_learn_under_dp_where_the_old_ones_stalled(
    small_site: tuple[SiteData, float], tmp_path: Path
) -> None:
    """On a ~210-patient hospital at ε = 8 the run defaults (the recipe) recover most of the
    signal, more than the old defaults (Adam 3e-3, batch 64, 3 rounds of 2 epochs) did
    (measured: 0.82 against 0.78). The site's noise is reproducible (its simulated
    site.toml), so the outcome is fixed on a given platform; the margins leave room for
    another platform's arithmetic."""
    site, bayes = small_site
    cfg = FederationConfig()
    train, _ = settings_from_run(cfg)
    new, eps_new = _train(site, tmp_path / "new", train, cfg.num_server_rounds)
    old_train = TrainConfig(epochs=2, batch_size=64, lr=3e-3, optimizer="adam")
    old, eps_old = _train(site, tmp_path / "old", old_train, 3)
    assert math.isclose(eps_new, 8.0, rel_tol=0.01) and math.isclose(eps_old, 8.0, rel_tol=0.01)
    assert new >= 0.5 + 0.6 * (bayes - 0.5), f"recipe AUROC {new:.3f} (Bayes {bayes:.3f})"
    assert new >= old + 0.02, f"recipe {new:.3f} vs old defaults {old:.3f}"
