"""What an attacker reads from a model: each patient's loss under the task's own loss.

The loss is the task kind's training criterion (:meth:`fedcare.models.tasks.TaskKind.make_loss`),
applied to one patient at a time (``torch.func.vmap`` over a batch), so an attack sees exactly
the quantity training minimised. For a likelihood loss (binary cross-entropy today)
``exp(-loss)`` is the model's probability of the patient's true label, the ``Pr(x | θ)`` of
the likelihood-ratio attacks. Losses are computed in float64 so that a well-fitted patient's
loss does not round to zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.models.tasks import TaskKind

__all__ = ["example_losses"]


@torch.no_grad()
def example_losses(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    kind: TaskKind,
    device: torch.device,
    batch_size: int = 512,
) -> np.ndarray:
    """Each patient's loss under ``model``, in dataset order (float64).

    Parameters
    ----------
    model:
        The model (an Opacus wrapper is unwrapped); evaluated in eval mode and left in the
        mode it was in.
    dataset:
        Items ``(*inputs, y)``, as :mod:`fedcare.client.data.datasets` builds them.
    kind:
        The task kind whose criterion defines the loss.
    device:
        Where to evaluate.
    batch_size:
        Patients per forward pass.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from fedcare.models.tasks import task_kind
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0))
    >>> _ = torch.nn.init.zeros_(net[0].weight), torch.nn.init.zeros_(net[0].bias)
    >>> ds = TensorDataset(torch.zeros(3, 2), torch.tensor([0.0, 1.0, 1.0]))
    >>> example_losses(net, ds, kind=task_kind("binary"), device=torch.device("cpu")).round(4)
    array([0.6931, 0.6931, 0.6931])
    """
    module: nn.Module = getattr(model, "_module", model)
    was_training = module.training
    module.eval()
    criterion = kind.make_loss(reduction="sum")

    def one(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return criterion(output.unsqueeze(0), target.unsqueeze(0))

    per_example = torch.func.vmap(one)
    out: list[np.ndarray] = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            *inputs, y = (t.to(device) for t in batch)
            # In float64: float32 cross-entropy rounds every loss below ~1e-7 to exactly 0,
            # which ties a memorised member with any confidently right non-member.
            out.append(per_example(module(*inputs).double(), y.double()).cpu().numpy())
    finally:
        module.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(out)
