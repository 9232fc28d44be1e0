"""Hugging Face transformers models trace, partition and compose with no flags (needs the
``models`` extra; skipped without transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from partition_cases import compose, even_lasts, hand_plan
from torch import nn

from asteroid_fx.cli import main
from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.package import load_partition, save_partition
from asteroid_fx.partition import partition, stage_info
from asteroid_fx.trace import trace
from contracts.errors import TraceError

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = str(ROOT / "examples" / "clusters" / "C-1000mbps.yaml")
VOCAB = 100


def _model(name: str) -> nn.Module:
    """A tiny model of the family (hidden 32, 2 layers, vocabulary 100)."""
    t = transformers
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_size": 32}
    if name == "bert":
        return t.BertForSequenceClassification(t.BertConfig(
            vocab_size=VOCAB, max_position_embeddings=64, **small))
    if name == "roberta":
        return t.RobertaModel(t.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=66,
                                              **small))
    if name == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
            max_position_embeddings=64))
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                              n_positions=64))
    if name == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            decoder_start_token_id=0))
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=VOCAB, num_key_value_heads=1, max_position_embeddings=64, **small))
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, **small))
    raise AssertionError(name)


def _inputs(name: str, batch: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, 8))
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32)}
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (batch, 5))}
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[0, 6:] = 0  # padding in one sample: the mask matters
    return {"input_ids": ids, "attention_mask": mask}


def _tensors(output: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a ModelOutput / dict (caches are not part of the stages)."""
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


def _loss(output: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((v.float().square().mean() for v in output.values()), torch.zeros(()))


def _summed_grads(stages: list[Any]) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, p in stage.named_parameters():
            if p.grad is not None:
                grads[name] = grads[name] + p.grad if name in grads else p.grad.clone()
    return grads


def _captured(graph: Any, training: bool) -> Any:
    """The layer graph of ``graph`` in the model's mode (``eval_graph`` where it differs)."""
    return graph if training or graph.eval_graph is None else graph.eval_graph


def _reference(model: nn.Module, inputs: dict[str, torch.Tensor], graph: Any, seed: int,
               expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the stages must equal exactly: the model's outputs ``expected``, or, where the
    capture itself rounds differently from eager (torch.export of T5, or of GPT-2's
    attention in train mode: ~1e-7), the captured graph's, which must then be within
    rtol 1e-5 of the model's."""
    if graph is None:
        return expected
    torch.manual_seed(seed)
    with torch.no_grad():
        captured = _tensors(_captured(graph, model.training).graph_module(*inputs.values()))
    plain = {k: v.detach() for k, v in expected.items()}
    if all(torch.equal(captured[k], plain[k]) for k in plain):
        return expected
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-6)
    return captured


def _same(got: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
          expected: dict[str, torch.Tensor]) -> None:
    """``got`` equals ``target`` exactly (and ``expected`` to rtol 1e-5 where they differ)."""
    torch.testing.assert_close({k: v.detach() for k, v in got.items()},
                               {k: v.detach() for k, v in target.items()}, rtol=0, atol=0)
    if target is not expected:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _check_composes(model: nn.Module, inputs: dict[str, torch.Tensor], stages: list[Any],
                    seed: int = 1, graph: Any = None) -> None:
    """In the model's train/eval mode, outputs equal exactly and gradients to rtol 1e-5
    (dropout draws the same numbers); with the captured ``graph``, see :func:`_reference`."""
    for stage in stages:
        stage.train(model.training)
    torch.manual_seed(seed)
    expected = _tensors(model(**inputs))
    _loss(expected).backward()
    target = _reference(model, inputs, graph, seed, expected)
    torch.manual_seed(seed)
    got = compose(stages, tuple(inputs.values()))
    assert isinstance(got, dict) and list(got) == list(expected)
    _same(got, target, expected)
    _loss(got).backward()
    grads = _summed_grads(stages)
    names: dict[int, list[str]] = {}  # a tied parameter has several names
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for p in model.parameters():
        if p.grad is None:
            continue
        held = [grads.pop(n) for n in names[id(p)] if n in grads]
        assert held, names[id(p)]
        torch.testing.assert_close(sum(held[1:], held[0]), p.grad, rtol=1e-5, atol=1e-7)
    assert not grads  # no stage parameter the model has no gradient for


MODELS = ["bert", "gpt2", "distilbert", "t5", "llama", "roberta", "vit"]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_model_traces_partitions_and_composes_exactly(name: str, mode: str) -> None:
    model = _model(name).train(mode == "train")
    inputs = _inputs(name)
    graph = trace(model, inputs)
    assert graph.capture == "export" and graph.input_names == tuple(inputs)
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, 3), micro_batch=3)
    stages = partition(model, inputs, plan, graph=graph)
    assert len(stages) == 3 and all(stage_info(s).layers[0] <= stage_info(s).layers[1]
                                    for s in stages)
    _check_composes(model, inputs, stages, graph=graph)
    if mode == "eval":  # stage 0 takes the keyword inputs by name too; any batch size runs
        with torch.no_grad():
            by_name = compose(stages[1:], stages[0](**inputs))
            expected = _tensors(model(**inputs))
            _same(by_name, _reference(model, inputs, graph, 1, expected), expected)
            one = _inputs(name, batch=1)
            expected = _tensors(model(**one))
            _same(compose(stages, tuple(one.values())),
                  _reference(model, one, graph, 1, expected), expected)


def test_partition_saves_and_loads_back(tmp_path: Path) -> None:
    model = _model("gpt2").eval()
    inputs = _inputs("gpt2")
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, 3), micro_batch=3)
    stages = partition(model, inputs, plan, graph=graph)
    save_partition(tmp_path, plan, stages, onnx=False, example_inputs=inputs)
    _, loaded = load_partition(tmp_path)  # generated source + weights_only tensors
    assert not any(isinstance(s, torch.fx.GraphModule) for s in loaded)
    # tied embedding and head: one parameter under the model's own name in both stages
    assert "transformer.wte.weight" in stage_info(loaded[0]).params
    assert "transformer.wte.weight" in stage_info(loaded[2]).params
    _check_composes(model, inputs, loaded)


@pytest.mark.parametrize(
    ("name", "leaves", "whole"),
    [
        ("bert", ["BertEmbeddings"], "bert.embeddings"),  # a class name
        ("bert", ["bert"], "bert"),  # the issue's --leaf bert: a ModelOutput-returning leaf
        ("distilbert", ["embeddings"], "embeddings"),
        ("t5", ["encoder"], "encoder"),
    ],
)
def test_leaves_by_name_or_class_stay_whole(name: str, leaves: list[str], whole: str) -> None:
    model = _model(name).eval()
    inputs = _inputs(name)
    graph = trace(model, inputs, leaf_modules=leaves)
    params = [layer for layer in graph.layers
              if any(p.startswith(whole + ".") for p in layer.param_names)]
    assert len(params) == 1  # every parameter of the leaf is in one layer
    lasts = even_lasts(graph.num_layers, min(3, graph.num_layers))
    stages = partition(model, inputs, hand_plan(graph.num_layers, lasts, micro_batch=3),
                       graph=graph)
    _check_composes(model, inputs, stages, graph=graph)


def test_leaf_that_matches_nothing_lists_close_names() -> None:
    with pytest.raises(TraceError, match="'BertEmbedding', which is not a submodule .*close "
                                         "names: BertEmbeddings"):
        trace(_model("bert"), _inputs("bert"), leaf_modules=["BertEmbedding"])
    with pytest.raises(TraceError, match="close names: .*bert.embeddings"):
        trace(_model("bert"), _inputs("bert"), leaf_modules=["bert.embedding"])


@pytest.mark.parametrize("name", ["bert-small", "gpt2-small", "llama-small"])
def test_builtin_partitions_with_no_flags_and_loads_back(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    torch.manual_seed(0)
    assert main(["partition", f"builtin:{name}", "--cluster", CLUSTER, "--batch-size", "32",
                 "--out", str(out), "--no-onnx"]) == 0
    assert "stage_0.py" in capsys.readouterr().out
    plan, stages = load_partition(out)
    assert plan.num_stages >= 2
    spec = load_model_spec(f"builtin:{name}")
    torch.manual_seed(0)  # the command built its model first thing after this seed
    model = spec.build_model().eval()
    inputs, targets = spec.example_inputs(2)
    with torch.no_grad():
        got = compose([s.eval() for s in stages], tuple(inputs.values()) if isinstance(
            inputs, dict) else inputs)
        expected = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if isinstance(got, dict):
        assert list(got) == ["logits"]
        got, expected = got["logits"], expected["logits"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.isfinite(spec.loss_fn(got if name == "bert-small" else {"logits": got},
                                       targets))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-small", "gpt2-small"])
def test_builtin_trains_like_one_process(name: str, tmp_path: Path) -> None:
    # the devices build the built-in from its name (runtime.stage_io.model_namespace),
    # Llama's non-persistent rotary buffer comes from the seeded model (model_state), and
    # GPT-2's embedding, tied to its head in another stage, sums its gradient over both
    # stages (runtime.ties)
    from runtime.launch import run
    from runtime.reference import reference_training
    from runtime.train import DirectorySource

    local3 = str(ROOT / "examples" / "clusters" / "local3.yaml")
    out = tmp_path / "out"
    # (the default planner keeps GPT-2 in one stage on local3, as summing its 103 MB
    # embedding over the links costs more than a pipeline saves: the capability order's
    # plan splits it)
    planner = ["--planner", "asteroid-order"] if name == "gpt2-small" else []
    assert main(["partition", f"builtin:{name}", "--cluster", local3, "--batch-size", "4",
                 "--costs", "analytic", "--out", str(out), "--no-onnx", *planner]) == 0
    if name == "gpt2-small":
        tied = DirectorySource(str(out)).tied_parameters()
        assert len({s for s, _ in tied["transformer.wte.weight"]}) >= 2
    result = run(out, emulate=local3, steps=3, seed=5, lr=0.05)
    functions = DirectorySource(str(out)).model_module()
    reference = reference_training(functions, 4, steps=3, seed=5, lr=0.05)
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)
