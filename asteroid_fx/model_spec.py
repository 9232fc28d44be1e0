"""Loading a MODEL_SPEC (``path/model.py``, ``path/model.py:prefix``, ``builtin:NAME``)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Tuple

import torch
from torch import nn

from contracts.errors import ModelSpecError
from contracts.inputs import model_inputs
from cost_models.batches import Inputs, check_batch

__all__ = [
    "ModelSpec",
    "Inputs",
    "load_model_spec",
    "check_batch",
    "model_inputs",
    "BUILTIN_MODELS",
    "import_model_file",
]

log = logging.getLogger(__name__)

BuildModel = Callable[[], nn.Module]
SampleBatch = Callable[[int], Tuple[Any, Any]]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
BuildOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_FUNCTIONS = ("build_model", "sample_batch", "loss_fn", "build_optimizer")
_REQUIRED = ("build_model", "sample_batch")
_MODELS_HINT = "pip install 'asteroid-fx[models]'"


@dataclass(frozen=True)
class ModelSpec:
    """A loaded model description: how to build the model, make batches and compute loss."""

    spec: str  # as given, e.g. "examples/resnet.py:cifar"
    name: str  # short readable name, e.g. "resnet:cifar"
    path: Path | None  # the model file (None for built-ins)
    prefix: str | None
    build_model: BuildModel
    sample_batch: SampleBatch
    loss_fn: LossFn
    build_optimizer: BuildOptimizer | None

    def example_inputs(self, batch_size: int) -> tuple[Inputs, Any]:
        """Call ``sample_batch(batch_size)`` and check its result: ``(inputs, targets)``.

        Raises:
            ModelSpecError: ``sample_batch`` returned something else.
        """
        if batch_size < 1:
            raise ModelSpecError(f"batch_size must be >= 1, got {batch_size}")
        return check_batch(self.sample_batch(batch_size), batch_size,
                           where=f"{self.spec}: sample_batch({batch_size})")


def load_model_spec(spec: str) -> ModelSpec:
    """Load ``spec`` into a :class:`ModelSpec`.

    Forms:
        ``path/model.py``: module-level ``build_model``, ``sample_batch`` and optional
        ``loss_fn`` (default ``cross_entropy``) and ``build_optimizer``.
        ``path/model.py:prefix``: the file's attribute ``prefix`` (a class, namespace or
        module) holds those functions, or else they are named ``prefix_build_model`` ...
        ``builtin:NAME``: one of :data:`BUILTIN_MODELS` (needs the ``models`` extra).

    Raises:
        ModelSpecError: missing file, not a ``.py`` file, error while importing it (file and
            line named), missing functions (what the file defines is listed), unknown
            built-in (known names listed), or the ``models`` extra is not installed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"MODEL_SPEC must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return _load_builtin(spec, spec[len("builtin:") :])
    path_txt, prefix = _split_prefix(spec)
    path = Path(path_txt)
    if path.suffix != ".py":
        raise ModelSpecError(
            f"MODEL_SPEC {spec!r}: {path_txt!r} is not a Python file (.py); use "
            "path/to/model.py, path/to/model.py:prefix or builtin:NAME "
            f"({', '.join(sorted(BUILTIN_MODELS))})"
        )
    if not path.is_file():
        raise ModelSpecError(f"MODEL_SPEC {spec!r}: model file {str(path)!r} does not exist")
    module = import_model_file(path)
    functions = _find_functions(spec, module, prefix)
    name = path.stem if prefix is None else f"{path.stem}:{prefix}"
    return ModelSpec(
        spec=spec,
        name=name,
        path=path.resolve(),
        prefix=prefix,
        build_model=functions["build_model"],
        sample_batch=functions["sample_batch"],
        loss_fn=functions.get("loss_fn") or nn.functional.cross_entropy,
        build_optimizer=functions.get("build_optimizer"),
    )


def _split_prefix(spec: str) -> tuple[str, str | None]:
    # "C:\\x\\model.py" has a drive colon; only a colon after ".py" starts a prefix.
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and tail:
        if not tail.isidentifier():
            raise ModelSpecError(
                f"MODEL_SPEC {spec!r}: prefix {tail!r} is not a Python identifier"
            )
        return head, tail
    return spec, None


def import_model_file(path: Path) -> types.ModuleType:
    """Import the model file at ``path`` as a fresh module (not added to ``sys.path``).

    Raises:
        ModelSpecError: the file has a syntax error or raises while importing; the message
            names the file and line.
    """
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    mod_name = f"asteroid_fx_user_model_{resolved.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - .py checked
        raise ModelSpecError(f"cannot import model file {str(path)!r}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[mod_name]
        code = (e.text or "").strip()
        raise ModelSpecError(
            f"syntax error in model file {e.filename or path}:{e.lineno}: {e.msg}"
            + (f": {code}" if code else "")
        ) from e
    except Exception as e:
        del sys.modules[mod_name]
        where = _frame_in(e, resolved)
        raise ModelSpecError(
            f"importing model file {str(path)!r} failed at {where}: {type(e).__name__}: {e}"
        ) from e
    return module


def _frame_in(e: BaseException, path: Path) -> str:
    """``file:line: code`` of the deepest traceback frame in ``path`` (else the deepest)."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if Path(f.filename).resolve() == path]
    if not (mine or frames):  # pragma: no cover - an exception always has a frame here
        return str(path)
    frame = (mine or frames)[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"


def _find_functions(
    spec: str, module: types.ModuleType, prefix: str | None
) -> dict[str, Callable[..., Any]]:
    if prefix is None:
        source: Any = module
        names = {f: f for f in _FUNCTIONS}
        where = "at module level"
    elif hasattr(module, prefix):
        source = getattr(module, prefix)
        names = {f: f for f in _FUNCTIONS}
        where = f"in {prefix!r}"
    else:
        source = module
        names = {f: f"{prefix}_{f}" for f in _FUNCTIONS}
        where = f"(the file has no attribute {prefix!r} either)"
    found: dict[str, Callable[..., Any]] = {}
    for key, attr in names.items():
        value = getattr(source, attr, None)
        if value is None:
            continue
        if not callable(value):
            raise ModelSpecError(
                f"MODEL_SPEC {spec!r}: {attr} is a {type(value).__name__}, not a function"
            )
        found[key] = value
    missing = [names[f] for f in _REQUIRED if f not in found]
    if missing:
        defined = sorted(
            n for n, v in vars(source).items() if not n.startswith("_") and callable(v)
        )
        prefixes = _available_prefixes(module)
        hint = f"; prefixes in the file: {', '.join(prefixes)}" if prefixes else ""
        raise ModelSpecError(
            f"MODEL_SPEC {spec!r}: the model file must define {', '.join(missing)} {where}; "
            f"it defines: {', '.join(defined) or 'nothing callable'}{hint}"
        )
    return found


def _available_prefixes(module: types.ModuleType) -> list[str]:
    """Prefixes the file offers: ``X_build_model`` functions and namespaces with one."""
    found = []
    for n, v in vars(module).items():
        if n.startswith("_"):
            continue
        if n.endswith("_build_model") and callable(v):
            found.append(n[: -len("_build_model")])
        elif not isinstance(v, types.FunctionType) and callable(getattr(v, "build_model", None)):
            found.append(n)
    return sorted(found)


# --------------------------------------------------------------------------- built-ins


def _require_models_extra(name: str, package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ModelSpecError(
            f"builtin:{name} needs {package}, which is not installed; install the models "
            f"extra: {_MODELS_HINT}"
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


_GPT2_SEQ = 128
_GPT2_VOCAB = 50257


def _gpt2_small() -> tuple[BuildModel, SampleBatch]:
    _require_models_extra("gpt2-small", "transformers")

    def build_model() -> nn.Module:
        import transformers  # type: ignore[import-untyped, unused-ignore]

        config = transformers.GPT2Config(
            vocab_size=_GPT2_VOCAB,
            n_positions=1024,
            n_embd=512,
            n_layer=4,
            n_head=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model: nn.Module = transformers.GPT2LMHeadModel(config)
        return model

    def sample_batch(batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tokens = torch.randint(0, _GPT2_VOCAB, (batch_size, _GPT2_SEQ + 1))
        return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]

    return build_model, sample_batch


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
}
_BUILTIN_LOSSES: dict[str, LossFn] = {"gpt2-small": next_token_loss}


def _load_builtin(spec: str, name: str) -> ModelSpec:
    factory = BUILTIN_MODELS.get(name)
    if factory is None:
        raise ModelSpecError(
            f"unknown built-in model {name!r} in {spec!r}; known: "
            + ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
            + " (or give a path/to/model.py)"
        )
    build_model, sample_batch = factory()
    return ModelSpec(
        spec=spec,
        name=name,
        path=None,
        prefix=None,
        build_model=build_model,
        sample_batch=sample_batch,
        loss_fn=_BUILTIN_LOSSES.get(name, nn.functional.cross_entropy),
        build_optimizer=None,
    )
