"""Synthetic hospitals: EHR, imaging and genomics in the formats real sites hold.

``synthesize(out, n_sites=4)`` writes ``out/site-<i>/`` folders (each with a valid
``site.toml``), ``out/synth.json`` (manifest with the Bayes-optimal AUROC per task) and
``out/synth_truth.csv`` (true probabilities; never read by a site). The generative model is
documented in :mod:`fedcare.simulations.synth.latent` and :mod:`fedcare.simulations.synth.tasks`.
"""

from fedcare.simulations.synth.config import IMAGE_FORMATS, TABLE_FORMATS, SynthConfig
from fedcare.simulations.synth.generator import build_schema, synthesize
from fedcare.simulations.synth.manifest import MANIFEST_FILENAME, TRUTH_FILENAME
from fedcare.simulations.synth.tasks import TASKS

__all__ = [
    "SynthConfig",
    "IMAGE_FORMATS",
    "TABLE_FORMATS",
    "synthesize",
    "build_schema",
    "TASKS",
    "MANIFEST_FILENAME",
    "TRUTH_FILENAME",
]
