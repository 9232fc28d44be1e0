"""Tests of asteroid_fx.modes: stages compute what the model computes in train and in eval mode."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
from partition_cases import compose, even_lasts, hand_plan
from torch import nn

from asteroid_fx.model_spec import ModelSpec, load_model_spec
from asteroid_fx.modes import ModeStage, dispatch_source
from asteroid_fx.onnx_export import export_stage_onnx, run_onnx
from asteroid_fx.package import load_partition, save_partition, stage_example_args
from asteroid_fx.partition import partition, stage_info
from asteroid_fx.trace import trace
from contracts.errors import PartitionError, TraceError
from runtime.stage_io import stage_file

MODAL_MODEL = '''
"""Everything that depends on self.training: dropout three ways, stochastic depth, BatchNorm,
an auxiliary output only in train mode (as torchvision's googlenet and inception_v3)."""
from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drops whole samples in training (torchvision.ops.stochastic_depth, mode "row")."""
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")


class Block(nn.Module):
    def __init__(self, width: int, p: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn(self.linear(x))))
        y = F.dropout(y, 0.2, self.training)
        if self.training:                     # hand-written: a branch only in train mode
            y = y * (torch.rand_like(y[:, :1]) > 0.25).to(y.dtype)
        return x + stochastic_depth(y, self.p, self.training)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Block(8, 0.1 * (i + 1)) for i in range(4)])
        self.aux = nn.Linear(8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor):
        h = self.stem(x)
        h = self.blocks[1](self.blocks[0](h))
        aux = self.aux(h) if self.training else None
        h = self.blocks[3](self.blocks[2](h))
        out = self.head(h)
        if self.training:
            return out, aux
        return out


def build_model() -> nn.Module:
    return Net()


def sample_batch(batch_size: int):
    return (torch.randn(batch_size, 6),), torch.randint(0, 3, (batch_size,))


def loss_fn(outputs, targets):
    if isinstance(outputs, tuple):
        out, aux = outputs
        return F.cross_entropy(out, targets) + 0.3 * F.cross_entropy(aux, targets)
    return F.cross_entropy(outputs, targets)
'''


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = tmp_path_factory.mktemp("modal") / "modal_model.py"
    path.write_text(MODAL_MODEL)
    return load_model_spec(str(path))


def _layer_index(graph: Any, prefix: str) -> int:
    return next(layer.index for layer in graph.layers if layer.name.startswith(prefix))


def _flat(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple) else [value]


def _assert_same_in_mode(reference: nn.Module, stages: list[nn.Module], spec: ModelSpec,
                         training: bool, batch: int = 5) -> None:
    """Same seed: equal outputs, gradients and BatchNorm buffers (``reference`` is the model,
    run alongside the stages since they were made, so their buffers agree)."""
    for module in (reference, *stages):
        module.zero_grad(set_to_none=True)
    (x,), y = spec.sample_batch(batch)
    reference.train(training)
    for stage in stages:
        stage.train(training)
    torch.manual_seed(7)
    got = compose(stages, (x,))
    torch.manual_seed(7)
    want = reference(x)
    assert type(got) is type(want)
    assert len(_flat(got)) == len(_flat(want))
    for g, w in zip(_flat(got), _flat(want), strict=True):
        assert torch.equal(g, w)
    spec.loss_fn(got, y).backward()
    spec.loss_fn(want, y).backward()
    seen = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            expected = reference.get_parameter(name).grad
            if param.grad is None:
                assert expected is None or not training and name.startswith("aux"), name
                continue
            seen.add(name)
            torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=1e-7, msg=name)
        for name, buffer in stage.named_buffers():
            assert torch.equal(buffer, reference.get_buffer(name)), name
    assert seen == {n for n, p in reference.named_parameters() if p.grad is not None}


# -- tracing ----------------------------------------------------------------------------------
def test_the_eval_graph_is_kept_when_the_modes_differ(spec: ModelSpec) -> None:
    model = spec.build_model()
    model.blocks[0].bn.eval()   # a frozen BatchNorm: flags are restored exactly
    flags = [m.training for m in model.modules()]
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    assert [m.training for m in model.modules()] == flags
    assert graph.eval_graph is not None
    train_code, eval_code = graph.graph_module.code, graph.eval_graph.graph_module.code
    assert "training = True" in train_code and "training = False" not in train_code
    assert "training = False" in eval_code and "training = True" not in eval_code
    assert "rand_like" in train_code and "rand_like" not in eval_code
    assert "aux" in train_code and "aux" not in eval_code
    assert graph.eval_graph.num_layers < graph.num_layers


def test_a_model_in_eval_mode_is_traced_in_train_mode_too(spec: ModelSpec) -> None:
    model = spec.build_model().eval()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    assert not any(m.training for m in model.modules())
    assert graph.model_hash == trace(spec.build_model(), (x,)).model_hash
    assert graph.eval_graph is not None


def test_a_model_without_mode_dependent_code_has_one_graph() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert trace(model, (torch.randn(3, 4),)).eval_graph is None


class _EvalOnlyDataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if not self.training and y.sum() > 0:   # not traceable, and only in eval mode
            return -y
        return y


def test_a_model_that_traces_only_in_train_mode_names_the_mode() -> None:
    with pytest.raises(TraceError, match="traces in train mode but not in eval mode"):
        trace(_EvalOnlyDataDependent(), (torch.randn(3, 4),))


# -- partitioning -----------------------------------------------------------------------------
@pytest.mark.parametrize("num_stages", [2, 3, 5])
def test_composed_stages_equal_the_model_in_both_modes(spec: ModelSpec, num_stages: int) -> None:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, num_stages))
    stages = partition(model, (x,), plan, graph=graph)
    assert any(isinstance(s, ModeStage) for s in stages)
    for training in (True, False, True, False):
        _assert_same_in_mode(model, stages, spec, training)


def test_a_stage_of_train_only_layers_passes_its_inputs_through_in_eval(spec: ModelSpec) -> None:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    aux = _layer_index(graph, "aux")
    stages = partition(model, (x,), hand_plan(graph.num_layers, [aux - 1, aux]), graph=graph)
    middle = stage_info(stages[1])
    assert set(middle.params) == {"aux.weight", "aux.bias"}
    # train: h -> (h, aux); eval: h -> (h,), the same name (eval_inputs None: as in train)
    assert middle.eval_inputs is None and middle.eval_outputs == middle.inputs
    assert middle.outputs == (*middle.inputs, "aux")
    assert stage_info(stages[2]).eval_inputs is not None
    h = torch.randn(4, 8)
    stages[1].eval()
    assert stages[1](h)[0] is h
    for training in (False, True):
        _assert_same_in_mode(model, stages, spec, training)


def test_each_parameter_lives_in_one_stage_in_both_modes(spec: ModelSpec) -> None:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    stages = partition(model, (x,), hand_plan(graph.num_layers, list(range(graph.num_layers - 1))),
                       graph=graph)
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


class _SwapsOrder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.b(torch.relu(self.a(x)))
        return self.a(torch.relu(self.b(x)))


def test_eval_mode_that_needs_parameters_out_of_order_is_refused() -> None:
    model = _SwapsOrder()
    x = torch.randn(3, 4)
    graph = trace(model, (x,))
    wanted = r"runs \['b'\].*another order than in train mode.*stage\(s\) \[1\]"
    with pytest.raises(PartitionError, match=wanted):
        partition(model, (x,), hand_plan(graph.num_layers, [0]), graph=graph)
    one = partition(model, (x,), hand_plan(graph.num_layers), graph=graph)   # one stage: fine
    assert torch.equal(compose(one, (x,)), model(x))
    one[0].eval()
    model.eval()
    assert torch.equal(compose(one, (x,)), model(x))


# -- ModeStage ----------------------------------------------------------------------------------
def _mode_stage(spec: ModelSpec) -> tuple[ModeStage, torch.Tensor]:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    stages = partition(model, (x,), hand_plan(graph.num_layers, even_lasts(graph.num_layers, 2)),
                       graph=graph)
    stage = stages[0]
    assert isinstance(stage, ModeStage)
    return stage, x


def test_copies_keep_both_modes_and_pickling_is_refused(spec: ModelSpec) -> None:
    stage, x = _mode_stage(spec)
    stage.get_submodule("blocks.0.bn").eval()
    deep = copy.deepcopy(stage)
    assert isinstance(deep, ModeStage) and deep.eval_graph is not stage.eval_graph
    assert not deep.get_submodule("blocks.0.bn").training
    for (n1, p1), (n2, p2) in zip(stage.named_parameters(), deep.named_parameters(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2) and p1 is not p2
    shallow = copy.copy(stage)
    assert shallow.get_parameter("stem.weight") is stage.get_parameter("stem.weight")
    for module in (stage, deep, shallow):
        module.eval()
    with torch.no_grad():
        assert torch.equal(deep(x)[0], stage(x)[0]) and torch.equal(shallow(x)[0], stage(x)[0])
        assert torch.equal(stage.eval_module()(x)[0], stage(x)[0])
    with pytest.raises(TypeError, match="save_partition"):
        pickle.dumps(stage)


def test_dispatch_source() -> None:
    same = dispatch_source(["x", "h"], ["x", "h"])
    assert "def forward(self, x, h):" in same and "self.forward_eval(x, h)" in same
    other = dispatch_source(["x", "aux"], ["x"])
    assert "def forward(self, *args):" in other and "self.forward_train(*args)" in other
    assert "*args" in dispatch_source(None, None)
    namespace: dict[str, Any] = {}
    exec(compile(other, "<test>", "exec"), namespace)

    class Fake:
        training = True

        def forward_train(self, *args: Any) -> str:
            return "train"

        def forward_eval(self, *args: Any) -> str:
            return "eval"

    fake = Fake()
    assert namespace["forward"](fake, 1, 2) == "train"
    fake.training = False
    assert namespace["forward"](fake, 1) == "eval"


# -- saved partitions and ONNX --------------------------------------------------------------------
def test_saved_stages_run_both_modes(spec: ModelSpec, tmp_path: Path) -> None:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, 3), micro_batch=4)
    stages = partition(model, (x,), plan, graph=graph)
    save_partition(tmp_path, plan, stages, model_spec=spec, example_inputs=(x,), onnx=False)
    source = stage_file(tmp_path, 1).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    methods = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert {"forward", "forward_train", "forward_eval"} <= methods
    assert "training = True" in source and "training = False" in source
    _, loaded = load_partition(tmp_path)
    assert [stage_info(s) for s in loaded] == [stage_info(s) for s in stages]
    for training in (True, False):
        _assert_same_in_mode(model, loaded, spec, training)


def test_onnx_exports_the_eval_mode_of_stochastic_depth(spec: ModelSpec, tmp_path: Path) -> None:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, 3), micro_batch=4)
    stages = partition(model, (x,), plan, graph=graph)
    files = save_partition(tmp_path, plan, stages, model_spec=spec, example_inputs=(x,))
    assert {f"stage_{i}.onnx" for i in range(3)} <= set(files)
    args = stage_example_args(stages, (x,))
    model.eval()
    with torch.no_grad():
        got = run_onnx(tmp_path / "stage_2.onnx", args[2])
        assert len(got) == 1   # eval mode: no aux output
        torch.testing.assert_close(got[0], model(x), rtol=1e-4, atol=1e-5)
    # a train-mode stage is still exported in eval mode, and its flags are restored
    stage = stages[0]
    assert stage.training
    export_stage_onnx(stage, args[0], tmp_path / "again.onnx")
    assert stage.training


def test_a_pass_through_stage_is_a_graph_module(spec: ModelSpec) -> None:
    model = spec.build_model()
    (x,), _ = spec.sample_batch(4)
    graph = trace(model, (x,))
    aux = _layer_index(graph, "aux")
    stages = partition(model, (x,), hand_plan(graph.num_layers, [aux - 1, aux]), graph=graph)
    assert all(isinstance(s, fx.GraphModule) for s in stages)
