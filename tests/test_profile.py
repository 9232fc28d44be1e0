"""Tests of cost_models.profile: measured per-layer times, fitting, splitting and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import cost_models.profile as profile_module
from asteroid_fx.costs import profile
from asteroid_fx.trace import trace
from contracts.errors import CostModelError
from contracts.table import CostTable, TimeFit
from cost_models.profile import _chain_pass, fit_time, in_place_layers, split_layers


class ConvNet(nn.Module):
    """Compute dominates: 3x3 convolutions on 24x24 maps, with BN and an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 3, padding=1)
        self.bn = nn.BatchNorm2d(48)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(48, 48, 3, padding=1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv1(x)))
        h = h + self.conv2(h)  # a skip connection
        return self.fc(h.mean((2, 3)))


def conv_batch(b: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (torch.randn(b, 3, 24, 24),), torch.randint(0, 10, (b,))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_batch(b: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (torch.randn(b, 8),), torch.randint(0, 2, (b,))


@pytest.fixture(scope="module")
def measured() -> CostTable:
    torch.manual_seed(0)
    return profile(ConvNet(), conv_batch, (1, 2, 4, 8), repeats=5, warmup=1)


def test_times_are_positive_and_grow_with_batch(measured: CostTable) -> None:
    fwd = measured.meta["fwd_median_s"]
    bwd = measured.meta["bwd_median_s"]
    assert len(fwd) == len(bwd) == measured.num_layers
    assert all(t > 0 for row in fwd for t in row)
    total = [sum(row[j] for row in fwd) + sum(row[j] for row in bwd) for j in range(4)]
    # b = 8 > b = 2 and b = 4 > b = 1 (4x the work each), with room for a noisy machine
    assert total[3] > total[1]
    assert total[2] > total[0]
    assert total[3] > 2 * total[0]
    per_sample = sum(c.fwd.per_sample_s + c.bwd.per_sample_s for c in measured.layers)
    assert per_sample > 0
    assert sum(c.fwd.at(8) for c in measured.layers) > sum(c.fwd.at(1) for c in measured.layers)
    convs = [c for c in measured.layers if c.op == "conv2d"]
    assert all(c.bwd.at(8) > 0 for c in convs)


def test_table_matches_the_trace(measured: CostTable) -> None:
    graph = trace(ConvNet(), conv_batch(2)[0])
    assert [c.name for c in measured.layers] == [layer.name for layer in graph.layers]
    assert list(measured.cut_bytes) == list(graph.cut_bytes)
    assert measured.model_hash == graph.model_hash
    assert measured.source == "measured"
    assert measured.batch_sizes == (1, 2, 4, 8)
    assert measured.meta["num_threads"] == 1
    conv1 = next(c for c in measured.layers if c.name == "conv1")
    assert conv1.flops == 2 * 3 * 9 * 48 * 24 * 24  # analytic FLOPs filled in too


def test_json_round_trip_is_lossless(measured: CostTable, tmp_path: Any) -> None:
    assert CostTable.from_json(measured.to_json()) == measured
    path = tmp_path / "costs.json"
    measured.save(path)
    assert CostTable.load(path) == measured


def test_model_state_threads_and_rng_are_restored() -> None:
    model = ConvNet().eval()
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.set_num_threads(2)
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        progress: list[tuple[int, int, str]] = []
        table = profile(model, conv_batch, (2,), repeats=1, warmup=0,
                        progress=lambda d, t, w: progress.append((d, t, w)))
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(model.conv1.weight.grad, torch.ones_like(model.conv1.weight))
    assert model.conv2.weight.grad is None
    passes = 1  # warmup 0 + repeats 1, one batch size
    assert progress[0] == (0, passes, "starting")
    assert [d for d, _, _ in progress] == list(range(passes + 1))
    assert all(t == passes for _, t, _ in progress)
    assert table.update_s_per_byte > 0 and table.meta["method"] == "chain"


def test_split_layers_reproduce_the_model() -> None:
    model = ConvNet().eval()
    inputs = conv_batch(2)[0]
    graph = trace(model, inputs)
    layers = split_layers(graph)
    assert len(layers) == len(graph.layers)
    env: dict[str, Any] = {"x": inputs[0]}
    for layer in layers:
        outs = layer.module(*(env[n] for n in layer.inputs))
        env.update(zip(layer.outputs, outs, strict=True))
    out_node = next(n for n in graph.graph_module.graph.nodes if n.op == "output")
    result = env[out_node.args[0].name]
    with torch.no_grad():
        assert torch.allclose(result, model(inputs[0]), atol=1e-5)
    # the skip connection: the add layer reads the ReLU output and conv2's output
    add = next(m for m in layers if graph.layers[m.index].op == "add")
    assert len(add.inputs) == 2


def test_fit_time_is_non_negative_least_squares() -> None:
    fit = fit_time([1, 2, 4, 8], [3.0, 5.0, 9.0, 17.0])
    assert fit.intercept_s == pytest.approx(1.0)
    assert fit.per_sample_s == pytest.approx(2.0)
    clipped = fit_time([1, 2, 4, 8], [0.5, 2.0, 4.5, 9.5])  # line would cross below zero
    assert clipped.intercept_s == 0.0
    assert clipped.per_sample_s == pytest.approx(
        (0.5 + 4 + 18 + 76) / (1 + 4 + 16 + 64)
    )
    flat = fit_time([1, 2, 4], [3.0, 2.0, 1.0])  # decreasing: constant
    assert flat == TimeFit(2.0, 0.0)
    assert fit_time([4], [2.0]) == TimeFit(0.0, 0.5)
    with pytest.raises(CostModelError, match="need one time per batch size"):
        fit_time([1, 2], [1.0])
    with pytest.raises(CostModelError, match=r"finite and >= 0, got \[1.0, -1.0\]"):
        fit_time([1, 2], [1.0, -1.0])


@pytest.mark.parametrize(
    ("batch_sizes", "match"),
    [((), "batch_sizes is empty"), ((1, 0), r"positive integers, got 0 in \[1, 0\]"),
     ((-3,), "got -3"), ((2.5,), "got 2.5"),
     # a bare number or None was "TypeError: 'int' object is not iterable"
     (4, "batch_sizes must be a list of batch sizes, e.g. \\(1, 2, 4, 8\\), got 4"),
     (None, "batch_sizes must be a list of batch sizes")],
)
def test_bad_batch_sizes_raise(batch_sizes: tuple[Any, ...], match: str) -> None:
    with pytest.raises(CostModelError, match=match):
        profile(Tiny(), tiny_batch, batch_sizes)


def test_bad_repeats_raise() -> None:
    with pytest.raises(CostModelError, match="repeats must be an integer >= 1, got 0"):
        profile(Tiny(), tiny_batch, (1,), repeats=0)
    with pytest.raises(CostModelError, match="warmup must be an integer >= 0, got -1"):
        profile(Tiny(), tiny_batch, (1,), warmup=-1)


@pytest.mark.parametrize(
    ("sample_batch", "match"),
    [
        (lambda b: torch.randn(b, 8), r"must return \(inputs, targets\), got Tensor"),
        (lambda b: ((torch.randn(b, 8),),), r"got tuple of length 1"),
        (lambda b: ((torch.randn(b + 1, 8),), None), r"shape \(3, 8\).*batch size 2"),
        (lambda b: (("text",), None), "inputs a tuple of tensors"),
        (lambda b: 1 / 0, "sample_batch\\(2\\) raised ZeroDivisionError"),
    ],
)
def test_bad_sample_batch_raises(sample_batch: Any, match: str) -> None:
    with pytest.raises(CostModelError, match=match):
        profile(Tiny(), sample_batch, (2,), repeats=1, warmup=0)


def test_model_that_fails_to_run_raises_with_the_exception_text() -> None:
    def wrong_width(b: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (torch.randn(b, 5),), torch.zeros(b)

    with pytest.raises(CostModelError, match="failed to run.*(mat1 and mat2|shapes)"):
        profile(Tiny(), wrong_width, (2,), repeats=1, warmup=0)


def test_failure_at_a_later_batch_size_names_the_layer() -> None:
    def changing(b: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        width = 8 if b == 4 else 6  # traced at the largest batch, fails at b = 1
        return (torch.randn(b, width),), torch.zeros(b)

    with pytest.raises(CostModelError, match=r"layer 0 \('fc1'\) on a batch of 1"):
        profile(Tiny(), changing, (1, 4), repeats=1, warmup=0)


def test_integer_values_between_layers_get_no_gradient() -> None:
    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = nn.Linear(4, 3)
            self.table = nn.Embedding(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            choice = self.score(x).argmax(-1)  # an integer tensor crosses into the next layer
            return self.table(choice) * x

    table = profile(Router(), lambda b: ((torch.randn(b, 4),), torch.zeros(b)), (2,),
                    repeats=1, warmup=0)
    assert table.num_layers >= 2
    assert all(c.fwd.at(2) > 0 for c in table.layers)


def test_chain_pass_gradients_equal_a_plain_backward() -> None:
    """The layer-by-layer backward of chain mode (gradients of a value read by several
    layers are summed) computes exactly the whole model's parameter gradients."""
    torch.manual_seed(0)
    model = ConvNet().train()
    (x,), _ = conv_batch(2)
    graph = trace(model, (x,))
    gm = graph.graph_module
    layers = split_layers(graph)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    torch.manual_seed(7)
    f_times, b_times = _chain_pass(graph, layers, placeholders, (x,), 2,
                                   in_place_layers(layers))
    chained = {name: p.grad.clone() for name, p in gm.named_parameters()}
    assert len(f_times) == len(b_times) == graph.num_layers
    assert all(t > 0 for t in f_times)
    assert all(t > 0 for t, layer in zip(b_times, graph.layers, strict=True)
               if layer.param_bytes > 0)
    for p in gm.parameters():
        p.grad = None
    out = gm(x)
    torch.manual_seed(7)
    out.backward(torch.randn_like(out))
    for name, p in gm.named_parameters():
        assert torch.allclose(chained[name], p.grad, atol=1e-5), name


def test_isolated_method_and_bad_method() -> None:
    table = profile(Tiny(), tiny_batch, (1, 2), repeats=1, warmup=0, method="isolated")
    assert table.meta["method"] == "isolated" and table.num_layers >= 2
    with pytest.raises(CostModelError, match=r"unknown profiling method 'fast'.*chain"):
        profile(Tiny(), tiny_batch, (1,), method="fast")


def test_optimizer_step_is_timed_with_the_given_optimizer() -> None:
    built: list[int] = []

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        built.append(len(params))
        return torch.optim.Adam(params, lr=0.1)

    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = profile(model, tiny_batch, (1,), repeats=2, warmup=1, optimizer=adam)
    assert built == [4] and table.update_s_per_byte > 0
    assert table.meta["update_s"] == pytest.approx(
        table.update_s_per_byte * table.total_param_bytes)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    def broken(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise ValueError("no such optimizer")

    with pytest.raises(CostModelError, match="build_optimizer.*no such optimizer"):
        profile(Tiny(), tiny_batch, (1,), repeats=1, warmup=0, optimizer=broken)


def test_what_timing_a_layer_adds_is_measured_and_taken_off(measured: CostTable) -> None:
    eps_f, eps_b = measured.meta["timing_overhead_s"]
    assert 0.0 < eps_f < 1e-3 and 0.0 < eps_b < 1e-3
    # nothing goes below zero, a layer never timed stays zero
    assert profile_module._less([[3e-6, 0.0, 1e-5]], 5e-6) == [[0.0, 0.0, 5e-6]]


class InPlaceOps(nn.Module):
    """In-place writes to layer inputs: a method and a functional ``inplace=True`` (fx traces
    ``+=`` on a proxy as an out-of-place add)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).mul_(2.0)
        h = self.fc2(h)
        h += 1.0
        return self.fc3(torch.nn.functional.relu(h, inplace=True))


def test_in_place_layers_are_found() -> None:
    """The layers that may write to an input are the ones a chain pass copies inputs for;
    a model without such operations copies nothing (no second copy of its activations)."""
    layers = split_layers(trace(ConvNet().train(), conv_batch(2)[0]))
    assert in_place_layers(layers) == {
        layer.index for layer in layers
        if any(n.op == "call_module" and n.target == "act" for n in layer.module.graph.nodes)}
    assert in_place_layers(split_layers(trace(Tiny(), tiny_batch(2)[0]))) == set()
    graph = trace(InPlaceOps(), tiny_batch(2)[0])
    found = in_place_layers(split_layers(graph))
    kinds = {str(n.target) for layer in split_layers(graph) if layer.index in found
             for n in layer.module.graph.nodes}
    assert "mul_" in kinds and any("relu" in k for k in kinds)
    assert len(found) == 2


@pytest.mark.parametrize("scan", [True, False])
def test_chain_pass_with_in_place_ops_matches_a_plain_backward(scan: bool) -> None:
    """With the scan (or without it: a layer that fails uncopied is learnt and run again
    copied) the chain pass leaves the inputs as they were and computes the model's exact
    gradients."""
    torch.manual_seed(0)
    for model, (inputs, _) in ((InPlaceOps().train(), tiny_batch(4)),
                               (ConvNet().train(), conv_batch(2))):
        graph = trace(model, inputs)
        gm, layers = graph.graph_module, split_layers(graph)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        kept = [t.clone() for t in inputs]
        in_place = in_place_layers(layers) if scan else set()
        torch.manual_seed(7)
        _chain_pass(graph, layers, placeholders, inputs, 4, in_place)
        if not scan:
            assert in_place  # learnt from the failures
        assert all(torch.equal(a, b) for a, b in zip(inputs, kept, strict=True))
        chained = {name: p.grad.clone() for name, p in gm.named_parameters()}
        for p in gm.parameters():
            p.grad = None
        out = gm(*inputs)
        torch.manual_seed(7)
        out.backward(torch.randn_like(out))
        for name, p in gm.named_parameters():
            assert torch.allclose(chained[name], p.grad, atol=1e-5), name


def test_profiling_device_choices() -> None:
    """auto is CUDA where available (as a board's `run` trains there), else the CPU; an
    unknown or unsupported device, or CUDA where there is none, is a CostModelError."""
    from cost_models.profile import profiling_device

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert profiling_device("auto").type == want and profiling_device(None).type == want
    assert profiling_device("cpu") == torch.device("cpu")
    with pytest.raises(CostModelError, match="unknown profiling device 'gpu0'"):
        profiling_device("gpu0")
    with pytest.raises(CostModelError, match="'meta' is not supported"):
        profiling_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(CostModelError, match="sees no CUDA device; use --device cpu"):
            profiling_device("cuda")
        with pytest.raises(CostModelError, match="sees no CUDA device"):
            profile(Tiny(), tiny_batch, (1, 2), repeats=1, warmup=0, device="cuda")


def test_a_cpu_table_says_where_it_was_measured() -> None:
    table = profile(Tiny(), tiny_batch, (1, 2), repeats=1, warmup=0, device="cpu")
    assert table.meta["device"] == "cpu"
    # a CPU holds no fixed workspace to measure: its devices keep their type's (none)
    assert table.workspace_bytes is None


def test_layers_scaled_to_the_whole_model() -> None:
    """On CUDA the layers only split the whole model's pass: per batch size they are scaled
    to add up to it (a size whose layers are all zero stays zero)."""
    from cost_models.profile import _to_whole, _whole_pass

    times = [[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]]
    scaled = _to_whole(times, [2.0, 8.0, 5.0])
    assert scaled == [[0.5, 4.0, 0.0], [1.5, 4.0, 0.0]]
    assert times == [[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]]   # not in place
    model = Tiny()
    f, b = _whole_pass(model, tiny_batch(4)[0])
    assert f > 0.0 and b > 0.0
    assert all(p.grad is not None for p in model.parameters())


def test_a_progress_that_cannot_be_called_is_refused_before_profiling() -> None:
    with pytest.raises(CostModelError, match="progress must be a callable"):
        profile(Tiny(), tiny_batch, (1, 2), progress=5)  # type: ignore[arg-type]
