"""Crafted weights against the one-backward DP-SGD mode (``grad_sample_mode="bookkeeping"``).

A malicious centre sends weights that overflow to inf/NaN on some patients, hoping the round
fails (a failure tells it those patients exist). Under bookkeeping a patient whose gradient
norm is not finite gets clip factor 0 and is left out of the step, patient by patient, so
the round completes with finite weights; the charge covers it as any other round.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig
from tests.security.conftest import TASK
from tests.security.test_site_decides import _initial, _overflowing, _request, _trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]


@pytest.mark.parametrize("requested", ["bookkeeping", "auto"])
def test_overflowing_weights_do_not_make_bookkeeping_training_fail(
    real_site: SiteData, tmp_path: Path, requested: str
) -> None:
    trainer = _trainer(real_site, tmp_path)
    crafted = _overflowing(_initial(trainer))
    dp = DPConfig(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", grad_sample_mode=requested
    )
    result = trainer.train_round(_request(dp=dp), crafted)
    assert result.grad_sample_mode == "bookkeeping"
    assert all(torch.isfinite(t).all() for t in result.state.values() if t.is_floating_point())
    # Not vacuous: the crafted weights overflow on any patient's inputs.
    model = trainer.build_model(TASK)
    model.load_state_dict(crafted)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randn(4, first.in_features, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(model(x)).any()
