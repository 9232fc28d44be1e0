"""Tests of asteroid_fx.model_spec: the three MODEL_SPEC forms and their error messages."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from asteroid_fx.model_spec import BUILTIN_MODELS, ModelSpec, load_model_spec, model_inputs
from contracts.errors import ModelSpecError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

_BODY = """
import torch
from torch import nn

def build_model():
    return nn.Linear(3, 2)

def sample_batch(batch_size):
    return (torch.randn(batch_size, 3),), torch.randint(0, 2, (batch_size,))
"""


def _write(tmp_path: Path, text: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_plain_file_with_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, _BODY)
    spec = load_model_spec(str(path))
    assert isinstance(spec, ModelSpec)
    assert spec.spec == str(path) and spec.name == "model" and spec.prefix is None
    assert spec.path == path.resolve()
    assert spec.loss_fn is nn.functional.cross_entropy
    assert spec.build_optimizer is None
    assert isinstance(spec.build_model(), nn.Linear)
    inputs, targets = spec.example_inputs(4)
    assert isinstance(inputs, tuple) and inputs[0].shape == (4, 3)
    assert targets.shape == (4,)


def test_optional_functions_are_picked_up(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _BODY
        + """
def loss_fn(outputs, targets):
    return outputs.sum() * 0

def build_optimizer(params):
    return torch.optim.Adam(params, lr=1e-3)
""",
    )
    spec = load_model_spec(str(path))
    assert spec.loss_fn(torch.ones(2, 2), torch.zeros(2)).item() == 0
    assert spec.build_optimizer is not None
    opt = spec.build_optimizer(spec.build_model().parameters())
    assert isinstance(opt, torch.optim.Adam)


def test_prefix_as_namespace_class() -> None:
    spec = load_model_spec(f"{EXAMPLES / 'resnet.py'}:imagenet")
    assert spec.prefix == "imagenet" and spec.name == "resnet:imagenet"
    (x,), y = spec.example_inputs(1)
    assert x.shape == (1, 3, 224, 224) and int(y.max()) < 1000
    cifar = load_model_spec(f"{EXAMPLES / 'resnet.py'}:cifar")
    assert cifar.example_inputs(2)[0][0].shape == (2, 3, 32, 32)
    assert cifar.loss_fn is not nn.functional.cross_entropy  # the file's own loss_fn


def test_prefix_as_function_names_and_namespace_object(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
import types
import torch
from torch import nn

def small_build_model():
    return nn.Linear(2, 2)

def small_sample_batch(batch_size):
    return (torch.randn(batch_size, 2),), torch.zeros(batch_size, dtype=torch.long)

big = types.SimpleNamespace(
    build_model=lambda: nn.Linear(5, 2),
    sample_batch=lambda b: ((torch.randn(b, 5),), torch.zeros(b, dtype=torch.long)),
)
""",
    )
    small = load_model_spec(f"{path}:small")
    assert small.build_model().in_features == 2
    big = load_model_spec(f"{path}:big")
    assert big.build_model().in_features == 5
    with pytest.raises(
        ModelSpecError, match=r"no attribute 'huge'.*prefixes in the file: big, small"
    ):
        load_model_spec(f"{path}:huge")


def test_missing_file() -> None:
    with pytest.raises(ModelSpecError, match="model file 'no/such/model.py' does not exist"):
        load_model_spec("no/such/model.py")


def test_not_a_python_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "devices: []\n", name="cluster.yaml")
    with pytest.raises(ModelSpecError, match=r"is not a Python file \(.py\).*builtin:NAME"):
        load_model_spec(str(path))


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "import torch\n\ndef build_model(:\n    pass\n")
    with pytest.raises(ModelSpecError, match=rf"syntax error in model file {path}:3"):
        load_model_spec(str(path))


def test_import_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "import torch\nimport no_such_module_xyz\n")
    with pytest.raises(
        ModelSpecError, match=rf"failed at {path}:2: import no_such_module_xyz.*ModuleNotFound"
    ):
        load_model_spec(str(path))


def test_missing_build_model_lists_what_the_file_defines(tmp_path: Path) -> None:
    path = _write(tmp_path, "def make_net():\n    pass\n\ndef sample_batch(b):\n    pass\n")
    with pytest.raises(
        ModelSpecError, match=r"must define build_model at module level; it defines: make_net"
    ):
        load_model_spec(str(path))


def test_non_callable_function_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "build_model = 3\ndef sample_batch(b):\n    pass\n")
    with pytest.raises(ModelSpecError, match="build_model is a int, not a function"):
        load_model_spec(str(path))


def test_bad_prefix_and_empty_spec() -> None:
    with pytest.raises(ModelSpecError, match="prefix '1x' is not a Python identifier"):
        load_model_spec(f"{EXAMPLES / 'mlp.py'}:1x")
    with pytest.raises(ModelSpecError, match="non-empty string"):
        load_model_spec("  ")


def test_unknown_builtin_lists_known_names() -> None:
    with pytest.raises(
        ModelSpecError,
        match="unknown built-in model 'vgg'.*builtin:bert-small, builtin:efficientnet_b1",
    ):
        load_model_spec("builtin:vgg")
    assert set(BUILTIN_MODELS) == {"resnet50", "mobilenet_v2", "efficientnet_b1", "bert-small",
                                   "gpt2-small", "llama-small"}


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="models extra installed"
)
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b1"])
def test_builtin_without_the_models_extra_gives_the_install_hint(name: str) -> None:
    with pytest.raises(ModelSpecError, match=r"pip install 'asteroid-fx\[models\]'"):
        load_model_spec(f"builtin:{name}")


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is not None, reason="models extra installed"
)
@pytest.mark.parametrize("name", ["bert-small", "gpt2-small", "llama-small"])
def test_transformers_builtins_without_transformers(name: str) -> None:
    with pytest.raises(ModelSpecError, match=r"needs transformers.*asteroid-fx\[models\]"):
        load_model_spec(f"builtin:{name}")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs [models]")
def test_builtin_resnet50_with_the_extra() -> None:  # pragma: no cover - extra not in CI
    spec = load_model_spec("builtin:resnet50")
    (x,), _ = spec.example_inputs(1)
    assert spec.build_model()(x).shape == (1, 1000)


def test_example_inputs_checks_sample_batch(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
import torch
from torch import nn

def build_model():
    return nn.Linear(3, 2)

def sample_batch(batch_size):
    return torch.randn(batch_size, 3), torch.zeros(batch_size)

def bad_build_model():
    return nn.Linear(3, 2)

def bad_sample_batch(batch_size):
    return torch.randn(batch_size + 1, 3)

def wrong_build_model():
    return nn.Linear(3, 2)

def wrong_sample_batch(batch_size):
    return (torch.randn(batch_size + 1, 3),), torch.zeros(batch_size)
""",
    )
    inputs, _ = load_model_spec(str(path)).example_inputs(2)  # a bare tensor is wrapped
    assert isinstance(inputs, tuple) and inputs[0].shape == (2, 3)
    with pytest.raises(ModelSpecError, match=r"must return \(inputs, targets\)"):
        load_model_spec(f"{path}:bad").example_inputs(2)
    with pytest.raises(ModelSpecError, match=r"input 0 has shape \(3, 3\); dimension 0"):
        load_model_spec(f"{path}:wrong").example_inputs(2)
    with pytest.raises(ModelSpecError, match="batch_size must be an integer >= 1"):
        load_model_spec(str(path)).example_inputs(0)


def test_keyword_inputs_are_checked_and_kept_in_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
import torch

def build_model():
    return torch.nn.Identity()

def sample_batch(batch_size):
    return {"mask": torch.ones(batch_size, 4), "ids": torch.zeros(batch_size, 4)}, None

def bad_build_model():
    return torch.nn.Identity()

def bad_sample_batch(batch_size):
    return {"ids": torch.zeros(batch_size + 1, 4)}, None

def key_build_model():
    return torch.nn.Identity()

def key_sample_batch(batch_size):
    return {"not a name": torch.zeros(batch_size, 4)}, None
""",
    )
    inputs, _ = load_model_spec(str(path)).example_inputs(2)
    assert isinstance(inputs, dict) and list(inputs) == ["mask", "ids"]
    assert model_inputs(inputs) == tuple(inputs.values())
    with pytest.raises(ModelSpecError, match=r"input 'ids' has shape \(3, 4\); dimension 0"):
        load_model_spec(f"{path}:bad").example_inputs(2)
    with pytest.raises(ModelSpecError, match="key 'not a name'; keys must be the model's forward"):
        load_model_spec(f"{path}:key").example_inputs(2)


def test_model_inputs_is_the_positional_form() -> None:
    x = torch.zeros(2, 3)
    assert model_inputs(x) == (x,)
    assert model_inputs([x, x]) == (x, x)
    assert model_inputs({"b": x, "a": x + 1})[1] is not x


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs [models]")
def test_builtin_gpt2_small_takes_keyword_ids_and_predicts_next_tokens() -> None:
    spec = load_model_spec("builtin:gpt2-small")
    inputs, targets = spec.example_inputs(2)
    assert isinstance(inputs, dict) and list(inputs) == ["input_ids"]
    assert inputs["input_ids"].shape == targets.shape == (2, 128)
    torch.manual_seed(0)
    model = spec.build_model()
    with torch.no_grad():
        outputs = model(**inputs)
    loss = spec.loss_fn(outputs, targets)
    expected = torch.nn.functional.cross_entropy(outputs.logits.reshape(-1, 50257),
                                                 targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
