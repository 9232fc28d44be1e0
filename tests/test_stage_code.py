"""Tests of asteroid_fx.stage_code: stages as importable source plus a weights dict."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from partition_cases import ROOT, compose, hand_plan
from torch import nn

from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.package import load_partition, save_partition
from asteroid_fx.partition import partition
from asteroid_fx.stage_code import constructor_call, stage_source, tree_difference
from asteroid_fx.trace import trace
from contracts.errors import PartitionError
from runtime.stage_io import stage_file

WRAPPED_MODEL = '''
"""Tied weights, a wrapped helper, a frozen layer, a plain tensor attribute."""
from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn


def scaled(x: torch.Tensor, n: int) -> torch.Tensor:
    return x / math.sqrt(n)


torch.fx.wrap("scaled")


class Mask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.keep = torch.arange(8) % 2          # a plain tensor attribute
        self.register_buffer("scale", torch.full((8,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            return x
        return x * self.keep * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mask = Mask()
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.proj = nn.Linear(8, 8, bias=False)
        self.proj2 = nn.Linear(8, 8, bias=False)
        self.proj2.weight = self.proj.weight                # tied inside the last stage
        self.head = nn.Linear(8, 10)
        self.pos = nn.Parameter(torch.randn(8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos
        x = scaled(self.mask(x), x.shape[-1])
        x = torch.nn.functional.gelu(self.frozen(x), approximate="tanh")
        x = self.proj2(self.proj(x))
        return self.head(x).masked_fill(ids.unsqueeze(-1) < 0, float("-inf"))


def build_model() -> nn.Module:
    return Net()


def sample_batch(batch_size: int):
    return (torch.randint(0, 10, (batch_size, 3)),), torch.randint(0, 10, (batch_size, 3))
'''


def _wrapped_partition(tmp_path: Path) -> tuple[Path, list[fx.GraphModule], nn.Module, tuple]:
    model_file = tmp_path / "src" / "wrapped_model.py"
    model_file.parent.mkdir()
    model_file.write_text(WRAPPED_MODEL)
    spec = load_model_spec(str(model_file))
    torch.manual_seed(1)
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    mask = type(model.get_submodule("mask"))
    graph = trace(model, inputs, leaf_modules=[mask])
    names = [layer.name for layer in graph.layers]
    plan = hand_plan(graph.num_layers, [names.index("mask") - 1])
    stages = partition(model, inputs, plan, graph=graph)
    out = tmp_path / "part"
    save_partition(out, plan, stages, model_spec=spec, onnx=False)
    return out, stages, model, inputs


def test_round_trip_keeps_ties_flags_attributes_and_globals(tmp_path: Path) -> None:
    out, stages, model, inputs = _wrapped_partition(tmp_path)
    _, loaded = load_partition(out)
    for original, again in zip(stages, loaded, strict=True):
        assert tree_difference(original, again, values=True, whole=False) is None
    last = loaded[-1]
    assert last.get_parameter("proj2.weight") is last.get_parameter("proj.weight")
    assert not last.get_parameter("frozen.weight").requires_grad
    assert torch.equal(last.get_submodule("mask").keep, torch.arange(8) % 2)
    assert "scale" in last.get_submodule("mask")._non_persistent_buffers_set
    code = stage_file(out, len(stages) - 1).read_text()
    assert "from asteroid_fx_user_model_wrapped_model_" in code and " import scaled" in code
    assert "from math import inf" in code
    assert "'torch._C._nn.gelu'" in code   # F.gelu's home; checked on the device first
    assert "MODEL_SUBMODULES = ('mask',)" in code
    assert "# tied" in code and "FROZEN = ('frozen.weight', 'frozen.bias',)" in code
    assert "TENSOR_ATTRIBUTES = ('mask.keep',)" in code
    # bit-exact outputs and gradients
    out_loaded = compose(loaded, inputs)
    out_model = model(*inputs)
    assert torch.equal(out_loaded, out_model)
    finite = torch.isfinite(out_model)
    out_loaded[finite].sum().backward()
    out_model[finite].sum().backward()
    for stage in loaded:
        for name, param in stage.named_parameters():
            if param.requires_grad:
                assert torch.equal(param.grad, model.get_parameter(name).grad), name


def test_a_fresh_process_runs_the_wrapped_stages(tmp_path: Path) -> None:
    out, stages, _, inputs = _wrapped_partition(tmp_path)
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(compose(stages, inputs), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from runtime.stage_io import load_partition_meta, load_stage
        d = {str(out)!r}
        x = torch.load({str(tmp_path / "inputs.pt")!r})
        for i in range(load_partition_meta(d).num_stages):
            stage = load_stage(d, i)
            x = stage(*x) if isinstance(x, tuple) else stage(x)
        assert torch.equal(x, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("module", [
    nn.Linear(3, 4), nn.Linear(3, 4, bias=False), nn.Linear(3, 4, dtype=torch.float64),
    nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1, bias=False),
    nn.Conv1d(4, 4, 5, padding="same", groups=2, padding_mode="reflect"),
    nn.BatchNorm2d(8, eps=1e-3, momentum=None), nn.BatchNorm1d(4, affine=False),
    nn.LayerNorm((4, 5), elementwise_affine=False), nn.GroupNorm(2, 4),
    nn.Embedding(10, 4, padding_idx=0), nn.MultiheadAttention(8, 2, batch_first=True),
    nn.GELU(approximate="tanh"), nn.ReLU(inplace=True), nn.Dropout(0.25),
    nn.MaxPool2d(3, 2, 1), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), nn.Softmax(dim=-1),
    nn.Identity(),
])
def test_constructor_calls_rebuild_torch_layers(module: nn.Module) -> None:
    call = constructor_call(module)
    assert call is not None and call.startswith("torch.nn.")
    rebuilt = eval(call, {"torch": torch})
    assert tree_difference(module, rebuilt) is None
    assert repr(rebuilt) == repr(module)


def test_what_no_constructor_call_can_rebuild() -> None:
    class Custom(nn.Linear):
        pass

    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda *args: None)
    odd = nn.Linear(2, 2)
    odd.extra = 3   # state the constructor does not make
    lstm = nn.LSTM(4, 8)   # (*args, **kwargs): taken from build_model() instead
    for module in (Custom(2, 2), hooked, odd, nn.Sequential(nn.ReLU()), lstm):
        assert constructor_call(module) is None


def _local_global_stage() -> fx.GraphModule:
    def local_helper(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(local_helper, (x,)))
    return fx.GraphModule(nn.Module(), graph)


def test_a_global_that_cannot_be_imported_fails_at_save_time(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match=r"the code of stage 0 uses the global "
                                             r"'test_stage_code_local_helper' .* cannot "
                                             r"import: it is not a module-level object"):
        stage_source(_local_global_stage())


def test_generated_source_parses_as_python_38(tmp_path: Path) -> None:
    out, stages, _, _ = _wrapped_partition(tmp_path)
    for i in range(len(stages)):
        ast.parse(stage_file(out, i).read_text(), feature_version=(3, 8))


class _Config:
    """An object torch.fx can only print by its repr."""

    def __repr__(self) -> str:
        return "_Config()"


def test_a_constant_printed_as_a_name_fails_at_save_time() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.add, (x, _Config())))
    stage = fx.GraphModule(nn.Module(), graph)
    with pytest.raises(PartitionError, match=r"the code of stage 0 reads \['_Config'\], which "
                                             r"the stage source would not define"):
        stage_source(stage)
