"""Single-process reference training on the same seeded weights and batches as a run."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from contracts.inputs import model_inputs
from runtime.train import make_optimizer, resolve_loss_fn

__all__ = ["ReferenceResult", "reference_training"]


@dataclass
class ReferenceResult:
    """Per-step losses and step times, and the final weights of the whole model."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def reference_training(model_file: Any, batch_size: int, *, steps: int = 10, seed: int = 0,
                       lr: float = 0.01) -> ReferenceResult:
    """Train ``model_file.build_model()`` on one process exactly as the reproducible-run
    contract prescribes (seeds, batches, optimizer), for comparison with a pipelined run."""
    torch.manual_seed(seed)
    model = model_file.build_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model_file, params, lr)
    loss_fn = resolve_loss_fn(model_file)
    result = ReferenceResult()
    for step in range(steps):
        torch.manual_seed(seed + 1 + step)
        inputs, targets = model_file.sample_batch(batch_size)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        outputs = model(**inputs) if isinstance(inputs, Mapping) else model(*model_inputs(inputs))
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()
        result.step_times.append(time.perf_counter() - start)
        result.losses.append(float(loss.detach()))
    result.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result
