"""Tests of asteroid_fx.trace: layer grouping, cut sizes, leaves, errors, hashes."""

from __future__ import annotations

import inspect
import operator
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.shape_prop import META_KEY, TensorMeta
from asteroid_fx.trace import BATCHED_KEY, LayerGraph, trace
from contracts.errors import TraceError
from contracts.table import TiedWeight

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# ---------------------------------------------------------------------------- helpers

_CHEAP = {"view", "size", "flatten", "getitem", "getattr", "chunk", "transpose", "reshape"}


def _does_work(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return not isinstance(gm.get_submodule(str(node.target)), (nn.Identity, nn.Flatten))
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return name not in _CHEAP and node.meta.get(BATCHED_KEY, False)
    return False


def check_invariants(graph: LayerGraph) -> None:
    """The contract of LayerGraph, checked on any traced graph."""
    gm = graph.graph_module
    nodes = list(gm.graph.nodes)
    owner = graph.node_to_layer()
    listed = [name for layer in graph.layers for name in layer.node_names]
    # every node but placeholders/output in exactly one layer, none of those in any
    assert len(listed) == len(set(listed))
    assert set(listed) == {n.name for n in nodes if n.op not in ("placeholder", "output")}
    assert [layer.index for layer in graph.layers] == list(range(len(graph.layers)))
    for node in nodes:
        if _does_work(gm, node):
            assert node.name in owner
    # layers are in topological order: an edge never goes to an earlier layer
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        for inp in node.all_input_nodes:
            if inp.op != "placeholder":
                assert owner[inp.name] <= owner[node.name], (inp.name, node.name)
    # each layer's nodes are contiguous in the graph, layers in graph order
    seq = [owner[n.name] for n in nodes if n.op not in ("placeholder", "output")]
    assert seq == sorted(seq)
    order = {n.name: i for i, n in enumerate(nodes)}
    for layer in graph.layers:
        idx = [order[name] for name in layer.node_names]
        assert idx == sorted(idx)
    # only batch-dimensioned tensors cross a cut, and cut_bytes adds up their sizes
    by_name = {n.name: n for n in nodes}
    assert len(graph.cut_bytes) == len(graph.layers) - 1
    for i, expected in enumerate(graph.cut_bytes):
        total = 0
        for name in graph.cut_tensors(i):
            meta = by_name[name].meta[META_KEY]
            assert isinstance(meta, TensorMeta), (i, name, meta)
            assert meta.shape[0] == graph.example_batch, (i, name, meta)
            total += meta.nbytes // graph.example_batch
        assert total == expected
    # every parameter/buffer owned by exactly one layer
    owned = [q for layer in graph.layers for q in layer.param_names]
    assert len(owned) == len(set(owned))
    state = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    state |= {k for k, _ in gm.named_buffers(remove_duplicate=False)}
    assert set(owned) == state
    assert re.fullmatch(r"[0-9a-f]{16}", graph.model_hash)


def _skipnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    spec = load_model_spec(str(EXAMPLES / "skipnet.py"))
    inputs, _ = spec.example_inputs(4)
    return spec.build_model(), inputs


# ---------------------------------------------------------------------------- cut sizes


def test_skipnet_cut_bytes_match_hand_computation() -> None:
    model, inputs = _skipnet()
    graph = trace(model, inputs)
    f = 4  # bytes per float32
    stem = 8 * 16 * 16 * f  # stem conv / its ReLU: 8 channels of 16x16
    inner = 16 * 16 * 16 * f  # conv1, conv2 and their ReLUs: 16 channels
    assert [layer.name for layer in graph.layers] == [
        "stem", "stem_act", "conv1", "act1", "conv2", "act2", "conv3", "add", "out_act",
        "pool", "fc",
    ]  # fmt: skip
    assert graph.cut_bytes == [
        stem,  # after stem: its output
        stem,  # after stem_act: the skip value, also conv1's input
        stem + inner,  # inside the skip: skip + conv1 output
        stem + inner,  # skip + act1
        stem + inner,  # skip + conv2
        stem + inner,  # skip + act2
        stem + stem,  # skip + conv3 output (8 channels)
        stem,  # after the add
        stem,  # after out_act
        8 * f,  # pooled and flattened: 8 floats
    ]
    assert graph.input_bytes == 3 * 16 * 16 * f
    assert graph.cut_tensors(2) == ["stem_act", "conv1"]
    assert graph.cut_tensors(9) == ["flatten"]
    assert graph.layers[9].node_names == ("pool", "flatten")  # flatten joins its producer
    assert graph.layers[2].output_bytes == inner
    assert graph.example_batch == 4
    check_invariants(graph)


def test_skipnet_activation_bytes_follow_autograd() -> None:
    model, inputs = _skipnet()
    graph = trace(model, inputs)
    act = {layer.name: layer.activation_bytes for layer in graph.layers}
    # a conv saves its input (the stem: the 3x16x16 image), a ReLU its output; a tensor
    # saved twice (ReLU output = next conv's input) is counted at its first saver only
    assert act["stem"] == 3 * 16 * 16 * 4
    assert act["stem_act"] == 8 * 16 * 16 * 4
    assert act["act1"] == act["act2"] == 16 * 16 * 16 * 4
    assert act["conv1"] == act["conv2"] == act["add"] == 0
    assert all(p.grad is None for p in model.parameters())  # no backward was run


def test_cut_index_out_of_range() -> None:
    model, inputs = _skipnet()
    graph = trace(model, inputs)
    with pytest.raises(IndexError, match="cut index 10 out of range"):
        graph.cut_tensors(10)


def test_traced_module_computes_the_same_output() -> None:
    model, inputs = _skipnet()
    graph = trace(model, inputs)
    torch.testing.assert_close(graph.graph_module(*inputs), model(*inputs))


# ---------------------------------------------------------------------------- grouping


class _SizeLater(nn.Module):
    """``b = x.size(0)`` read at the top, used layers later (the size must not cross cuts)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(12, 12)
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape
        y = torch.relu(self.fc1(x))
        y = torch.relu(self.fc2(y))
        y = self.fc3(y).view(b, 3, 4) + self.pos[:, : n // 4]
        return y.reshape(b, -1)


def test_sizes_are_recomputed_where_used_and_never_cross() -> None:
    model = _SizeLater()
    x = torch.randn(5, 12)
    graph = trace(model, (x,))
    check_invariants(graph)
    names = [layer.name for layer in graph.layers]
    assert names == ["fc1", "relu", "fc2", "relu_1", "fc3", "add"]
    gm = graph.graph_module
    owner = graph.node_to_layer()
    # the batch size `b` is read again from the tensor each user reshapes ...
    sizes = [n for n in gm.graph.nodes if n.target == "size"]
    assert [(n.args, owner[n.name]) for n in sizes] == [
        ((gm.graph.find_nodes(op="call_module", target="fc3")[0], 0), 4),
        ((next(n for n in gm.graph.nodes if n.name == "add"), 0), 5),
    ]
    # ... while `n` (a feature size) is read from x where it is used: x crosses as a tensor
    (shape_read,) = [n for n in gm.graph.nodes if n.target is getattr and n.args[1] == "shape"]
    assert owner[shape_read.name] == 5 and shape_read.meta[BATCHED_KEY] is False
    assert all("x" in graph.cut_tensors(i) for i in range(len(graph.cut_bytes)))
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(x[:3]), model(x[:3]))  # no batch size baked in


class _BatchAtTop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        y = torch.relu(self.conv(x))
        return self.fc(y.view(batch_size, -1))


def test_batch_size_read_at_the_top_does_not_keep_the_input_alive() -> None:
    model = _BatchAtTop()
    x = torch.randn(2, 3, 8, 8)
    graph = trace(model, (x,))
    check_invariants(graph)
    assert graph.cut_tensors(0) == ["conv"]  # not the 3x8x8 input
    assert graph.cut_bytes == [4 * 8 * 8 * 4, 4 * 8 * 8 * 4]
    torch.testing.assert_close(graph.graph_module(x), model(x))


def test_fixed_batch_size_models_are_rejected() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).view(4, 2, 4)

    with pytest.raises(TraceError, match="batch of 4 but not with 5.*any size"):
        trace(Fixed(), (torch.randn(4, 8),))


def test_stacked_tensor_with_batch_sized_dim0_is_not_batched() -> None:
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pair = torch.stack([self.fc(x), x])  # (2, B, 3): dim 0 is not the batch
            return torch.relu(pair.sum(0))

    graph = trace(Stack(), (torch.randn(2, 3),))  # batch 2 == len(pair)
    check_invariants(graph)
    stack = next(n for n in graph.graph_module.graph.nodes if n.name == "stack")
    assert stack.meta[BATCHED_KEY] is False
    assert [layer.name for layer in graph.layers] == ["fc", "sum_1", "relu"]


def test_root_parameter_belongs_to_the_layer_using_it() -> None:
    graph = trace(_SizeLater(), (torch.randn(5, 12),))
    add = graph.layers[-1]
    assert add.param_names == ("pos",)
    assert add.param_bytes == 12 * 4
    fc1 = graph.layers[0]
    assert fc1.param_names == ("fc1.weight", "fc1.bias")
    assert fc1.param_bytes == (12 * 12 + 12) * 4


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_shared_parameters_are_counted_once() -> None:
    graph = trace(_Tied(), (torch.randn(3, 4),))
    assert graph.layers[0].param_bytes == (16 + 4) * 4
    assert graph.layers[2].param_names == ("b.weight", "b.bias")
    assert graph.layers[2].param_bytes == 4 * 4  # the tied weight was counted by layer 0
    # ... and the graph names the tie, which a plan splitting layers 0 and 2 pays for
    assert graph.tied == (TiedWeight("a.weight", (0, 2), 16 * 4),)
    from cost_models.analytic import analytic_table

    assert analytic_table(graph, _Tied()).tied == graph.tied
    assert trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(3, 4),)).tied == ()


class _PairOut(nn.Module):
    """An opaque module returning a batched tensor and a non-batched statistic."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.mean(0)


class _FarUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _PairOut()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, stat = self.pair(x)
        y = self.fc2(torch.relu(self.fc1(y)))
        return y + stat


def test_non_batched_value_used_far_away_merges_layers() -> None:
    model = _FarUse()
    x = torch.randn(4, 6)
    graph = trace(model, (x,), leaf_modules=[_PairOut])
    check_invariants(graph)
    assert len(graph.layers) == 1  # `stat` has no batch dimension: nothing can be cut
    assert graph.layers[0].op == "_PairOut"
    torch.testing.assert_close(graph.graph_module(x), model(x))


def test_multihead_attention_is_a_leaf() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0] + x

    graph = trace(Attn(), (torch.randn(2, 5, 8),))
    assert [layer.op for layer in graph.layers] == ["MultiheadAttention", "add"]
    assert graph.layers[0].node_names == ("mha", "getitem")
    assert graph.layers[0].activation_bytes > 0
    check_invariants(graph)


def test_default_arguments_are_baked_in() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            y = self.fc(x)
            return y if mask is None else y * mask

    graph = trace(Masked(), (torch.randn(2, 3),))
    placeholders = [n.name for n in graph.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"]
    assert [layer.name for layer in graph.layers] == ["fc"]
    assert graph.cut_bytes == []


def test_batch_of_one_is_replicated_for_shapes() -> None:
    model, _ = _skipnet()
    graph = trace(model, (torch.randn(1, 3, 16, 16),))
    assert graph.example_batch == 2
    assert graph.cut_bytes[0] == 8 * 16 * 16 * 4


def test_batchnorm_statistics_are_left_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = trace(model, (torch.randn(2, 3, 8, 8),))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    bn = graph.layers[1]
    assert bn.op == "batchnorm2d"
    assert bn.param_bytes == 2 * 4 * 4
    assert bn.buffer_bytes == 2 * 4 * 4 + 8  # running mean/var + num_batches_tracked (int64)


def test_model_hash_is_stable_and_depends_on_shapes() -> None:
    torch.manual_seed(0)
    a = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    torch.manual_seed(1)
    b = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(3, 4),))
    c = trace(nn.Sequential(nn.Linear(4, 5), nn.ReLU()), (torch.randn(2, 4),))
    assert a.model_hash == b.model_hash  # weights and batch do not matter
    assert a.model_hash != c.model_hash
    assert a.model_name == "Sequential"
    assert trace(nn.Linear(2, 2), (torch.randn(2, 2),), model_name="tiny").model_name == "tiny"


def test_summary_lists_every_layer() -> None:
    model, inputs = _skipnet()
    graph = trace(model, inputs)
    lines = graph.summary().splitlines()
    assert len(lines) == 1 + len(graph.layers)
    assert "conv1" in lines[3] and "24576" in lines[3]


# ---------------------------------------------------------------------------- errors


class Gate(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


def _line_of(fn: object, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_untraceable_module_names_class_line_and_fix() -> None:
    line = _line_of(Gate.forward, "if x.sum() > 0")
    with pytest.raises(TraceError) as e:
        trace(_Gated(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "cannot trace Gate (module 'gate')" in msg
    assert f"test_trace.py:{line}: if x.sum() > 0:" in msg
    assert "torch.export(strict=False) cannot capture _Gated: GuardOnDataDependentSymNode" in msg
    assert msg.rstrip().splitlines()[-1].startswith("  fix: keep the module opaque")
    assert "--leaf Gate or --leaf gate" in msg and "leaf_modules=['Gate']" in msg
    assert e.value.__cause__ is not None


def test_leaf_modules_fix_works_by_class_and_by_name() -> None:
    x = torch.randn(2, 4)
    model = _Gated()
    for leaves in ([Gate], ["gate"], ["Gate"]):   # what the message suggests
        graph = trace(model, (x,), leaf_modules=leaves)
        assert [layer.op for layer in graph.layers] == ["linear", "Gate"]
        torch.testing.assert_close(graph.graph_module(x), model(x))


def test_untraceable_root_suggests_moving_code_into_a_submodule() -> None:
    with pytest.raises(TraceError, match=r"(?s)Gate \(the root module\).*ThatModuleClass"):
        trace(Gate(), (torch.randn(2, 4),))


@pytest.mark.parametrize(
    ("leaves", "pattern"),
    [
        ([3], "must be nn.Module classes, class names or qualified module names, got 3"),
        (["nope"], "'nope', which is not a submodule of _Gated .*fc, gate"),
    ],
)
def test_bad_leaf_modules(leaves: list[object], pattern: str) -> None:
    with pytest.raises(TraceError, match=pattern):
        trace(_Gated(), (torch.randn(2, 4),), leaf_modules=leaves)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        ((), "non-empty tuple of tensors"),
        ((torch.randn(2, 4), 3), r"example_inputs\[1\] must be a tensor"),
        ((torch.tensor(1.0),), r"example_inputs\[0\] must be a tensor .*\(0-d\)"),
        ((torch.randn(2, 4), torch.randn(3, 4)), "disagree on the batch size"),
        ((torch.randn(0, 4),), "empty batch"),
    ],
)
def test_bad_example_inputs(inputs: tuple[object, ...], pattern: str) -> None:
    with pytest.raises(TraceError, match=pattern):
        trace(nn.Linear(4, 4), inputs)  # type: ignore[arg-type]


def test_wrong_input_shape_names_the_node() -> None:
    with pytest.raises(TraceError, match=r"shape propagation failed at node %fc"):
        trace(_Gated(), (torch.randn(2, 5),), leaf_modules=[Gate])


def test_missing_forward_argument() -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    with pytest.raises(TraceError, match="parameter 'y' without a default"):
        trace(Two(), (torch.randn(2, 2),))


def test_no_batched_work_is_an_error() -> None:
    class Stat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return operator.add(x.sum(), 1)

    with pytest.raises(TraceError, match="no layer found"):
        trace(Stat(), (torch.randn(2, 2),))


class _ChunkInput(nn.Module):
    """Cheap ops on a model input used by two layers, and an arange used by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 3)
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        idx = torch.arange(x.size(1) // 2, dtype=torch.float32)
        y = torch.relu(self.fc1(a) + idx[:3])
        return self.fc2(y) * b + idx[:3]


def test_deferred_cheap_nodes_are_duplicated_not_merged() -> None:
    model = _ChunkInput()
    x = torch.randn(4, 6)
    graph = trace(model, (x,))
    check_invariants(graph)
    assert [layer.name for layer in graph.layers] == ["fc1", "add", "relu", "fc2", "mul", "add_1"]
    aranges = [n for n in graph.graph_module.graph.nodes if n.target is torch.arange]
    assert len(aranges) == 2  # recomputed in the second layer using it
    torch.testing.assert_close(graph.graph_module(x), model(x))


def test_large_example_batches_are_cut_for_shape_propagation() -> None:
    model, _ = _skipnet()
    x = torch.randn(16, 3, 16, 16)
    graph = trace(model, (x,))
    assert graph.example_batch == 4
    stem = next(n for n in graph.graph_module.graph.nodes if n.name == "stem")
    assert stem.meta[META_KEY].shape == (4, 8, 16, 16)
    assert graph.cut_bytes[2] == 24576  # per sample, as with any batch
    torch.testing.assert_close(graph.graph_module(x), model(x))


class Looper(nn.Module):
    """Python loop over a traced size: also untraceable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.size(0)):
            x = x + 1
        return x


def test_other_trace_failures_name_the_line_too() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loop = Looper()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.loop(x)

    line = _line_of(Looper.forward, "for _ in range")
    with pytest.raises(TraceError) as e:
        trace(Outer(), (torch.randn(2, 4),))
    assert "cannot trace Looper (module 'loop'): TypeError" in str(e.value)
    assert f"test_trace.py:{line}: for _ in range(x.size(0)):" in str(e.value)
    assert "--leaf Looper" in str(e.value)
