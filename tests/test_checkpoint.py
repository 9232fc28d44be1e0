"""Tests of runtime.checkpoint: stage states by name, merging, slicing and files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from contracts.errors import RuntimeFailure
from runtime.checkpoint import (
    StageState,
    StateBuffer,
    apply_state,
    capture_state,
    checkpoint_file,
    latest_checkpoint,
    load_checkpoint,
    merge_states,
    prune_checkpoints,
    slice_state,
    state_from_bytes,
    state_names,
    state_to_bytes,
    write_checkpoint,
)


def _trained(momentum: float = 0.9) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    return model, opt


def test_capture_and_apply_round_trip_weights_and_momentum() -> None:
    model, opt = _trained()
    state = state_from_bytes(state_to_bytes(capture_state(model, opt, 7)))
    assert state.step == 7 and set(state.model) == set(model.state_dict())
    assert set(state.optim) == {n for n, _ in model.named_parameters()}
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    apply_state(other, other_opt, state)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    # one more identical step gives identical weights: the momentum came along
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (other, other_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(),
                                                             strict=True))


def test_flat_format_round_trips_and_reads_torch_save_archives() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = capture_state(model, opt, 4)
    state.optim["0.bias"]["note"] = "plain values travel in the header"
    data = state_to_bytes(state)
    assert data.startswith(b"AFXSTATE1") and state_names(data) == list(state.model)
    back = state_from_bytes(data)
    assert back.step == 4 and set(back.model) == set(state.model)
    for name, value in state.model.items():
        assert back.model[name].dtype == value.dtype and torch.equal(back.model[name], value)
    assert back.optim["0.bias"]["note"] == "plain values travel in the header"
    assert torch.equal(back.optim["0.weight"]["exp_avg"], state.optim["0.weight"]["exp_avg"])
    assert torch.equal(back.optim["0.weight"]["step"], state.optim["0.weight"]["step"])
    # files written by torch.save (the format before the flat one) still load
    import io

    buffer = io.BytesIO()
    torch.save({"step": 2, "model": {"w": torch.ones(2)}, "optim": {}}, buffer)
    old = state_from_bytes(buffer.getvalue())
    assert old.step == 2 and torch.equal(old.model["w"], torch.ones(2))
    # a value that is neither a tensor nor a plain value falls back to torch.save
    odd = StageState(1, {"w": torch.ones(1)}, {"w": {"betas": (0.9, 0.99)}})
    assert not state_to_bytes(odd).startswith(b"AFXSTATE1")


def test_state_buffer_snapshots_into_preallocated_memory() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    buf = StateBuffer()
    buf.capture(model, opt, -1)              # before the first step: no momentum yet
    assert buf.nbytes == 32 and buf.names == ("weight", "bias")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    buf.capture(model, opt, 0)               # momentum buffers appear: re-allocated once
    flat = buf.flat
    assert buf.nbytes == 64
    with torch.no_grad():
        model.weight.add_(1.0)
    buf.capture(model, opt, 1)
    assert buf.flat is flat and buf.step == 1   # same memory, new values
    assert torch.equal(buf.state().model["weight"], model.weight.detach())
    assert set(buf.state(["bias"]).model) == {"bias"}
    back = state_from_bytes(buf.to_bytes())
    assert back.step == 1 and torch.equal(back.optim["weight"]["momentum_buffer"],
                                          opt.state[model.weight]["momentum_buffer"])
    other = nn.Linear(3, 2)
    apply_state(other, None, back)
    assert torch.equal(other.weight, model.weight)


def test_merge_and_slice_by_qualified_name() -> None:
    a = StageState(3, {"l1.weight": torch.ones(2)}, {"l1.weight": {"momentum_buffer": 1}})
    b = StageState(3, {"l2.weight": torch.zeros(2)})
    merged = merge_states([a, b])
    assert set(merged.model) == {"l1.weight", "l2.weight"}
    part = slice_state(merged, ["l1.weight"])
    assert set(part.model) == {"l1.weight"} and set(part.optim) == {"l1.weight"}
    with pytest.raises(RuntimeFailure, match="different steps"):
        merge_states([a, StageState(4, {})])
    with pytest.raises(RuntimeFailure, match="lacks"):
        slice_state(merged, ["l3.weight"])
    with pytest.raises(RuntimeFailure, match="no stage state"):
        merge_states([])
    with pytest.raises(RuntimeFailure, match="does not belong to this model"):
        apply_state(nn.Linear(2, 2), None, a)


def test_checkpoint_files_latest_complete_step_and_pruning(tmp_path: Path) -> None:
    model, opt = _trained(momentum=0.0)
    root = tmp_path / "ckpt"
    assert latest_checkpoint(root, 0, 2) is None
    for step in (0, 1, 2):
        write_checkpoint(root, 0, 0, capture_state(model, opt, step))
        if step < 2:   # stage 1 never wrote step 2: incomplete
            write_checkpoint(root, 0, 1, StageState(step, {"extra": torch.ones(1)}))
    assert checkpoint_file(root, 2, 0, 0).is_file()
    assert latest_checkpoint(root, 0, 2) == 1
    assert latest_checkpoint(root, 0, 2, at_most=0) == 0
    assert latest_checkpoint(root, 1, 2) is None          # another plan version
    state = load_checkpoint(root, 1, 0, 2)
    assert state.step == 1 and "extra" in state.model and "0.weight" in state.model
    with pytest.raises(RuntimeFailure, match="incomplete"):
        load_checkpoint(root, 2, 0, 2)
    prune_checkpoints(root, [1])
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]
