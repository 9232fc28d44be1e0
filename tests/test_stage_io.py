"""Tests of runtime.stage_io: reading a partition directory with torch alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from partition_cases import ROOT, compose, example_spec, hand_plan

from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.package import save_partition
from asteroid_fx.partition import partition, stage_info
from asteroid_fx.trace import trace
from contracts.errors import PartitionError
from runtime.stage_io import (
    STAGE_META_KEY,
    PartitionMeta,
    StageMeta,
    load_model_module,
    load_partition_meta,
    load_plan,
    load_stage,
    read_weights,
    stage_file,
    weights_file,
)

CUSTOM_MODEL = '''
"""A model with a custom leaf module class, which a stage takes from build_model()."""
from __future__ import annotations

import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent: untraceable, hence a leaf
            return x
        return x * torch.sigmoid(self.w)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.gate = Gate()
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.gate(torch.relu(self.a(x))))


def build_model() -> nn.Module:
    return Net()


def sample_batch(batch_size: int):
    return (torch.randn(batch_size, 4),), torch.randint(0, 3, (batch_size,))
'''


Saved = tuple[Path, list[torch.fx.GraphModule], tuple[torch.Tensor, ...]]


@pytest.fixture()
def saved(tmp_path: Path) -> Saved:
    model_file = tmp_path / "src" / "custom_model.py"
    model_file.parent.mkdir()
    model_file.write_text(CUSTOM_MODEL)
    spec = load_model_spec(str(model_file))
    model = spec.build_model()
    inputs, _ = spec.example_inputs(3)
    leaf = type(model.get_submodule("gate"))
    graph = trace(model, inputs, leaf_modules=[leaf])
    names = [layer.name for layer in graph.layers]
    plan = hand_plan(graph.num_layers, [names.index("gate") - 1])
    stages = partition(model, inputs, plan, graph=graph)
    out = tmp_path / "part"
    save_partition(out, plan, stages, model_spec=spec, onnx=False)
    return out, stages, inputs


def test_meta_and_plan_load(saved: Saved) -> None:
    out, stages, _ = saved
    meta = load_partition_meta(out)
    assert isinstance(meta, PartitionMeta)
    assert meta.num_stages == 2 and meta.model_file == "model.py"
    assert meta.model_module is not None and meta.model_module.startswith("asteroid_fx_user")
    assert [s.inputs for s in meta.stages] == [stage_info(s).inputs for s in stages]
    assert PartitionMeta.from_dict(json.loads(meta.to_json())) == meta
    assert load_plan(out).num_stages == 2
    with pytest.raises(AttributeError):
        meta.num_stages = 3  # type: ignore[misc]  # frozen


def test_load_stage_restores_boundary_names(saved: Saved) -> None:
    out, stages, inputs = saved
    loaded = [load_stage(out, i) for i in range(2)]
    assert torch.equal(compose(loaded, inputs), compose(stages, inputs))
    stage_meta = loaded[1].meta
    assert isinstance(stage_meta, dict)
    assert stage_meta[STAGE_META_KEY]["params"] == list(stage_info(stages[1]).params)
    assert stage_file(out, 1, ".py").name == "stage_1.py"


def test_a_fresh_process_needs_only_torch_and_stage_io(
        saved: Saved) -> None:
    """A device loads a stage whose custom leaf class lives in the copied model file."""
    out, stages, inputs = saved
    torch.save(inputs, out.parent / "inputs.pt")
    expected = compose(stages, inputs)
    torch.save(expected, out.parent / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        import torch
        from runtime.stage_io import load_stage, load_partition_meta
        d = {str(out)!r}
        meta = load_partition_meta(d)
        x = torch.load({str(out.parent / "inputs.pt")!r})
        for i in range(meta.num_stages):
            stage = load_stage(d, i)
            x = stage(*x) if isinstance(x, tuple) else stage(x)
        assert torch.equal(x, torch.load({str(out.parent / "expected.pt")!r}))
        heavy = [m for m in ("asteroid_fx.trace", "asteroid_fx.partition", "onnx",
                             "onnxruntime", "solver.evaluate", "pulp") if m in sys.modules]
        assert not heavy, heavy
        print("ok", type(stage.get_submodule("gate")).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok asteroid_fx_user_model_custom_model")


def test_load_model_module_imports_the_copy(saved: Saved) -> None:
    out, _, _ = saved
    module = load_model_module(out)
    assert hasattr(module, "build_model") and hasattr(module, "Gate")


def test_errors_name_the_problem(tmp_path: Path,
                                 saved: Saved) -> None:
    out, _, _ = saved
    with pytest.raises(PartitionError, match=r"does not exist; create it with"):
        load_plan(tmp_path / "nowhere")
    with pytest.raises(PartitionError, match=r"stage index 2 is out of range: .* 2 stages"):
        load_stage(out, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PartitionError, match=r"partition.json' is missing"):
        load_partition_meta(tmp_path / "empty")
    with pytest.raises(PartitionError, match=r"plan.json' is missing"):
        load_plan(tmp_path / "empty")
    (tmp_path / "empty" / "partition.json").write_text("{not json")
    with pytest.raises(PartitionError, match=r"is not valid JSON"):
        load_partition_meta(tmp_path / "empty")
    data = json.loads((out / "partition.json").read_text())
    changes: list[tuple[dict[str, Any], str]] = [
        ({"version": 7}, r"written by a newer asteroid-fx \(format 7, this reads <= 2\); "
                         r"upgrade the device side with `pip install --no-deps \.`"),
        ({"version": 1}, r"format 1 \(pickled stage_<i>.pt modules\), which this asteroid-fx "
                         r"no longer loads; re-run `asteroid-fx partition`"),
        ({"version": "2"}, r"version '2' is not a format number"),
        ({"num_stages": 5}, r"declares 5 stages but lists"),
        ({"stages": None}, r"malformed partition.json")]
    for change, message in changes:
        (tmp_path / "empty" / "partition.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(PartitionError, match=message):
            load_partition_meta(tmp_path / "empty")
    del data["stages"]
    (tmp_path / "empty" / "partition.json").write_text(json.dumps(data))
    with pytest.raises(PartitionError, match=r"missing the field 'stages'"):
        load_partition_meta(tmp_path / "empty")
    weights_file(out, 1).unlink()
    with pytest.raises(PartitionError, match=r"stage_1.weights.pt' is missing"):
        load_stage(out, 1)
    stage_file(out, 1).unlink()
    with pytest.raises(PartitionError, match=r"stage_1.py' is missing"):
        load_stage(out, 1)
    (out / "model.py").unlink()
    with pytest.raises(PartitionError, match=r"model file .*model.py' listed in partition.json"):
        load_model_module(out)


def test_no_model_file(tmp_path: Path) -> None:
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, [3])
    save_partition(tmp_path, plan, partition(model, inputs, plan, graph=graph), onnx=False)
    assert load_stage(tmp_path, 0) is not None
    with pytest.raises(PartitionError, match=r"has no model file"):
        load_model_module(tmp_path)


def test_stage_meta_round_trip() -> None:
    meta = StageMeta(index=0, inputs=("x",), outputs=("h",), params=("a.weight",),
                     buffers=(), layers=(0, 3), cloned_inputs=(), tied={"a.weight": "a.weight"})
    assert StageMeta.from_dict(meta.to_dict()) == meta


def test_weights_are_a_plain_dict_read_with_weights_only(saved: Saved) -> None:
    out, stages, _ = saved
    for i, stage in enumerate(stages):
        data = torch.load(weights_file(out, i), weights_only=True)
        assert isinstance(data, dict)
        assert set(data) == {n for n, _ in (*stage.named_parameters(), *stage.named_buffers())}
        for name, value in data.items():
            assert torch.equal(value, stage.get_parameter(name))
    assert not list(out.glob("*.pkl")) and not stage_file(out, 0, ".pt").exists()


def test_a_model_file_submodule_is_taken_from_build_model(saved: Saved) -> None:
    out, stages, inputs = saved
    code = stage_file(out, 1).read_text()
    assert "MODEL_SUBMODULES = ('gate',)" in code
    assert "model.get_submodule('gate')" in code
    assert "torch.nn.Linear(4, 3)" in code   # a torch.nn layer: from its arguments
    loaded = load_stage(out, 1)
    assert type(loaded.get_submodule("gate")).__name__ == "Gate"
    assert torch.equal(loaded.get_parameter("gate.w"), stages[1].get_parameter("gate.w"))
    # the meta-device build of the model used no random numbers
    state = torch.get_rng_state()
    load_stage(out, 1)
    assert torch.equal(state, torch.get_rng_state())


def test_a_stage_needing_the_model_is_refused_without_one(tmp_path: Path, saved: Saved) -> None:
    out, stages, _ = saved
    plan = load_plan(out)
    with pytest.raises(PartitionError, match=r"stage 1 calls submodule 'gate' \(.*Gate\), "
                                             r"which can only be rebuilt from the model's "
                                             r"build_model\(\); save the partition with its "
                                             r"model spec"):
        save_partition(tmp_path / "nomodel", plan, stages, onnx=False)


def test_garbled_and_mismatched_weights_are_refused(saved: Saved) -> None:
    out, _, _ = saved
    good = torch.load(weights_file(out, 0), weights_only=True)
    weights_file(out, 0).write_bytes(b"garbage")
    with pytest.raises(PartitionError, match=r"stage_0.weights.pt' is not a readable weights "
                                             r"file \(.*\); re-run `asteroid-fx partition`"):
        load_stage(out, 0)
    torch.save([1, 2], weights_file(out, 0))
    with pytest.raises(PartitionError, match=r"holds a list, not a dict of named tensors"):
        read_weights(weights_file(out, 0))
    torch.save({k: v for k, v in good.items() if k != "a.bias"}, weights_file(out, 0))
    with pytest.raises(PartitionError, match=r"the weights of .*stage_0.py' lack 'a.bias'"):
        load_stage(out, 0)
    torch.save({**good, "a.bias": torch.zeros(5)}, weights_file(out, 0))
    with pytest.raises(PartitionError, match=r"hold 'a.bias' as torch.float32 \[5\] but the "
                                             r"stage needs torch.float32 \[4\]"):
        load_stage(out, 0)
    torch.save({**good, "extra": torch.zeros(1)}, weights_file(out, 0))
    with pytest.raises(PartitionError, match=r"hold \['extra'\], which the stage does not "
                                             r"have"):
        load_stage(out, 0)


def test_a_pickled_module_is_not_a_weights_file(saved: Saved) -> None:
    out, stages, _ = saved
    torch.save(stages[0], weights_file(out, 0))   # what format 1 wrote: pickled code
    with pytest.raises(PartitionError, match=r"is not a readable weights file"):
        load_stage(out, 0)


def test_stage_sources_from_elsewhere_are_refused(saved: Saved) -> None:
    out, _, _ = saved
    code = stage_file(out, 0).read_text()
    stage_file(out, 0).write_text(code.replace("FORMAT = 2", "FORMAT = 3"))
    with pytest.raises(PartitionError, match=r"stage_0.py' was written by a newer asteroid-fx "
                                             r"\(format 3, this reads <= 2\); upgrade"):
        load_stage(out, 0)
    stage_file(out, 0).write_text(code.replace("TORCH_NAMES = (",
                                               "TORCH_NAMES = ('torch.no_such_op', "))
    with pytest.raises(PartitionError, match=r"calls torch.no_such_op, which torch .* on this "
                                             r"device does not have"):
        load_stage(out, 0)
    stage_file(out, 0).write_text("import no_such_module_here\n" + code)
    with pytest.raises(PartitionError, match=r"imports no_such_module_here, which this device "
                                             r"cannot import"):
        load_stage(out, 0)
    stage_file(out, 0).write_text(code + "\nmatch = [\n")
    with pytest.raises(PartitionError, match=r"stage_0.py' .* does not parse: line"):
        load_stage(out, 0)
    stage_file(out, 0).write_text("x = 1\n")
    with pytest.raises(PartitionError, match=r"declares no FORMAT"):
        load_stage(out, 0)
    stage_file(out, 0).write_text(code.replace("torch.nn.Linear(4, 4)", "torch.nn.Linear(4, 5)"))
    with pytest.raises(PartitionError, match=r"needs torch.float32 \[5, 4\]"):
        load_stage(out, 0)
