"""One site's part of a round: policy, privacy ledger, DP-SGD, evaluation.

:class:`SiteTrainer` is what the ClientApp (and the local-only baseline) calls. A round goes:

1. the site's policy vets the request (task, model, epochs, DP required);
2. the noise for the *whole run* is fixed once, at the run's first round, by calibrating
   against the dataset's durable history in the ledger; later rounds reuse it;
3. the round's mechanism is charged to the ledger and committed **before** training, so a
   crash never under-counts; over budget -> :class:`PrivacyBudgetExceeded`, nothing trained;
4. DP-SGD (Opacus, Poisson sampling) trains the model;
5. the released weights are stored at the site and the charge marked completed before they
   leave. If the server asks again for a round this site already released (a coordinating
   server that crashed and resumed), the stored release is sent again: replaying the same
   output costs no further privacy, and nothing is charged twice.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from client.accounting import Mechanism, calibrate_noise
from client.data.datasets import TaskData, build_task_data
from client.data.site import SiteData
from client.ledger import PrivacyLedger
from client.policy import SitePolicy
from client.privacy import DPConfig, DPPlan, make_private, sampling
from client.training import (
    ProximalTerm,
    StepHook,
    TrainConfig,
    fit,
    make_optimizer,
    predict,
    resolve_device,
)
from common.errors import ConfigError, PolicyViolation
from common.federation import FederationConfig
from models import binary_metrics, build_model, default_model_for, model_info
from models.tasks import task_definition

__all__ = [
    "RoundRequest",
    "RoundResult",
    "SiteTrainer",
    "resolve_grad_sample_mode",
    "settings_from_run",
]


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks a site to do in one round."""

    run_id: str
    round: int
    rounds_planned: int
    task: str
    train: TrainConfig
    dp: DPConfig


@dataclass(frozen=True)
class RoundResult:
    """What one round produced at the site (weights + aggregate numbers only)."""

    state: dict[str, torch.Tensor]
    n_train: int
    steps: int
    train_loss: float
    mechanism: Mechanism | None
    epsilon: float | None
    delta: float | None
    grad_sample_mode: str | None
    replayed: bool = False


class SiteTrainer:
    """Trains and evaluates models on one site's data under its policy and ledger.

    Parameters
    ----------
    site:
        The site's loaded, validated data.
    policy:
        The site's own rules and budget.
    ledger:
        The site's privacy ledger; required whenever DP is on.
    release_dir:
        Where released round results are kept for replay (default: beside the ledger).
    seed:
        Seeds the split, the model initialisation, batch sampling and noise (unless the DP
        config asks for secure mode).
    """

    def __init__(
        self,
        *,
        site: SiteData,
        policy: SitePolicy,
        ledger: PrivacyLedger | None,
        release_dir: Path | None = None,
        seed: int = 0,
    ) -> None:
        self.site = site
        self.policy = policy
        self.ledger = ledger
        self.seed = seed
        if release_dir is None and ledger is not None:
            release_dir = Path(ledger.path).parent / "releases"
        self.release_dir = release_dir
        self._task_data: dict[str, TaskData] = {}

    @property
    def site_id(self) -> str:
        return self.site.spec.site_id

    def task_data(self, task: str) -> TaskData:
        """The task's encoded splits (built once per trainer)."""
        if task not in self._task_data:
            self._task_data[task] = build_task_data(self.site, task, seed=self.seed)
        return self._task_data[task]

    def model_name(self, task: str, requested: str | None) -> str:
        data = self.task_data(task)
        return requested or default_model_for(data.modalities)

    def build_model(self, task: str, model: str | None = None) -> nn.Module:
        """A fresh model for ``task``; its initial weights depend only on the seed."""
        data = self.task_data(task)
        name = self.model_name(task, model)
        task_definition(data.task, model=name)
        generator = torch.Generator().manual_seed(self.seed)
        return build_model(name, input_dims=data.input_dims, generator=generator)

    # ------------------------------------------------------------------ training

    def train_round(
        self, request: RoundRequest, initial_state: Mapping[str, torch.Tensor] | None = None
    ) -> RoundResult:
        """Run one round of (private) local training; see the module docstring."""
        cfg, dp = request.train, request.dp
        model_name = self.model_name(request.task, cfg.model)
        self.policy.check_request(
            site_id=self.site_id,
            task=request.task,
            model=model_name,
            local_epochs=cfg.epochs,
            dp_enabled=dp.enabled,
        )
        if dp.enabled:
            if dp.delta != self.policy.delta or dp.accountant != self.policy.accountant:
                raise PolicyViolation(
                    f"site {self.site_id} accounts at delta={self.policy.delta:g} with the "
                    f"{self.policy.accountant} accountant; the run asked for delta={dp.delta:g} "
                    f"with {dp.accountant} (set the run's target-delta to match)"
                )
            if self.ledger is None:
                raise ConfigError(
                    f"site {self.site_id}: DP training needs a privacy ledger; give the site "
                    "a ledger path"
                )
            replay = self._replay(request)
            if replay is not None:
                return replay
        data = self.task_data(request.task)
        device = resolve_device(cfg.device)
        model = self.build_model(request.task, cfg.model)
        if initial_state is not None:
            model.load_state_dict(dict(initial_state))
        model.to(device)
        definition = task_definition(data.task, model=model_name)
        criterion = definition.kind.make_loss()
        optimizer = make_optimizer(model.parameters(), cfg)
        hooks: list[StepHook] = []
        if cfg.proximal_mu > 0 and initial_state is not None:
            hooks.append(ProximalTerm(mu=cfg.proximal_mu, global_params=initial_state))
        sampling_gen = torch.Generator().manual_seed(_round_seed(self.seed, request, "sample"))
        n_train = len(data.train)

        if not dp.enabled:
            loader = torch.utils.data.DataLoader(
                data.train, batch_size=cfg.batch_size, shuffle=True, generator=sampling_gen
            )
            stats = fit(
                model,
                loader,
                optimizer=optimizer,
                criterion=criterion,
                epochs=cfg.epochs,
                device=device,
                hooks=hooks,
            )
            state = _cpu_state(model)
            return RoundResult(state, n_train, stats.steps, stats.mean_loss, None, None, None, None)

        assert self.ledger is not None  # checked above, before any replay
        plan = self._plan(request, n_train)
        self.policy.check_noise(site_id=self.site_id, noise_multiplier=plan.noise_multiplier)
        mechanism = Mechanism(plan.noise_multiplier, plan.sample_rate, plan.steps)
        receipt = self.ledger.charge(
            fingerprint=self.site.fingerprint,
            budget_epsilon=self.policy.epsilon_budget,
            delta=self.policy.delta,
            accountant=self.policy.accountant,
            mechanism=mechanism,
            run_id=request.run_id,
            round=request.round,
        )
        noise_gen = torch.Generator(device=device).manual_seed(
            _round_seed(self.seed, request, "noise")
        )
        mode = resolve_grad_sample_mode(dp.grad_sample_mode, model_name)
        private = make_private(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            dataset=data.train,
            batch_size=cfg.batch_size,
            plan=plan,
            grad_sample_mode=mode,
            secure_mode=dp.secure_mode,
            sampling_generator=sampling_gen,
            noise_generator=noise_gen,
        )
        try:
            stats = fit(
                private.model,
                private.loader,
                optimizer=private.optimizer,
                criterion=private.criterion,
                epochs=cfg.epochs,
                device=device,
                hooks=hooks,
            )
        except BaseException:
            self.ledger.mark_failed(receipt.charge_id)
            raise
        if stats.steps != plan.steps:
            self.ledger.mark_failed(receipt.charge_id)
            raise RuntimeError(
                f"DP-SGD ran {stats.steps} steps but {plan.steps} were charged; the accounting "
                "would be wrong, so the update is withheld"
            )
        state = _cpu_state(private.unwrapped())
        result = RoundResult(
            state=state,
            n_train=n_train,
            steps=stats.steps,
            train_loss=stats.mean_loss,
            mechanism=mechanism,
            epsilon=receipt.epsilon_after,
            delta=self.policy.delta,
            grad_sample_mode=mode,
        )
        self._store_release(request, result)
        self.ledger.mark_completed(
            receipt.charge_id, metrics={"train_loss": stats.mean_loss, "steps": stats.steps}
        )
        return result

    def _plan(self, request: RoundRequest, n_train: int) -> DPPlan:
        """The round's mechanism: one noise multiplier for the whole run."""
        cfg, dp = request.train, request.dp
        assert self.ledger is not None
        q, steps = sampling(n_train, batch_size=cfg.batch_size, epochs=cfg.epochs)
        earlier = [
            c for c in self.ledger.charges(self.site.fingerprint) if c.run_id == request.run_id
        ]
        if earlier:
            sigma = earlier[0].mechanism.noise_multiplier
        elif dp.noise_multiplier is not None:
            sigma = dp.noise_multiplier
        else:
            assert dp.target_epsilon is not None
            target = min(dp.target_epsilon, self.policy.epsilon_budget)
            sigma = calibrate_noise(
                target_epsilon=target,
                delta=self.policy.delta,
                sample_rate=q,
                steps=steps * request.rounds_planned,
                history=self.ledger.history(self.site.fingerprint),
                accountant=self.policy.accountant,
            )
        return DPPlan(
            noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=dp.max_grad_norm
        )

    # ------------------------------------------------------------------ replay

    def _release_path(self, request: RoundRequest) -> Path:
        assert self.release_dir is not None
        key = f"{self.site.fingerprint}|{request.run_id}|{request.round}"
        return self.release_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def _store_release(self, request: RoundRequest, result: RoundResult) -> None:
        if self.release_dir is None:
            return
        path = self._release_path(request)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        payload = {
            "state": result.state,
            "n_train": result.n_train,
            "steps": result.steps,
            "train_loss": result.train_loss,
            "mechanism": None if result.mechanism is None else vars(result.mechanism),
            "epsilon": result.epsilon,
            "delta": result.delta,
            "grad_sample_mode": result.grad_sample_mode,
        }
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def _replay(self, request: RoundRequest) -> RoundResult | None:
        """The stored result of a round this site already released, if any."""
        assert self.ledger is not None
        receipt = self.ledger.has_charge(self.site.fingerprint, request.run_id, request.round)
        if receipt is None or receipt.status != "completed":
            return None
        path = self._release_path(request) if self.release_dir is not None else None
        if path is None or not path.is_file():
            raise PolicyViolation(
                f"site {self.site_id} already released round {request.round} of run "
                f"{request.run_id} and has no stored copy to send again; retraining would "
                "spend budget twice. Start a new run id to train again"
            )
        payload = torch.load(path, weights_only=True)
        mech = payload["mechanism"]
        return RoundResult(
            state=payload["state"],
            n_train=payload["n_train"],
            steps=payload["steps"],
            train_loss=payload["train_loss"],
            mechanism=None if mech is None else Mechanism(**mech),
            epsilon=payload["epsilon"],
            delta=payload["delta"],
            grad_sample_mode=payload["grad_sample_mode"],
            replayed=True,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        task: str,
        state: Mapping[str, torch.Tensor] | None,
        *,
        model: str | None = None,
        splits: tuple[str, ...] = ("val", "test"),
        device: str = "auto",
    ) -> dict[str, float]:
        """Aggregate metrics of a model on this site's splits, ``"<split>.<metric>"``.

        A split with fewer patients than the policy's ``min_count`` is withheld whole
        (small-count suppression); the patient count of a reported split is included as
        ``"<split>.n"``.
        """
        data = self.task_data(task)
        net = self.build_model(task, model)
        if state is not None:
            net.load_state_dict(dict(state))
        dev = resolve_device(device)
        net.to(dev)
        out: dict[str, float] = {}
        for split in splits:
            dataset = data.dataset(split)
            if len(dataset) < self.policy.min_count:
                continue
            y, p = predict(net, dataset, device=dev)
            for name, value in binary_metrics(y, p).items():
                out[f"{split}.{name}"] = float(value)
        return out


def settings_from_run(
    cfg: FederationConfig, *, proximal_mu: float | None = None
) -> tuple[TrainConfig, DPConfig]:
    """A site's local-training and DP settings for a federated run's config.

    ``proximal_mu`` overrides the run's (FedProx sends it in each round's config).
    """
    train = TrainConfig(
        model=cfg.model or None,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.learning_rate,
        optimizer=cfg.optimizer,
        proximal_mu=cfg.proximal_mu if proximal_mu is None else proximal_mu,
        device=cfg.device,
        seed=cfg.seed,
    )
    dp = DPConfig(
        enabled=cfg.dp,
        target_epsilon=None if cfg.noise_multiplier > 0 else cfg.target_epsilon,
        noise_multiplier=cfg.noise_multiplier if cfg.noise_multiplier > 0 else None,
        delta=cfg.target_delta,
        max_grad_norm=cfg.max_grad_norm,
        accountant=cfg.accountant,
        secure_mode=cfg.secure_mode,
    )
    return train, dp


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _round_seed(seed: int, request: RoundRequest, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}|{request.run_id}|{request.round}|{purpose}".encode())
    return int.from_bytes(digest.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def resolve_grad_sample_mode(requested: str, model_name: str) -> str:
    """``auto``: ghost clipping where every layer has a ghost-norm sampler, else hooks.

    Measured on this CPU at batch 256 (benchmarks/dp_overhead.py): ghost halves or better
    the DP overhead of the MLPs (ehr 3.4x -> 2.0x, genomics g=2000 38x -> 2.1x), but for
    models with convolutions Opacus 1.6 still materialises their per-sample gradients in
    ghost mode and adds a second backward pass, so hooks are faster there (CNN 2.0x -> 1.6x,
    fusion 2.1x -> 1.7x).
    """
    if requested != "auto":
        return requested
    return "ghost" if model_info(model_name).ghost_norm_only else "hooks"
