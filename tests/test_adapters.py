"""Parallel adapters: exact against a hand-written side network, frozen backbone, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from asteroid_fx.adapters import AdapterModel, block_taps, parallel_adapters
from asteroid_fx.errors import AdapterError, AsteroidError, TraceError
from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.trace import trace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt() -> tuple[Any, nn.Module, AdapterModel, tuple[torch.Tensor, ...], torch.Tensor]:
    spec = load_model_spec(str(ROOT / "examples" / "gpt_small.py"))
    torch.manual_seed(0)
    model = spec.build_model()
    (ids,), targets = spec.sample_batch(3)
    torch.manual_seed(1)
    pac = parallel_adapters(model, (ids,), rank=4)
    for adapter in pac.adapters:     # non-zero up-projections: the side path matters
        nn.init.normal_(adapter.up.weight, std=0.05)
        nn.init.normal_(adapter.up.bias, std=0.05)
        adapter.gate.data.fill_(0.7)
    return spec, model, pac, (ids,), targets


def _reference(model: nn.Module, pac: AdapterModel, ids: torch.Tensor) -> torch.Tensor:
    """The side network written by hand on the unsplit model."""
    m: Any = model
    x = m.tokens(ids) + m.positions
    side = torch.zeros_like(x)
    for block, adapter in zip(m.blocks, pac.adapters, strict=True):
        x = block(x, m.causal_mask)
        side = side + adapter.gate * adapter.up(torch.relu(adapter.down(x)))
    out: torch.Tensor = m.lm_head(m.norm(x + side))
    return out


def test_default_taps_are_the_block_outputs(gpt: Any) -> None:
    _spec, _model, pac, _inputs, _targets = gpt
    assert pac.num_taps == 4
    assert pac.tap_shapes == ((64, 256),) * 4
    assert pac.entry_bytes() == 4 * 64 * 256 * 4


def test_equals_hand_written_reference_and_grads(gpt: Any) -> None:
    spec, model, pac, inputs, targets = gpt
    out = pac(*inputs)
    ref = _reference(model, pac, inputs[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    spec.loss_fn(out, targets).backward()
    grads = [p.grad.clone() for p in pac.trainable_parameters()]
    for p in pac.trainable_parameters():
        p.grad = None
    spec.loss_fn(_reference(model, pac, inputs[0]), targets).backward()
    for got, p in zip(grads, pac.trainable_parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_untrained_adapters_keep_the_model_output() -> None:
    spec = load_model_spec(str(ROOT / "examples" / "gpt_small.py"))
    torch.manual_seed(0)
    model = spec.build_model()
    (ids,), _ = spec.sample_batch(2)
    pac = parallel_adapters(model, (ids,), rank=2)
    torch.testing.assert_close(pac(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_backbone_frozen_and_cache_entry_round_trip(gpt: Any) -> None:
    spec, _model, pac, inputs, targets = gpt
    assert all(not p.requires_grad for p in pac.segments.parameters())
    assert all(not p.requires_grad for p in pac.head.parameters())
    entry = pac.backbone(*inputs)
    assert all(not t.requires_grad for t in entry)
    torch.testing.assert_close(pac.train_forward(entry), pac(*inputs))
    # one sample of an entry is the entry of that sample
    row = pac.backbone(inputs[0][1:2])
    for a, b in zip(row, entry, strict=True):
        torch.testing.assert_close(a, b[1:2], rtol=1e-5, atol=1e-5)
    loss = spec.loss_fn(pac.train_forward(entry), targets)
    loss.backward()
    assert all(p.grad is None for p in pac.segments.parameters())


def test_train_head_copies_the_head() -> None:
    spec = load_model_spec(str(ROOT / "examples" / "gpt_small.py"))
    torch.manual_seed(0)
    model = spec.build_model()
    (ids,), _ = spec.sample_batch(2)
    pac = parallel_adapters(model, (ids,), rank=2, train_head=True)
    assert len(pac.trainable_parameters()) == 4 * 5 + 3
    head_weight = dict(pac.head.named_parameters())["lm_head.weight"]
    assert head_weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_bert_small_taps(gpt: Any) -> None:
    spec = load_model_spec(str(ROOT / "examples" / "bert_small.py"))
    torch.manual_seed(0)
    model = spec.build_model()
    (ids,), _ = spec.sample_batch(2)
    graph = trace(model, (ids,))
    taps = block_taps(graph, model)
    assert len(taps) == 4
    pac = parallel_adapters(model, (ids,), rank=2, graph=graph)
    torch.testing.assert_close(pac(ids), model(ids), rtol=1e-5, atol=1e-5)


class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": -3}, "got -3"),
    ({}, "no repeated blocks to tap"),
    ({"layers": ["nope"]}, "no layer or module named 'nope'"),
    ({"layers": ["b"]}, "nothing is left for the head"),
    # a bare index, and items of no kind, were raw TypeErrors
    ({"layers": 3}, r"layers must be a list of layer indices or names .* pass \[3\]"),
    ({"layers": [None]}, "a tap layer is a layer index or a name, got None"),
    ({"layers": [1.5]}, "got 1.5"),
])
def test_errors_are_typed_one_line(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(AdapterError, match=words) as info:
        parallel_adapters(_NoBlocks(), (torch.randn(2, 4),), **kwargs)
    assert isinstance(info.value, AsteroidError)
    assert "\n" not in str(info.value)


def test_a_graph_of_the_wrong_kind_is_one_line() -> None:
    # (was AttributeError: 'str' object has no attribute 'num_layers')
    with pytest.raises(TraceError, match="graph must be a LayerGraph, got str") as info:
        parallel_adapters(_NoBlocks(), (torch.randn(2, 4),), graph="g")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_explicit_layer_by_module_name() -> None:
    model = _NoBlocks()
    x = torch.randn(3, 4)
    pac = parallel_adapters(model, (x,), layers=["a"], rank=2)
    assert pac.num_taps == 1
    torch.testing.assert_close(pac(x), model(x))


@pytest.mark.parametrize("builtin", ["bert-small", "gpt2-small", "llama-small"])
def test_hugging_face_builtins(builtin: str) -> None:
    pytest.importorskip("transformers")
    spec = load_model_spec(f"builtin:{builtin}")
    torch.manual_seed(0)
    model = spec.build_model()
    inputs, targets = spec.sample_batch(1)
    pac = parallel_adapters(model, inputs, rank=2)
    assert pac.num_taps == 4
    ref = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    out = pac(*(inputs.values() if isinstance(inputs, dict) else inputs))
    if isinstance(ref, dict):
        ref, out = ref["logits"], out["logits"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_drop_backbone_keeps_the_cached_training_path() -> None:
    import copy

    spec = load_model_spec(str(ROOT / "examples" / "gpt_small.py"))
    torch.manual_seed(0)
    model = spec.build_model()
    (ids,), _targets = spec.sample_batch(2)
    pac = parallel_adapters(model, (ids,), rank=2)
    entry = pac.backbone(ids)
    want = pac.train_forward(entry)
    lean = copy.deepcopy(pac)
    lean.drop_backbone()          # after phase 1: the cache serves every step
    assert not list(lean.segments.parameters())
    assert len(lean.segments) == len(pac.segments)
    torch.testing.assert_close(lean.train_forward(entry), want)


def test_a_bfloat16_cache_rounds_each_entry_once_and_trains_in_float32(gpt: Any) -> None:
    spec, model, _pac, (ids,), targets = gpt
    torch.manual_seed(1)
    exact = parallel_adapters(model, (ids,), rank=2)
    torch.manual_seed(1)
    pac = parallel_adapters(model, (ids,), rank=2, cache_dtype="bfloat16")
    assert pac.made_entry_bytes == exact.entry_bytes() == 2 * pac.entry_bytes()
    entry = pac.backbone(ids)
    assert [t.dtype for t in entry] == [torch.bfloat16] * len(entry)
    # the rounded entry is the exact one rounded, and trains in the adapters' float32
    for got, want in zip(entry, exact.backbone(ids), strict=True):
        assert torch.equal(got, want.to(torch.bfloat16))
    out = pac.train_forward(entry)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact.train_forward(exact.backbone(ids)),
                               rtol=0.05, atol=0.05)
    spec.loss_fn(out, targets).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in pac.trainable_parameters())
    # the device rebuilds the same cache dtype from the layout
    rebuilt = AdapterModel.from_parts(list(pac.segments), pac.head, pac.layout())
    assert rebuilt.cache_dtype == torch.bfloat16
    assert AdapterModel.from_parts(list(exact.segments), exact.head,
                                   exact.layout()).cache_dtype is None


def test_an_unknown_cache_dtype_is_one_line() -> None:
    spec = load_model_spec(str(ROOT / "examples" / "gpt_small.py"))
    (ids,), _ = spec.sample_batch(2)
    with pytest.raises(AdapterError, match="unknown cache dtype 'int8'; choose one of "
                                           "float32, bfloat16, float16") as info:
        parallel_adapters(spec.build_model(), (ids,), rank=2, cache_dtype="int8")
    assert "\n" not in str(info.value)
