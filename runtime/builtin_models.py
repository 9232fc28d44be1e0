"""The built-in models (``builtin:NAME`` MODEL_SPECs): a partition of one records only the
name, so that the device builds the model from here (torchvision or transformers: the
``models`` extra). ``asteroid_fx.model_spec`` loads them as MODEL_SPECs."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Tuple

import torch
from torch import nn

from contracts.errors import ModelSpecError

__all__ = ["BUILTIN_MODELS", "BUILTIN_LOSSES", "next_token_loss", "builtin_build_model",
           "builtin_functions", "MODELS_HINT"]

BuildModel = Callable[[], nn.Module]
SampleBatch = Callable[[int], Tuple[Any, Any]]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

#: how to install what the built-in models need
MODELS_HINT = "pip install 'asteroid-fx[models]'"


def _require_models_extra(name: str, package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ModelSpecError(
            f"builtin:{name} needs {package}, which is not installed; install the models "
            f"extra: {MODELS_HINT}"
        )


def _torchvision_model(name: str, fn: str, image: int) -> tuple[BuildModel, SampleBatch]:
    _require_models_extra(name, "torchvision")

    def build_model() -> nn.Module:
        import torchvision  # type: ignore[import-untyped, unused-ignore]

        model: nn.Module = getattr(torchvision.models, fn)(weights=None, num_classes=1000)
        return model

    def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x = torch.randn(batch_size, 3, image, image)
        return (x,), torch.randint(0, 1000, (batch_size,))

    return build_model, sample_batch


class _BertClassifier(nn.Module):
    """BERT encoder + pooler + linear head, returning the logits tensor."""

    def __init__(self, bert: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        bert: Any = self.bert
        x = bert.embeddings(input_ids=input_ids)
        for layer in bert.encoder.layer:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        logits: torch.Tensor = self.classifier(bert.pooler(x))
        return logits


_BERT_SEQ = 512
_BERT_VOCAB = 30522


def _bert_small() -> tuple[BuildModel, SampleBatch]:
    _require_models_extra("bert-small", "transformers")

    def build_model() -> nn.Module:
        import transformers  # type: ignore[import-untyped, unused-ignore]

        config = transformers.BertConfig(
            vocab_size=_BERT_VOCAB,
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            intermediate_size=2048,
            max_position_embeddings=_BERT_SEQ,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return _BertClassifier(transformers.BertModel(config), 512, 2)

    def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        ids = torch.randint(0, _BERT_VOCAB, (batch_size, _BERT_SEQ))
        return (ids,), torch.randint(0, 2, (batch_size,))

    return build_model, sample_batch


def _causal_lm(name: str, model_class: str, config_class: str, vocab: int, seq: int,
               **config: Any) -> tuple[BuildModel, SampleBatch]:
    """A Hugging Face causal LM ``transformers.<model_class>(<config_class>(vocab_size=vocab,
    **config))`` called with keyword ``input_ids`` of ``seq`` random tokens, whose targets
    are the next tokens (``next_token_loss``)."""
    _require_models_extra(name, "transformers")

    def build_model() -> nn.Module:
        import transformers  # type: ignore[import-untyped, unused-ignore]

        made = getattr(transformers, config_class)(vocab_size=vocab, **config)
        model: nn.Module = getattr(transformers, model_class)(made)
        return model

    def sample_batch(batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tokens = torch.randint(0, vocab, (batch_size, seq + 1))
        return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]

    return build_model, sample_batch


def _gpt2_small() -> tuple[BuildModel, SampleBatch]:
    return _causal_lm("gpt2-small", "GPT2LMHeadModel", "GPT2Config", 50257, 128,
                      n_positions=1024, n_embd=512, n_layer=4, n_head=8, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def _llama_small() -> tuple[BuildModel, SampleBatch]:
    return _causal_lm("llama-small", "LlamaForCausalLM", "LlamaConfig", 32000, 128,
                      hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024)


def next_token_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a causal LM's ``outputs["logits"]`` (batch, sequence, vocabulary)
    against the next tokens ``targets`` (batch, sequence)."""
    logits = outputs["logits"]
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


BUILTIN_MODELS: dict[str, Callable[[], tuple[BuildModel, SampleBatch]]] = {
    "resnet50": lambda: _torchvision_model("resnet50", "resnet50", 224),
    "mobilenet_v2": lambda: _torchvision_model("mobilenet_v2", "mobilenet_v2", 224),
    "efficientnet_b1": lambda: _torchvision_model("efficientnet_b1", "efficientnet_b1", 240),
    # BERT-Small (4 layers, hidden 512, sequence 512): one of the Asteroid paper's models
    "bert-small": _bert_small,
    # a GPT-2-style decoder of the same size (4 layers, hidden 512, sequence 128, GPT-2's
    # vocabulary); a Hugging Face GPT2LMHeadModel called with keyword input_ids, whose
    # output is a ModelOutput (not OpenAI's 124M "GPT-2 small")
    "gpt2-small": _gpt2_small,
    # a Llama-style decoder of the same size (RMSNorm, rotary positions, SwiGLU, grouped
    # query attention with 2 key/value heads; Llama 2's vocabulary): LlamaForCausalLM
    "llama-small": _llama_small,
}
BUILTIN_LOSSES: dict[str, LossFn] = {"gpt2-small": next_token_loss,
                                     "llama-small": next_token_loss}


def builtin_functions(name: str) -> tuple[BuildModel, SampleBatch]:
    """``(build_model, sample_batch)`` of the built-in model ``name``.

    Raises:
        ModelSpecError: an unknown name (known names listed), or the ``models`` extra is not
            installed.
    """
    factory = BUILTIN_MODELS.get(name)
    if factory is None:
        raise ModelSpecError(f"unknown built-in model {name!r}; known: "
                             + ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS)))
    return factory()


def builtin_build_model(name: str) -> BuildModel:
    """``build_model`` of the built-in model ``name`` (see :func:`builtin_functions`)."""
    return builtin_functions(name)[0]
