"""Tests of cost_models.optimizer: the optimizer's state per weight byte, measured."""

from __future__ import annotations

import pytest
import torch

from contracts.errors import CostModelError
from cost_models.optimizer import optimizer_state_factor


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize(("build", "factor"), [
    (None, 0.0),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1.0),
    (lambda p: torch.optim.Adam(p, lr=1e-3), 2.0),
    (lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True), 3.0),
])
def test_state_factor_of_common_optimizers(build: object, factor: float) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    measured = optimizer_state_factor(model.parameters(), build)  # type: ignore[arg-type]
    # Adam keeps a scalar step count per parameter: a few bytes beyond its two moments
    assert measured == pytest.approx(factor, abs=0.02)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(),
                                                           strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_no_trainable_parameters_means_no_state() -> None:
    model = _model().requires_grad_(False)
    assert optimizer_state_factor(model.parameters(), None) == 0.0


def test_failing_optimizer_is_a_cost_model_error() -> None:
    def broken(params: object) -> torch.optim.Optimizer:
        raise ValueError("lr missing")

    with pytest.raises(CostModelError, match="build_optimizer.*lr missing"):
        optimizer_state_factor(_model().parameters(), broken)
