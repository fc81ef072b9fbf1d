"""The local-training recipe: what a site trains with when the run leaves it to the recipe.

A run config's ``optimizer = "auto"``, ``batch-size = 0`` and ``learning-rate = 0`` (the
defaults) mean "the recipe's"; any other value is used as given. The recipe is a fixed rule
of what the site knows before it trains -- whether the run is private, its number of
training patients, the model the run names -- so nothing is tuned on the site's data:
choosing it is no query and costs no privacy.

Why these choices (evidence: ``benchmarks/utility.py`` and the README's utility table, on
the UCI Heart Disease hospitals and on synthetic hospitals; DP-SGD practice, e.g. Ponomareva
et al. 2023, "How to DP-fy ML"):

* **Private: SGD with momentum 0.9 at a large rate (0.3), not Adam.** Under DP each step's
  gradient is mostly noise; Adam divides by its running second moment, i.e. by the noise, so
  at 3e-3 a few dozen noisy steps barely moved the weights (demo: balanced accuracy 0.500 in
  every round, AUROC 0.58). Clipping bounds every patient's gradient by ``max-grad-norm``
  (1.0), so the step is ``lr x`` (mean clipped gradient + noise): momentum SGD at a large
  rate averages the noise over steps and moves the weights by the signal (demo AUROC 0.72 at
  ε = 8 with the same budget).
* **Private: a batch of about a quarter of the site's training patients**
  (``n // STEPS_PER_EPOCH``, within [:data:`MIN_BATCH`, :data:`MAX_BATCH`]: 4 or 5 Poisson
  steps per epoch, since one epoch is ``ceil(n / batch)`` steps).
  The noise on the mean gradient is divided by the batch size while the noise multiplier
  needed for the same ε grows far more slowly; a fixed 64 left a small hospital with a few
  very noisy steps and a large one with many.
* **Not private: Adam at 3e-3, batch 64.** Without per-patient clipping the large SGD rate
  diverges on the fusion model (pooled AUROC 0.46 against 0.84 with Adam); Adam is the
  robust default for unclipped gradients.
* **1 local epoch, 10 rounds** (``common/federation.py``): more rounds of fewer local steps
  keep the sites' models from drifting apart (the hospitals differ), at the same number of
  noisy steps, which is what ε pays for.

Examples
--------
>>> batch_size_for(210, private=True)
52
>>> batch_size_for(30, private=True), batch_size_for(5000, private=True)
(16, 256)
>>> batch_size_for(210, private=False)
64
>>> optimizer_for(private=True), learning_rate_for("sgd")
('sgd', 0.3)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from fedcare.common.errors import ConfigError

__all__ = [
    "AUTO",
    "STEPS_PER_EPOCH",
    "MIN_BATCH",
    "MAX_BATCH",
    "PLAIN_BATCH",
    "LEARNING_RATES",
    "optimizer_for",
    "batch_size_for",
    "learning_rate_for",
]

AUTO = 0
"""A run-config ``batch-size`` or ``learning-rate`` of 0: the recipe's value."""

STEPS_PER_EPOCH = 4
MIN_BATCH = 16
MAX_BATCH = 256
PLAIN_BATCH = 64
"""The batch size of a non-private run."""

LEARNING_RATES: Mapping[str, float] = MappingProxyType({"sgd": 0.3, "adam": 3e-3})
"""The recipe's learning rate by optimizer. One rate serves every bundled model, measured on
the EHR MLP (demo sites and UCI Heart Disease: 0.3, 0.1 at batch 32 and 0.5 at batch 128 all
within 0.01 AUROC at ε = 8) and on the fusion model (the multimodal demo at ε = 8: 0.72 with
this recipe; 0.58-0.61 with SGD at 0.1-0.3 on batches of 32-64 for 5 rounds, 0.48 with Adam at
0.03, 0.58 with Adam at 3e-3). A model that needs its own rate gets a per-model entry here,
with its measurement."""


def optimizer_for(*, private: bool) -> str:
    """``"sgd"`` (momentum 0.9) for a private run, ``"adam"`` for a non-private one."""
    return "sgd" if private else "adam"


def batch_size_for(n_train: int, *, private: bool) -> int:
    """The (expected) batch size for a site with ``n_train`` training patients.

    Private: about ``n_train / STEPS_PER_EPOCH``, rounded down, within ``[MIN_BATCH,
    MAX_BATCH]``. Not private: :data:`PLAIN_BATCH`. Never more than ``n_train`` once a site
    has any patients.
    """
    if n_train < 0:
        raise ConfigError(f"a site cannot have {n_train} training patients")
    quarter = min(max(n_train // STEPS_PER_EPOCH, MIN_BATCH), MAX_BATCH)
    batch = quarter if private else PLAIN_BATCH
    return max(1, min(batch, n_train)) if n_train else batch


def learning_rate_for(optimizer: str) -> float:
    """The recipe's learning rate for ``optimizer``."""
    if optimizer not in LEARNING_RATES:
        raise ConfigError(
            f"the recipe has no learning rate for optimizer {optimizer!r}; use one of "
            f"{sorted(LEARNING_RATES)} or set learning-rate"
        )
    return LEARNING_RATES[optimizer]
