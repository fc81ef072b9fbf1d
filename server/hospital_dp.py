"""Hospital-level differential privacy: clip each site's update, noise their uniform mean.

With ``hospital-dp-noise`` z > 0 a run's strategy is wrapped in :class:`HospitalDP`
(:func:`fedcare.server.strategies.build_strategy`). Each round it

1. takes each valid reply's update Δ_k = x_k - g against the model g the round sent
   (float64, all tensors together);
2. clips it to L2 norm at most C = ``hospital-dp-clip``: Δ_k · min(1, C / ‖Δ_k‖), a zero
   update staying zero;
3. averages the clipped updates *uniformly* over the n replies actually received (not over
   the sites the round was sent to, and not weighted by patients);
4. adds Gaussian noise N(0, σ²), σ = z C / n, to every coordinate of that mean, drawn from
   the wrapper's :class:`numpy.random.Generator`;
5. returns g + the noisy mean in g's dtypes and packing (McMahan et al. 2018, "Learning
   Differentially Private Recurrent Language Models", the Gaussian mechanism on a mean of
   clipped updates).

What the noise protects: one whole hospital. Between two federations that differ only in
one hospital's update, that hospital replaced by a zero update (it sends back the model it
received) and n the same, the mean in step 3 moves by at most C / n, so σ = z C / n gives
each hospital noise multiplier z in every round (a hospital whose update is replaced by any
other update moves it by up to 2 C / n: multiplier z / 2). Flower's
``DifferentialPrivacyServerSideFixedClipping`` does not give this: it divides by a zero
update's norm, lets the wrapped strategy weight by patients (at 99:1 one hospital moves the
mean by 0.99 C), and calibrates for the sites the round was sent to whatever number
answered. Only a mean has sensitivity C / n: a median, a trimmed mean, Krum's choice or a
server optimizer's step does not, which is why ``build_strategy`` offers hospital-level DP
with :data:`MEAN_STRATEGIES` only.

What it does not protect: the centre applies it. A malicious centre can skip it, and a
curious one sees every site's update before any noise; the protection a hospital keeps
whatever the centre does is record-level DP-SGD at the site. The round's training metrics
(the wrapped strategy's, e.g. the patient-weighted training loss) are not noised.

The noise comes from OS entropy by default (``numpy.random.default_rng()``), never from the
run config's ``seed`` nor from numpy's global state: noise that anyone can regenerate can
be subtracted. A test injects a seeded generator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import is_packed, layout_of, pack_record, unpack_record
from fedcare.server.update_checks import validate_update

__all__ = [
    "MEAN_STRATEGIES",
    "HospitalDP",
    "HospitalDPRound",
    "check_hospital_dp",
    "clip_update",
    "noise_std",
    "noisy_mean_update",
]

log = logging.getLogger(__name__)

#: The strategies (run config ``strategy``) hospital-level DP may wrap: those whose server
#: step is a mean of the sites' models, so one hospital moves it by at most C / n.
#: FedProx changes only the sites' local objective.
MEAN_STRATEGIES = ("fedavg", "fedprox")

Arrays = dict[str, np.ndarray]


def check_hospital_dp(cfg: FederationConfig) -> None:
    """Refuse a run config that asks for hospital-level DP (``hospital-dp-noise`` > 0) with a
    strategy that is not one of :data:`MEAN_STRATEGIES`.

    Raises
    ------
    ConfigError
        One line: the strategy, why (its per-hospital sensitivity is not C / n), the fix.
    """
    if cfg.hospital_dp_noise > 0 and cfg.strategy not in MEAN_STRATEGIES:
        raise ConfigError(
            f"hospital-dp-noise = {cfg.hospital_dp_noise:g} with strategy {cfg.strategy!r}: "
            "hospital-level DP noises a uniform mean of n updates clipped to hospital-dp-clip "
            "C with std noise x C / n, which protects each hospital only where one hospital "
            "moves the aggregate by at most C / n; the per-hospital sensitivity of a median, a "
            "trimmed mean, Krum's choice, a server optimizer's step or a registered strategy "
            "is not C / n. Fix: use strategy = 'fedavg' or 'fedprox', or hospital-dp-noise = 0"
        )


@dataclass(frozen=True)
class HospitalDPRound:
    """What one round's release used: the round, the n updates averaged, how many of them
    were clipped, and the noise's standard deviation σ = z C / n per coordinate."""

    server_round: int
    n: int
    clipped: int
    std: float


def noise_std(*, noise_multiplier: float, clipping_norm: float, n: int) -> float:
    """σ = z C / n: the Gaussian mechanism's noise on a uniform mean of ``n`` updates, each
    clipped to ``clipping_norm`` C, for noise multiplier z per hospital.

    Examples
    --------
    >>> noise_std(noise_multiplier=1.0, clipping_norm=2.0, n=4)
    0.5
    """
    if n < 1:
        raise ValueError(f"the noise is calibrated for n >= 1 updates, got n = {n}")
    return noise_multiplier * clipping_norm / n


def clip_update(delta: Mapping[str, np.ndarray], *, clipping_norm: float) -> tuple[Arrays, bool]:
    """``delta`` (float64) scaled to L2 norm at most ``clipping_norm`` over all its arrays
    together, and whether it was scaled. A zero update stays zero (nothing is divided by a
    zero norm).

    Examples
    --------
    >>> clipped, scaled = clip_update({"w": np.array([3.0, 4.0])}, clipping_norm=1.0)
    >>> clipped["w"].tolist(), scaled
    ([0.6000000000000001, 0.8], True)
    >>> clip_update({"w": np.zeros(2)}, clipping_norm=1.0)[0]["w"].tolist()
    [0.0, 0.0]
    """
    out = {k: np.asarray(v, np.float64) for k, v in delta.items()}
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in out.values()))
    if not math.isfinite(norm):
        raise ValueError("an update holds a NaN or an infinity; it cannot be clipped")
    if norm <= clipping_norm:
        return out, False
    scale = clipping_norm / norm
    return {k: v * scale for k, v in out.items()}, True


def noisy_mean_update(
    deltas: Sequence[Mapping[str, np.ndarray]],
    *,
    noise_multiplier: float,
    clipping_norm: float,
    rng: np.random.Generator,
) -> tuple[Arrays, int, float]:
    """The uniform mean of ``deltas`` each clipped to ``clipping_norm`` C, plus N(0, σ²)
    noise per coordinate, σ = z C / n for the n = ``len(deltas)`` updates averaged.

    Returns
    -------
    tuple
        The noisy mean update (float64, in the first update's array order), how many
        updates were clipped, and σ. The noise is drawn array by array in that order.
    """
    n = len(deltas)
    std = noise_std(noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, n=n)
    names = list(deltas[0])
    total = {k: np.zeros(np.shape(deltas[0][k]), np.float64) for k in names}
    n_clipped = 0
    for delta in deltas:
        bounded, scaled = clip_update(delta, clipping_norm=clipping_norm)
        n_clipped += scaled
        for k in names:
            total[k] += bounded[k]
    out = {}
    for k in names:
        mean = total[k] / n
        out[k] = mean + rng.normal(0.0, std, size=mean.shape) if std > 0 else mean
    return out, n_clipped, std


class HospitalDP(Strategy):
    """Hospital-level DP around a mean strategy (see the module docstring).

    Parameters
    ----------
    strategy:
        The strategy wrapped (kept in ``.strategy``, so
        :func:`fedcare.server.strategies.inner_strategy` looks through this wrapper). It
        configures every round and aggregates evaluation; of its ``aggregate_train`` only the
        metrics are kept: the model is this wrapper's uniform noisy mean.
    noise_multiplier:
        z >= 0: the noise's standard deviation is z C / n.
    clipping_norm:
        C > 0: each update's L2 norm bound, over all its tensors.
    rng:
        Where the noise comes from; ``None``: ``numpy.random.default_rng()`` (OS entropy).
        Inject a seeded generator in tests only.

    Attributes
    ----------
    last_round:
        What the last released round used (:class:`HospitalDPRound`), ``None`` before one.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if not (math.isfinite(clipping_norm) and clipping_norm > 0):
            raise ValueError(f"clipping_norm must be finite and > 0, got {clipping_norm}")
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.rng = np.random.default_rng() if rng is None else rng
        self.last_round: HospitalDPRound | None = None
        self._sent: Arrays = {}
        self._sent_packed = False
        self._sent_round: int | None = None

    def __repr__(self) -> str:
        return (
            f"HospitalDP({self.strategy!r}, noise_multiplier={self.noise_multiplier}, "
            f"clipping_norm={self.clipping_norm})"
        )

    def summary(self) -> None:
        log.info(
            "hospital-level DP: updates clipped to %g, noise %g x clip / (updates averaged)",
            self.clipping_norm,
            self.noise_multiplier,
        )
        self.strategy.summary()

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = unpack_record(arrays)
        self._sent_packed = any(is_packed(name) for name in arrays)
        self._sent_round = server_round
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent_round != server_round:
            raise RuntimeError(
                f"aggregate_train for round {server_round}, but the model was sent for round "
                f"{self._sent_round}: configure_train must come first"
            )
        replies = list(replies)
        deltas = [self._update_of(reply) for reply in replies if not reply.has_error()]
        if not deltas:
            log.warning("round %s: no valid update; nothing is released", server_round)
            return None, None
        mean, n_clipped, std = noisy_mean_update(
            deltas,
            noise_multiplier=self.noise_multiplier,
            clipping_norm=self.clipping_norm,
            rng=self.rng,
        )
        self.last_round = HospitalDPRound(server_round, len(deltas), n_clipped, std)
        log.info(
            "round %s: hospital-level DP: mean of %d update(s) (%d clipped to %g), noise std %g",
            server_round,
            len(deltas),
            n_clipped,
            self.clipping_norm,
            std,
        )
        _, metrics = self.strategy.aggregate_train(server_round, replies)  # metrics only
        return self._release(mean), metrics

    def _update_of(self, reply: Message) -> Arrays:
        """The reply's update against the model sent, float64; its arrays checked first."""
        records = list(reply.content.array_records.values())
        if len(records) != 1:
            raise ValueError(
                f"a reply carries {len(records)} array records; hospital-level DP expects one"
            )
        model = unpack_record(records[0])
        validate_update(model, self._sent)  # names, shapes, dtypes, finite values
        return {
            k: np.asarray(model[k], np.float64) - np.asarray(sent, np.float64)
            for k, sent in self._sent.items()
        }

    def _release(self, mean: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The model sent plus ``mean``, in the sent model's dtypes, packing and order."""
        out = {}
        for name, sent in self._sent.items():
            value = np.asarray(sent, np.float64) + mean[name]
            if np.issubdtype(sent.dtype, np.integer):
                value = np.rint(value)
            out[name] = value.astype(sent.dtype)
        if self._sent_packed:
            return pack_record(out, layout=layout_of(self._sent))
        return ArrayRecord({name: Array(value) for name, value in out.items()})

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
