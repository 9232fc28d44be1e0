"""Tests of runtime.executor: transparency of pipelined + data-parallel training (gloo, CPU)."""

from __future__ import annotations

import importlib.util
import os
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
from runtime.comm import (
    TRANSPORT_THREAD,
    Comm,
    CommFailure,
    calm_transport_threads,
    decode_meta,
    encode_meta,
    message_tag,
    pack,
    unpack,
)
from runtime.emulator import launch_local
from runtime.executor import StageExecutor
from runtime.lowering import add_comms
from runtime.reference import reference_training
from runtime.schedule import one_f_one_b
from runtime.train import TrainConfig, load_stage_weights, train_device
from tests.ranks import spawn_ranks

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


def test_gradient_buckets_never_exceed_the_largest_gradient_or_the_small_bucket() -> None:
    from runtime.comm import SMALL_BUCKET_BYTES, gradient_buckets

    # large gradients (a quarter of the floor each): the largest gradient is the cap
    big = SMALL_BUCKET_BYTES // 4 // 4         # float32 elements per quarter
    grads = [torch.zeros(big * 4), torch.zeros(big), torch.zeros(big), torch.zeros(big),
             torch.zeros(big), torch.zeros(big * 2, dtype=torch.float64),
             torch.zeros(3, 4).t(), torch.zeros(big)]
    buckets = gradient_buckets(grads)
    # every gradient once, in order
    assert [id(g) for b in buckets for g in b] == [id(g) for g in grads]
    cap = max(max(g.numel() * g.element_size() for g in grads), SMALL_BUCKET_BYTES)
    for b in buckets:
        assert sum(g.numel() * g.element_size() for g in b) <= cap
        assert len({g.dtype for g in b}) == 1
        # a non-contiguous gradient is never packed together with others
        assert len(b) == 1 or all(g.is_contiguous() for g in b)
    assert [len(b) for b in buckets] == [1, 4, 1, 1, 1]
    # many small gradients (SkipNet's ten of 19 KB) share one collective
    small = [torch.zeros(n) for n in (432, 16, 2304, 16, 2304, 16, 2304, 16, 640, 10)]
    assert [len(b) for b in gradient_buckets(small)] == [10]
    assert gradient_buckets([]) == []


def _thread_policies(name: str) -> list[int]:
    """Scheduling policies of this process's threads called ``name`` (Linux)."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as fh:
            if fh.read().strip() == name:
                out.append(os.sched_getscheduler(int(tid)))
    return out


def _pooled_comm_worker(rank: int, port: int, results: Any) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    comm = Comm(rank, torch.device("cpu"), timeout_s=30)
    report: dict[str, Any] = {"ok": True}
    report["loop_policies"] = _thread_policies(TRANSPORT_THREAD)
    report["calmed_again"] = calm_transport_threads()
    buffers: set[int] = set()
    micro = 4
    for step in range(3):
        for m in range(micro):
            payload = [torch.full((2, 3), 10.0 * step + m), torch.arange(m, m + 5)]
            tag = message_tag("f", m)
            if rank == 0:
                comm.send([(1, payload)], "f", key=m, tag=tag)
                comm.release([m])
            else:
                # post the next receive as soon as this one is consumed (the executor's rule)
                got = comm.recv([0], "f", tag, key=m)[0]
                if m + 1 < micro:
                    report.setdefault("posted", []).append(
                        comm.post_recv([0], "f", message_tag("f", m + 1)))
                report["ok"] &= all(torch.equal(a, b) for a, b in zip(got, payload, strict=True))
                buffers.add(got[0].untyped_storage().data_ptr())
                comm.recycle(m)
        comm.flush()
        dist.barrier()
    report["buffers"] = len(buffers)
    report["messages"] = comm.messages_sent + comm.messages_received
    if rank == 0:
        try:
            comm.send([(1, [torch.zeros(3, 3), torch.arange(5)])], "f", key=0)
        except CommFailure as exc:
            report["mismatch"] = str(exc)
    dist.barrier()
    dist.destroy_process_group()
    results.put((rank, report))


def test_lean_comm_posts_receives_into_pooled_buffers() -> None:
    """Tagged messages land in receives posted ahead, the wire buffers are reused across
    micro-batches and rounds (no allocation per message), and a send whose shapes change
    raises ``CommFailure`` instead of corrupting the peer's buffers."""
    reports, _ = spawn_ranks(_pooled_comm_worker, 2)
    sender, receiver = reports[0], reports[1]
    assert sender["ok"] and receiver["ok"]
    assert sender["messages"] == receiver["messages"] == 12
    # only the very first receive learns the shapes at its wait; every later one is posted
    assert receiver["posted"] == [True] * 9
    # the one being consumed and the one posted ahead: two buffers serve all 12 messages
    assert receiver["buffers"] == 2
    assert "shapes must not change during a run" in sender["mismatch"]
    # gloo's transport loop thread runs under SCHED_BATCH (runtime/comm.py [Note: gloo's
    # loop thread]); a second call finds nothing left to change
    for report in (sender, receiver):
        assert report["loop_policies"] and all(p == os.SCHED_BATCH
                                               for p in report["loop_policies"])
        assert report["calmed_again"] == 0


DYING = '''
import os
import torch
from torch import nn

class Die(nn.Module):
    calls = 0
    def forward(self, x):
        Die.calls += 1
        if Die.calls == 6 and os.environ.get("DIE_RANK") == os.environ.get("THIS_RANK"):
            os._exit(5)
        return x

def build_model():
    return nn.Sequential(nn.Linear(4, 4), Die(), nn.Linear(4, 2))

def sample_batch(batch_size):
    return (torch.randn(batch_size, 4),), torch.randint(0, 2, (batch_size,))
'''


def _dying_worker(rank: int, port: int, results: Any, source: SeqSource) -> None:
    os.environ["THIS_RANK"] = str(rank)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    start = time.perf_counter()
    try:
        train_device(source, rank, TrainConfig(steps=4, timeout_s=60))
        results.put((rank, ("finished", "", time.perf_counter() - start)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((rank, (type(exc).__name__, str(exc), time.perf_counter() - start)))


def test_peer_dying_mid_step_raises_on_its_partner(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 dies in its 6th forward (step 1, micro-batch 1 of 4) while rank 0 has
    receives posted ahead and waits for a gradient: rank 0 raises ``StageFailure`` naming
    the step and the action at once (the broken connection), not after its 60 s timeout."""
    monkeypatch.setenv("DIE_RANK", "1")
    plan = Plan("m", "c", 8, 2, 4, (Stage((0, 0), ("a",), (2,)), Stage((1, 2), ("b",), (2,))))
    source = SeqSource(plan.to_json(), write_model(tmp_path, DYING))
    reports, exit_codes = spawn_ranks(_dying_worker, 2, (source,), reports=1)
    assert exit_codes[1] == 5
    kind, message, elapsed = reports[0]
    assert kind == "StageFailure"
    assert "rank 0 (device 'a', stage 0) failed at step 1, action 0RECV_B" in message
    assert "CommFailure" in message
    assert elapsed < 45


def test_targets_go_to_the_stage_device() -> None:
    """The last stage's loss takes targets on the stage's device (on CUDA the output is
    there and nll_loss refuses CPU targets; found on an H200 by tools/check_cuda.py)."""
    from runtime.executor import _slice_rows

    y = torch.arange(8)
    moved = _slice_rows(y, slice(2, 5), torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (3,)
    pair = _slice_rows((y, y.float()), slice(0, 2), torch.device("cpu"))
    assert isinstance(pair, tuple) and torch.equal(pair[0], y[:2])
    with pytest.raises(RuntimeFailure, match="targets must be a tensor"):
        _slice_rows({"y": y}, slice(0, 2), torch.device("cpu"))


def test_direct_backward_matches_torch_autograd_backward() -> None:
    """[Note: launching backward]: the engine called directly gives the same gradients, bit
    for bit, as torch.autograd.backward, for a loss (cached ones) and for received grads."""
    from runtime.executor import _run_backward

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    grads = []
    for direct in (True, False):
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])) * 0.25
        _run_backward((loss,), (torch.ones_like(loss),), direct)
        first = [layer.weight.grad.clone(), inp.grad.clone()]
        inp2 = x.clone().requires_grad_(True)
        _run_backward([layer(inp2)], [torch.full((2, 3), 0.5)], direct)
        grads.append(first + [layer.weight.grad.clone(), inp2.grad.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    with pytest.raises(RuntimeError):      # the engine checks the roots as the wrapper does
        _run_backward((torch.ones(()),), (torch.ones(()),), True)


def test_rows_cut_once_are_the_slices() -> None:
    """A rank's rows of every micro-batch, cut once per round, are the tensors that slicing
    each micro-batch gives: same values, sizes and strides (contiguous, a share of the
    micro-batch, a non-contiguous batch and a tuple of targets)."""
    from runtime.executor import _slice_rows, _split_rows

    cpu = torch.device("cpu")
    y = torch.arange(24.0).reshape(12, 2)
    for value in (y, y.t().contiguous().t(), (y[:, 0].long(), y)):
        for share in (slice(0, 4), slice(1, 3)):
            rows = [slice(m * 4 + share.start, m * 4 + share.stop) for m in range(3)]
            got = _split_rows(value, rows, 3, 4, share, cpu)
            want = [_slice_rows(value, r, cpu) for r in rows]
            for a, b in zip(got, want, strict=True):
                pairs = list(zip(a, b, strict=True)) if isinstance(b, tuple) else [(a, b)]
                for ta, tb in pairs:
                    assert torch.equal(ta, tb) and ta.stride() == tb.stride()
