"""Genomics: a patients x genes log-expression matrix with driver genes and batch effects.

The biology (gene means ``mu_g``, factor loadings ``L_g``, residual sds ``sigma_g`` and the
six driver genes) is federation-wide and drawn from the run's seed alone; every site
shares it. A site's sequencing batch then shifts and scales each gene around its mean:
``observed_g = mu_g + shift_sg + scale_sg * (x_g - mu_g)`` with
``shift_sg ~ N(0, 0.4)`` and ``scale_sg = exp(N(0, 0.15))``. Values are rounded to four
decimals and clipped to ``[0, 20]`` (the schema range).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcare.common.spec import GenomicsSchema

__all__ = [
    "N_DRIVERS",
    "N_FACTORS",
    "GeneBiology",
    "SiteBatch",
    "draw_biology",
    "draw_batch",
    "draw_expression",
    "driver_scores",
    "apply_batch",
    "genomics_schema",
]

N_DRIVERS = 6
N_FACTORS = 5
EXPR_MIN, EXPR_MAX = 0.0, 20.0


@dataclass(frozen=True)
class GeneBiology:
    """Federation-wide gene parameters (see the module docstring of ``latent``)."""

    names: tuple[str, ...]
    mu: np.ndarray  # (genes,)
    loadings: np.ndarray  # (genes, factors)
    sigma: np.ndarray  # (genes,)
    drivers: tuple[int, ...]  # column indices of d_0..d_5

    @property
    def sd(self) -> np.ndarray:
        """Exact population sd of each gene's clean log-expression."""
        return np.sqrt((self.loadings**2).sum(axis=1) + self.sigma**2)

    @property
    def driver_names(self) -> tuple[str, ...]:
        return tuple(self.names[j] for j in self.drivers)


@dataclass(frozen=True)
class SiteBatch:
    """One site's per-gene batch shift and scale."""

    shift: np.ndarray
    scale: np.ndarray


def draw_biology(rng: np.random.Generator, *, n_genes: int) -> GeneBiology:
    """Draw the shared gene parameters; drivers sit at random positions."""
    width = max(4, len(str(n_genes)))
    names = tuple(f"GENE{j:0{width}d}" for j in range(1, n_genes + 1))
    mu = rng.uniform(3.0, 10.0, size=n_genes)
    loadings = rng.normal(0.0, 0.5, size=(n_genes, N_FACTORS))
    sigma = rng.uniform(0.3, 0.8, size=n_genes)
    drivers = tuple(int(j) for j in rng.choice(n_genes, size=N_DRIVERS, replace=False))
    return GeneBiology(names=names, mu=mu, loadings=loadings, sigma=sigma, drivers=drivers)


def draw_batch(rng: np.random.Generator, *, n_genes: int) -> SiteBatch:
    """Draw one site's batch effect."""
    return SiteBatch(
        shift=rng.normal(0.0, 0.4, size=n_genes),
        scale=np.exp(rng.normal(0.0, 0.15, size=n_genes)),
    )


def draw_expression(rng: np.random.Generator, bio: GeneBiology, *, n: int) -> np.ndarray:
    """Clean log-expression ``x = mu + L f + sigma z`` for ``n`` patients (n x genes)."""
    factors = rng.standard_normal((n, bio.loadings.shape[1]))
    noise = rng.standard_normal((n, len(bio.mu)))
    return bio.mu + factors @ bio.loadings.T + noise * bio.sigma


def driver_scores(bio: GeneBiology, clean: np.ndarray) -> np.ndarray:
    """Standard scores ``u_j`` of the driver genes (n x 6), from clean expression."""
    idx = list(bio.drivers)
    return (clean[:, idx] - bio.mu[idx]) / bio.sd[idx]


def apply_batch(bio: GeneBiology, batch: SiteBatch, clean: np.ndarray) -> np.ndarray:
    """What the site's sequencer reports: batched, rounded to 4 decimals, clipped."""
    observed = bio.mu + batch.shift + batch.scale * (clean - bio.mu)
    return np.clip(np.round(observed, 4), EXPR_MIN, EXPR_MAX)


def genomics_schema(bio: GeneBiology) -> GenomicsSchema:
    """The schema entry: expression features in column order."""
    return GenomicsSchema(kind="expression", features=bio.names, min=EXPR_MIN, max=EXPR_MAX)
