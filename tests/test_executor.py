"""Tests of runtime.executor: transparency of pipelined + data-parallel training (gloo, CPU)."""

from __future__ import annotations

import importlib.util
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from contracts.errors import RuntimeFailure, StageFailure
from contracts.plan import Plan, Stage
from runtime.comm import Comm, decode_meta, encode_meta, pack, unpack
from runtime.emulator import launch_local
from runtime.executor import StageExecutor
from runtime.lowering import add_comms
from runtime.reference import reference_training
from runtime.schedule import one_f_one_b
from runtime.train import TrainConfig, load_stage_weights

MODEL = '''
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(),
                         nn.Linear(10, 3))

def sample_batch(batch_size):
    return (torch.randn(batch_size, 6),), torch.randint(0, 3, (batch_size,))
'''


@dataclass(frozen=True)
class SeqSource:
    """Stages = slices of the model file's nn.Sequential, keeping the original names."""

    plan_json: str
    model_path: str

    def load_plan(self) -> Plan:
        return Plan.from_json(self.plan_json)

    def model_module(self) -> Any:
        spec = importlib.util.spec_from_file_location(
            f"seq_model_{abs(hash(self.model_path))}", self.model_path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def load_stage(self, index: int) -> torch.nn.Module:
        stage = self.load_plan().stages[index]
        model = self.model_module().build_model()
        return torch.nn.Sequential(OrderedDict(
            (str(i), model[i]) for i in range(stage.first, stage.last + 1)))


def write_model(tmp_path: Path, text: str = MODEL) -> str:
    path = tmp_path / "model.py"
    path.write_text(text)
    return str(path)


def check_transparent(source: SeqSource, steps: int, world: int) -> None:
    plan = source.load_plan()
    results = launch_local(source, world, TrainConfig(steps=steps, return_state=True,
                                                      timeout_s=60), timeout_s=120)
    ref = reference_training(source.model_module(), plan.batch_size, steps=steps)
    for worker in results:
        assert worker.losses == pytest.approx(ref.losses, rel=1e-6, abs=1e-7)
        assert worker.state is not None
        for name, value in worker.state.items():
            torch.testing.assert_close(value, ref.state[name], rtol=1e-6, atol=1e-7)
    covered = {k for w in results if w.state for k in w.state}
    assert covered == set(ref.state)


def test_pack_round_trip() -> None:
    tensors = [torch.randn(3, 5), torch.arange(7), torch.tensor([True, False, True]),
               torch.randn(2, 1, 3).double()]
    buf = pack(tensors, 12.5)
    out, stamp = unpack(buf, decode_meta(encode_meta(tensors)))
    assert stamp == 12.5
    for a, b in zip(tensors, out, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_meta_rejects_unsupported_dtype() -> None:
    with pytest.raises(RuntimeFailure, match="cannot send a tensor of dtype"):
        encode_meta([torch.zeros(2, dtype=torch.complex128)])


def test_single_stage_in_process(tmp_path: Path) -> None:
    """One stage, one device: the executor alone equals plain training, and frees every
    micro-batch's activations by the end of the round."""
    plan = Plan("m", "c", 8, 2, 4, (Stage((0, 4), ("solo",), (2,)),))
    source = SeqSource(plan.to_json(), write_model(tmp_path))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mod = source.model_module()
        torch.manual_seed(0)
        full = mod.build_model().state_dict()
        stage = source.load_stage(0)
        load_stage_weights(stage, full, 0)
        opt = torch.optim.SGD(stage.parameters(), lr=0.01)
        ex = StageExecutor(plan, 0, stage, Comm(0, torch.device("cpu")),
                           torch.nn.functional.cross_entropy, opt)
        actions = add_comms(plan, one_f_one_b(plan))[0]
        losses = []
        for k in range(2):
            torch.manual_seed(1 + k)
            inputs, targets = mod.sample_batch(8)
            losses.append(ex.run_round(actions, k, inputs, targets).loss)
            assert ex.live_microbatches == 0
        with pytest.raises(StageFailure, match=r"rank 0 \(device 'solo', stage 0\) failed at "
                                               r"step 7, action 0F0"):
            ex.run_round(actions, 7, (torch.randn(8, 5),), targets)
    finally:
        dist.destroy_process_group()
    ref = reference_training(mod, 8, steps=2)
    assert losses == pytest.approx(ref.losses, rel=1e-6)
    for name, value in stage.state_dict().items():
        torch.testing.assert_close(value, ref.state[name], rtol=1e-6, atol=1e-7)


def test_two_stages_of_uneven_pairs_transparent(tmp_path: Path) -> None:
    """Both stages on two devices with misaligned uneven shares (3, 2) -> (1, 4): device a
    sends to c and d, b only to d, and the last stage's loss is split 1:4."""
    plan = Plan("m", "c", 10, 5, 2, (Stage((0, 1), ("a", "b"), (3, 2)),
                                     Stage((2, 4), ("c", "d"), (1, 4))))
    check_transparent(SeqSource(plan.to_json(), write_model(tmp_path)), steps=2, world=4)


def test_three_stages_with_uneven_middle_pair_transparent(tmp_path: Path) -> None:
    start = time.perf_counter()
    plan = Plan("m", "c", 12, 6, 2, (Stage((0, 0), ("a",), (6,)),
                                     Stage((1, 2), ("b", "c"), (4, 2)),
                                     Stage((3, 4), ("d",), (6,))))
    check_transparent(SeqSource(plan.to_json(), write_model(tmp_path)), steps=3, world=4)
    assert time.perf_counter() - start < 60


def test_gradient_buckets_never_exceed_the_largest_gradient() -> None:
    from runtime.comm import gradient_buckets

    grads = [torch.zeros(10), torch.zeros(3), torch.zeros(4), torch.zeros(2, 2),
             torch.zeros(8, dtype=torch.float64), torch.zeros(3, 4).t(), torch.zeros(1)]
    buckets = gradient_buckets(grads)
    # every gradient once, in order
    assert [id(g) for b in buckets for g in b] == [id(g) for g in grads]
    cap = max(g.numel() * g.element_size() for g in grads)
    for b in buckets:
        assert sum(g.numel() * g.element_size() for g in b) <= cap
        assert len({g.dtype for g in b}) == 1
        # a non-contiguous gradient is never packed together with others
        assert len(b) == 1 or all(g.is_contiguous() for g in b)
    assert [len(b) for b in buckets] == [2, 2, 1, 1, 1]
    assert gradient_buckets([]) == []
