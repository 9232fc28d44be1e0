"""Tests of asteroid_fx.partition: transparency on every example and plan shape, edge cases."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from partition_cases import (
    BatchlessAcross,
    InplaceAtCut,
    SizeAcross,
    TiedLM,
    TwoInOut,
    compose,
    even_lasts,
    example_spec,
    hand_plan,
    naive_graph,
)
from torch import nn

from asteroid_fx.partition import (
    STAGE_META_KEY,
    StageInfo,
    partition,
    stage_info,
    stage_io_names,
    tied_parameters,
)
from asteroid_fx.trace import LayerGraph, trace
from contracts.errors import PartitionError


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _stage_grads(stages: list[torch.fx.GraphModule]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, grad in _grads(stage).items():
            assert name not in out, f"parameter {name} is in two stages"
            out[name] = grad
    return out


def _assert_transparent(model: nn.Module, inputs: tuple[Any, ...], targets: torch.Tensor,
                        loss_fn: Any, stages: list[torch.fx.GraphModule]) -> None:
    out = compose(stages, inputs)
    ref = model(*inputs)
    assert torch.equal(out, ref)
    loss_fn(out, targets).backward()
    loss_fn(ref, targets).backward()
    got, want = _stage_grads(stages), _grads(model)
    assert set(got) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-7, msg=name)


# -- transparency on the bundled examples ------------------------------------------------------
EXAMPLES = [
    ("mlp.py", 4),
    ("skipnet.py", 4),
    ("mobilenet_v2.py", 3),
    ("resnet.py:cifar", 4),
    ("efficientnet.py", 3),
    ("bert_small.py", 4),
]


@pytest.mark.parametrize(("spec_name", "num_stages"), EXAMPLES)
def test_examples_are_transparent(spec_name: str, num_stages: int) -> None:
    spec = example_spec(spec_name)
    model = spec.build_model()
    inputs, targets = spec.example_inputs(2)
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, num_stages),
                     model_hash=graph.model_hash)
    stages = partition(model, inputs, plan, graph=graph)
    assert len(stages) == num_stages
    _assert_transparent(model, inputs, targets, spec.loss_fn, stages)


@pytest.mark.parametrize("spec_name", ["mlp.py", "skipnet.py", "resnet.py:cifar"])
def test_cut_tensors_match_the_layer_graph(spec_name: str) -> None:
    spec = example_spec(spec_name)
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    graph = trace(model, inputs)
    lasts = even_lasts(graph.num_layers, 5)
    stages = partition(model, inputs, hand_plan(graph.num_layers, lasts), graph=graph)
    io = stage_io_names(stages)
    for s, last in enumerate(lasts):
        assert list(io[s][1]) == graph.cut_tensors(last)
        assert io[s + 1][0] == io[s][1]
    assert io[0][0] == tuple(n.name for n in graph.graph_module.graph.nodes
                             if n.op == "placeholder")


# -- plan shapes ------------------------------------------------------------------------------
@pytest.fixture()
def skipnet() -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, Any, LayerGraph]:
    spec = example_spec("skipnet.py")
    model = spec.build_model()
    inputs, targets = spec.example_inputs(3)
    return model, inputs, targets, spec.loss_fn, trace(model, inputs)


def test_one_stage_is_the_whole_model(skipnet: Any) -> None:
    model, inputs, targets, loss_fn, graph = skipnet
    stages = partition(model, inputs, hand_plan(graph.num_layers), graph=graph)
    assert len(stages) == 1
    info = stage_info(stages[0])
    assert info.inputs == ("x",) and info.layers == (0, graph.num_layers - 1)
    assert set(info.params) == {n for n, _ in model.named_parameters()}
    _assert_transparent(model, inputs, targets, loss_fn, stages)


def test_every_layer_its_own_stage(skipnet: Any) -> None:
    model, inputs, targets, loss_fn, graph = skipnet
    n = graph.num_layers
    stages = partition(model, inputs, hand_plan(n, list(range(n - 1))), graph=graph)
    assert len(stages) == n
    _assert_transparent(model, inputs, targets, loss_fn, stages)


def test_skip_connection_passes_through_stages_in_between(skipnet: Any) -> None:
    model, inputs, targets, loss_fn, graph = skipnet
    names = [layer.name for layer in graph.layers]
    # stages: [stem, stem_act] [conv1, act1] [conv2, act2] [conv3 ... fc]
    lasts = [names.index("stem_act"), names.index("act1"), names.index("act2")]
    stages = partition(model, inputs, hand_plan(graph.num_layers, lasts), graph=graph)
    io = stage_io_names(stages)
    skip = io[0][1][0]
    for s in (1, 2):  # the stem's output crosses the cuts after stages 0, 1 and 2
        assert skip in io[s][0] and skip in io[s][1]
    assert skip in io[3][0]
    # a pass-through stage returns the very tensor it was given
    x = torch.randn(3, 16, 16, 16)
    stem = torch.randn(3, 8, 16, 16)
    out = stages[2](stem, x)
    assert out[io[2][1].index(skip)] is stem
    _assert_transparent(model, inputs, targets, loss_fn, stages)


# -- model shapes -----------------------------------------------------------------------------
def test_two_inputs_dict_output_and_batchnorm_buffers() -> None:
    model = TwoInOut()
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    graph = trace(model, (x, y))
    n = graph.num_layers
    reference = TwoInOut()
    reference.load_state_dict(model.state_dict())
    stages = partition(model, (x, y), hand_plan(n, [1, 3, n - 3]), graph=graph)
    out = compose(stages, (x, y))
    ref = reference(x, y)
    assert set(out) == {"out", "aux"} and isinstance(out["aux"], tuple)
    assert torch.equal(out["out"], ref["out"])
    assert torch.equal(out["aux"][0], ref["aux"][0]) and torch.equal(out["aux"][1], ref["aux"][1])
    # y is only used by the last stage: it passes through every stage before it
    assert all("y" in stage_info(s).inputs for s in stages)
    # BatchNorm's buffers live in the stage that runs it and are updated there
    holders = [s for s in stages if "bn.running_mean" in stage_info(s).buffers]
    assert len(holders) == 1
    bn_stage = holders[0]
    assert torch.equal(bn_stage.get_buffer("bn.running_mean"), reference.bn.get_buffer(
        "running_mean"))
    assert int(bn_stage.get_buffer("bn.num_batches_tracked")) == 1
    # the root-level parameter goes to the stage that adds it, under its own name
    assert sum("pos" in stage_info(s).params for s in stages) == 1
    (out["out"].sum() + out["aux"][1].sum()).backward()
    (ref["out"].sum() + ref["aux"][1].sum()).backward()
    got = _stage_grads(stages)
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-7)


def test_parameters_keep_names_and_stages_are_independent_copies() -> None:
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    graph = trace(model, inputs)
    stages = partition(model, inputs, hand_plan(graph.num_layers, [1, 3]), graph=graph)
    owned = [set(stage_info(s).params) for s in stages]
    assert owned[0] == {"fc1.weight", "fc1.bias"}
    assert set().union(*owned) == {n for n, _ in model.named_parameters()}
    assert sum(len(o) for o in owned) == len(list(model.parameters()))
    weight = stages[1].get_parameter("fc2.weight")
    assert torch.equal(weight, model.get_parameter("fc2.weight"))
    with torch.no_grad():
        weight.add_(1.0)
    # no storage shared with the model
    assert not torch.equal(weight, model.get_parameter("fc2.weight"))
    # a seeded state dict loads into each stage with non-strict filtering
    state = model.state_dict()
    for stage in stages:
        missing, _ = stage.load_state_dict(state, strict=False)
        assert missing == []
    assert torch.equal(stages[1].get_parameter("fc2.weight"), model.get_parameter("fc2.weight"))


def test_partition_traces_the_model_itself_when_no_graph_is_given() -> None:
    model = TwoInOut()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    graph = trace(model, (x, y), leaf_modules=[nn.BatchNorm1d])
    stages = partition(model, (x, y), hand_plan(graph.num_layers, [0]),
                       leaf_modules=[nn.BatchNorm1d])
    model.eval()
    for s in stages:
        s.eval()
    assert torch.equal(compose(stages, (x, y))["out"], model(x, y)["out"])


# -- in-place ops at a cut ----------------------------------------------------------------------
def test_inplace_ops_on_stage_inputs_clone_them() -> None:
    model = InplaceAtCut()
    x = torch.randn(5, 6)
    graph = trace(model, (x,))
    names = [layer.name for layer in graph.layers]
    # cut right before the in-place ReLU and right before the in-place mul_
    lasts = [names.index("a"), names.index("b")]
    reference = InplaceAtCut()
    reference.load_state_dict(model.state_dict())
    stages = partition(model, (x,), hand_plan(graph.num_layers, lasts), graph=graph)
    assert stage_info(stages[1]).cloned_inputs == ("a",)
    assert stage_info(stages[2]).cloned_inputs == ("b",)
    assert "clone" in stages[1].code
    # a runtime feeds each stage leaf tensors that require grad: in-place on them would fail
    acts: list[torch.Tensor] = [x]
    outs: list[Any] = []
    for stage in stages:
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in acts)
        result = stage(*args)
        outs.append((args, result))
        acts = list(result) if isinstance(result, tuple) else [result]
    ref = reference(x)
    assert torch.equal(acts[0], ref)
    # received inputs are left untouched (the stage works on its clone)
    args1, _ = outs[1]
    assert torch.equal(args1[0], compose(stages[:1], (x,))[0])


def test_inplace_stage_gradients_match() -> None:
    model = InplaceAtCut()
    x = torch.randn(5, 6)
    graph = trace(model, (x,))
    names = [layer.name for layer in graph.layers]
    stages = partition(model, (x,), hand_plan(graph.num_layers,
                                              [names.index("a"), names.index("b")]),
                       graph=graph)
    _assert_transparent(model, (x,), torch.zeros(5, 6),
                        lambda o, t: ((o - t) ** 2).sum(), stages)


# -- weight tying -----------------------------------------------------------------------------
def test_tied_parameter_is_copied_and_gradients_sum_to_the_unsplit_one() -> None:
    model = TiedLM()
    ids = torch.randint(0, 11, (3, 5))
    graph = trace(model, (ids,))
    names = [layer.name for layer in graph.layers]
    stages = partition(model, (ids,), hand_plan(graph.num_layers, [names.index("emb")]),
                       graph=graph)
    tied = tied_parameters(stages)
    assert set(tied) == {"emb.weight"}
    holders = tied["emb.weight"]
    assert [s for s, _ in holders] == [0, 1]
    assert holders[0] == (0, "emb.weight")
    out = compose(stages, (ids,))
    ref = model(ids)
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    total = torch.zeros_like(model.emb.weight)
    for s, name in holders:
        grad = stages[s].get_parameter(name).grad
        assert grad is not None
        total += grad
    torch.testing.assert_close(total, model.emb.weight.grad, rtol=1e-6, atol=1e-7)
    # the other parameters are in one stage each
    assert stage_info(stages[1]).tied == {holders[1][1]: "emb.weight"}


def test_no_tied_parameters_in_a_plain_model() -> None:
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    graph = trace(model, inputs)
    stages = partition(model, inputs, hand_plan(graph.num_layers, [2]), graph=graph)
    assert tied_parameters(stages) == {}


# -- rejected inputs --------------------------------------------------------------------------
def test_non_tensor_crossing_a_cut_is_rejected() -> None:
    model = SizeAcross()
    graph = naive_graph(model)  # trace() would keep the size next to its user
    names = [layer.name for layer in graph.layers]
    plan = hand_plan(graph.num_layers, [names.index("size")])
    with pytest.raises(PartitionError, match=r"non-tensor value \(a int\).*'size'.*move the cut"):
        partition(model, (torch.randn(3, 4),), plan, graph=graph)


def test_batchless_tensor_crossing_a_cut_is_rejected_unless_allowed() -> None:
    model = BatchlessAcross()
    graph = naive_graph(model)
    names = [layer.name for layer in graph.layers]
    plan = hand_plan(graph.num_layers, [names.index("exp")])
    x = torch.randn(3, 4)
    with pytest.raises(PartitionError, match=r"shape \[4\] without the batch dimension"):
        partition(model, (x,), plan, graph=graph)
    stages = partition(model, (x,), plan, graph=graph, check_batch_dim=False)
    assert torch.equal(compose(stages, (x,)), model(x))


def test_plan_for_another_layer_count_is_rejected(skipnet: Any) -> None:
    model, inputs, _, _, graph = skipnet
    with pytest.raises(PartitionError, match=r"12 layers but SkipNet traces to 11 layers"):
        partition(model, inputs, hand_plan(12, [3]), graph=graph)
    with pytest.raises(PartitionError, match=r"cover layers 0\.\.4 but the model has 11"):
        partition(model, inputs, hand_plan(5, [2], check_layers=False), graph=graph)


def test_node_outside_every_layer_is_rejected() -> None:
    model = SizeAcross()
    graph = naive_graph(model)
    broken = LayerGraph(graph_module=graph.graph_module, layers=graph.layers[1:],
                        cut_bytes=graph.cut_bytes[1:], input_bytes=0, model_hash="x",
                        model_name="broken", example_batch=0)
    renumbered = [type(layer)(**{**layer.__dict__, "index": i})
                  for i, layer in enumerate(broken.layers)]
    broken.layers = renumbered
    with pytest.raises(PartitionError, match=r"belongs to no layer"):
        partition(model, (torch.randn(2, 4),), hand_plan(len(renumbered)), graph=broken)


def test_stage_info_of_a_plain_module_is_an_error() -> None:
    with pytest.raises(PartitionError, match=r"carries no stage information"):
        stage_info(nn.Linear(2, 2))


def test_stage_info_round_trips_through_a_dict() -> None:
    info = StageInfo(index=1, layers=(2, 5), inputs=("a",), outputs=("b", "c"),
                     params=("w",), buffers=(), cloned_inputs=("a",), tied={"w": "v"})
    assert StageInfo.from_dict(info.to_dict()) == info
    model = TwoInOut()
    graph = trace(model, (torch.randn(2, 4), torch.randn(2, 4)))
    stages = partition(model, (torch.randn(2, 4), torch.randn(2, 4)),
                       hand_plan(graph.num_layers, [2]), graph=graph)
    assert stages[1].meta[STAGE_META_KEY]["index"] == 1


class _ViewWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h[:, :1].zero_()  # in-place through a view of the cut tensor
        return self.b(h) + h


def test_inplace_write_through_a_view_clones_the_input() -> None:
    model = _ViewWrite()
    graph = naive_graph(model)  # puts the view and the write in layers of their own
    names = [layer.name for layer in graph.layers]
    x = torch.randn(3, 4)
    stages = partition(model, (x,), hand_plan(graph.num_layers, [names.index("a")]),
                       graph=graph)
    assert stage_info(stages[1]).cloned_inputs == ("a",)
    received = compose(stages[:1], (x,))
    kept = received[0].clone()
    assert torch.equal(stages[1](*received), model(x))
    assert torch.equal(received[0], kept)  # the stage did not write into its input


def test_plan_for_another_model_hash_is_only_a_warning(
        skipnet: Any, caplog: pytest.LogCaptureFixture) -> None:
    model, inputs, _, _, graph = skipnet
    with caplog.at_level("WARNING", logger="asteroid_fx.partition"):
        stages = partition(model, inputs, hand_plan(graph.num_layers, [3], model_hash="f00"),
                           graph=graph)
    assert len(stages) == 2
    assert "plan model_hash f00 differs" in caplog.text
