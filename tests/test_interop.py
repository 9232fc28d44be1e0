"""Tests of asteroid_fx.interop: our stages under torch.distributed.pipelining schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from partition_cases import example_spec, hand_plan

from asteroid_fx.interop import to_pipeline_stage
from asteroid_fx.partition import partition
from asteroid_fx.trace import trace
from contracts.errors import PartitionError

BATCH = 8
MICRO_BATCHES = 4


def _setup() -> tuple[torch.nn.Module, list[torch.fx.GraphModule], torch.Tensor, torch.Tensor]:
    spec = example_spec("mlp.py")
    torch.manual_seed(0)
    model = spec.build_model()
    torch.manual_seed(1)
    (x,), y = spec.example_inputs(BATCH)
    graph = trace(model, (x,))
    plan = hand_plan(graph.num_layers, [2], micro_batch=BATCH // MICRO_BATCHES)
    return model, partition(model, (x,), plan, graph=graph), x, y


def _worker(rank: int, world: int, schedule_name: str, out: str) -> None:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    spec = example_spec("mlp.py")
    _, stages, x, y = _setup()
    store = dist.FileStore(f"{out}/store", world)
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store)
    try:
        micro = x[: BATCH // MICRO_BATCHES]
        stage = to_pipeline_stage(stages[rank], rank, world, "cpu",
                                  example_input=micro if rank == 0 else None)
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
        schedule = kind(stage, n_microbatches=MICRO_BATCHES, loss_fn=spec.loss_fn)
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        grads = {n: p.grad.clone() for n, p in stages[rank].named_parameters()
                 if p.grad is not None}
        torch.save({"losses": [float(v) for v in losses], "grads": grads},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("schedule_name", ["1f1b", "gpipe"])
def test_two_stage_pipelining_equals_unsplit_training(tmp_path: Path,
                                                      schedule_name: str) -> None:
    mp.spawn(_worker, args=(2, schedule_name, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    model, _, x, y = _setup()
    spec = example_spec("mlp.py")
    micro = BATCH // MICRO_BATCHES
    reference = [spec.loss_fn(model(x[i * micro:(i + 1) * micro]), y[i * micro:(i + 1) * micro])
                 for i in range(MICRO_BATCHES)]
    assert rank1["losses"] == pytest.approx([float(v.detach()) for v in reference], rel=1e-6)
    # the schedules scale gradients by 1 / n_microbatches: the mean of micro-batch losses
    torch.stack(reference).mean().backward()
    grads = {**rank0["grads"], **rank1["grads"]}
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_rejected() -> None:
    _, stages, _, _ = _setup()
    with pytest.raises(PartitionError, match=r"stage_index must be in 0\.\.1 for 2 stages, got 2"):
        to_pipeline_stage(stages[0], 2, 2, "cpu")
    if not dist.is_initialized():
        with pytest.raises(PartitionError, match=r"needs an initialized process group"):
            to_pipeline_stage(stages[0], 0, 2, "cpu")
