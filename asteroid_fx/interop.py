"""Run asteroid-fx stages with ``torch.distributed.pipelining`` schedules (GPipe, 1F1B ...).

Our stages already follow the calling convention ``PipelineStage`` expects: stage ``i``
takes the tensors its predecessor returns, positionally. So a partition made by
:func:`asteroid_fx.partition.partition` (or loaded with ``load_partition``) can be driven
by PyTorch's own schedules, one stage per rank (homogeneous stages: one device each; the
per-device shares of a plan are asteroid-fx's own runtime's business)::

    import torch.distributed as dist
    from torch.distributed.pipelining import ScheduleGPipe
    from asteroid_fx.interop import to_pipeline_stage

    dist.init_process_group("gloo", rank=rank, world_size=2, store=store)
    plan, stages = afx.load_partition("out/")
    micro = x[: plan.micro_batch_size]                  # one micro-batch, for shapes
    stage = to_pipeline_stage(stages[rank], rank, 2, torch.device("cpu"),
                              example_input=micro if rank == 0 else None)
    schedule = ScheduleGPipe(stage, n_microbatches=4, loss_fn=loss_fn)
    if rank == 0:
        schedule.step(x)
    else:
        losses = []
        schedule.step(target=y, losses=losses)

The loss is ``loss_fn`` per micro-batch and the schedules scale gradients by
``1 / n_microbatches``, so one step equals unsplit training on the mean of the micro-batch
losses (tests/test_interop.py checks losses and gradients). Integer tensors crossing a cut
(token ids, masks) are passed along and get no gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from contracts.arguments import is_int
from contracts.errors import PartitionError

__all__ = ["to_pipeline_stage"]

log = logging.getLogger(__name__)


def to_pipeline_stage(
    stage_module: torch.nn.Module,
    stage_index: int,
    num_stages: int,
    device: torch.device | str,
    group: Any = None,
    *,
    example_input: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
) -> Any:
    """Wrap one stage as a ``torch.distributed.pipelining.PipelineStage``.

    Args:
        stage_module: stage ``stage_index`` of a partition (moved to ``device`` in place).
        stage_index: its position in the pipeline (0-based).
        num_stages: number of stages in the pipeline.
        device: the device this rank computes on.
        group: the process group of the pipeline (default: the world).
        example_input: the stage's inputs for one micro-batch; given to ``PipelineStage``
            as ``input_args`` (shapes then need no run-time inference). Without it the
            stage infers shapes at the first step.

    Returns:
        A ``torch.distributed.pipelining.PipelineStage``.

    Raises:
        PartitionError: the indices are inconsistent or the process group is not set up.
    """
    from torch.distributed.pipelining import PipelineStage

    if any(not is_int(v) for v in (stage_index, num_stages)):
        raise PartitionError(f"stage_index and num_stages must be integers, got "
                             f"{stage_index!r} and {num_stages!r}")
    if num_stages < 1 or not 0 <= stage_index < num_stages:
        raise PartitionError(f"stage_index must be in 0..{num_stages - 1} for {num_stages} "
                             f"stages, got {stage_index}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise PartitionError("to_pipeline_stage needs an initialized process group: call "
                             "torch.distributed.init_process_group(...) first")
    dev = torch.device(device)
    stage_module.to(dev)
    input_args: tuple[torch.Tensor, ...] | None = None
    if example_input is not None:
        raw = example_input if isinstance(example_input, tuple) else (example_input,)
        input_args = tuple(t.to(dev) for t in raw)
    log.debug("pipelining stage %d/%d on %s", stage_index, num_stages, dev)
    return PipelineStage(stage_module, stage_index, num_stages, dev, input_args=input_args,
                         group=group)
