"""Model-zoo check: torchvision and Hugging Face models partition and compose exactly.

Opt-in; needs the ``models`` extra (``pip install -e '.[models]'``). For every model of the
list it writes a model file (random weights, seeded), then

1. traces it (``afx.trace``: train mode, and eval mode when the two differ),
2. plans with a forced multi-stage planner (``pp-equal``: one stage per device of the
   cluster; 6 stages on ``C-1000mbps``) on analytic costs with fixed reference speeds (no
   host measurement, so the cuts are the same on every run),
3. partitions, saves the partition directory (ONNX files, each checked in onnxruntime, for
   the models of ``--onnx``), loads it back as a device would,
4. runs the loaded stages one after the other and the model on the same batch from the same
   RNG seed, in train mode and then in eval mode, and compares outputs, parameter gradients
   (of a fixed random projection of the outputs) and, in train mode, buffers (BatchNorm
   running statistics). A mode passes when every tensor is within ``rtol=1e-5``
   (``atol=1e-6``).

It prints one row per model and can write them as JSON. The ``OK`` column is the target of
issue 18: trace ok, >= 3 stages, train ok, eval ok (and ONNX ok where checked).

Usage::

    python tools/check_model_zoo.py                               # every model
    python tools/check_model_zoo.py --models resnet50,swin_t --json build/zoo.json
    python tools/check_model_zoo.py --family torchvision --onnx swin_t,resnet50
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("check_model_zoo")

RTOL = 1e-5
ATOL = 1e-6
PLANNER = "pp-equal"
MIN_STAGES = 3
DEFAULT_CLUSTER = ROOT / "examples" / "clusters" / "C-1000mbps.yaml"
DEFAULT_ONNX = ("resnet50", "mobilenet_v3_small", "swin_t", "googlenet-aux")
# the reference host of the analytic costs (a Jetson Nano's effective speeds): plans are the
# same on every run and every host; pp-equal only balances layer times, so the scale is moot
REFERENCE_FLOPS = 60e9
REFERENCE_MEM_BW = 25.6e9
REFERENCE_NORM_EFFICIENCY = 0.1


# -- the zoo --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One model of the zoo: a model file's ``build_model`` body and ``sample_batch`` inputs."""

    key: str
    family: str          # "torchvision", "transformers" or "custom"
    prelude: str         # module-level code of the model file (imports, definitions)
    build: str           # an expression building the model
    inputs: str          # an expression of the input tuple, in terms of ``batch_size``

    def source(self) -> str:
        return f'''"""check_model_zoo: {self.key} ({self.family}), random weights."""
import torch
{self.prelude}


def build_model():
    torch.manual_seed(0)
    return {self.build}


def sample_batch(batch_size):
    return {self.inputs}, torch.zeros(batch_size, dtype=torch.long)
'''


def _tv(key: str, call: str | None = None, size: int = 224) -> Entry:
    return Entry(key, "torchvision", "import torchvision",
                 f"torchvision.models.{call or f'{key}(weights=None)'}",
                 f"(torch.randn(batch_size, 3, {size}, {size}),)")


def _hf(key: str, config: str, model: str, inputs: str) -> Entry:
    return Entry(key, "transformers", f"import transformers\nfrom transformers import {model}",
                 f"{model}(transformers.{config})", inputs)


_IDS = "(torch.randint(2, 1000, (batch_size, 16)),)"
_SMALL = "hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128"

ZOO: tuple[Entry, ...] = (
    _tv("resnet50"),
    _tv("mobilenet_v3_small"),
    _tv("efficientnet_b1", size=240),
    _tv("convnext_tiny"),
    _tv("densenet121"),
    _tv("regnet_y_400mf"),
    _tv("googlenet-aux", "googlenet(weights=None, aux_logits=True, init_weights=False)"),
    _tv("googlenet", "googlenet(weights=None, aux_logits=False, init_weights=False)"),
    _tv("inception_v3", "inception_v3(weights=None, aux_logits=True, init_weights=False)",
        size=299),
    _tv("vit_b_16"),
    _tv("swin_t"),
    _tv("shufflenet_v2_x0_5"),
    _tv("squeezenet1_0"),
    _tv("mnasnet0_5"),
    # a few more families
    _tv("alexnet"),
    _tv("vgg11_bn"),
    _tv("mobilenet_v2"),
    _tv("resnext50_32x4d"),
    _tv("efficientnet_v2_s", size=384),
    _tv("swin_v2_t", size=256),
    _tv("maxvit_t"),
    # Hugging Face transformers, small configurations
    _hf("BertForSequenceClassification",
        f"BertConfig(vocab_size=1000, {_SMALL}, max_position_embeddings=64)",
        "BertForSequenceClassification", _IDS),
    _hf("GPT2LMHeadModel", "GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, "
        "n_positions=64)", "GPT2LMHeadModel", _IDS),
    _hf("DistilBertModel", "DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, "
        "hidden_dim=128, max_position_embeddings=64)", "DistilBertModel", _IDS),
    _hf("T5ForConditionalGeneration",
        "T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, "
        "decoder_start_token_id=0)", "T5ForConditionalGeneration",
        "(torch.randint(2, 1000, (batch_size, 16)), torch.ones(batch_size, 16, "
        "dtype=torch.long), torch.randint(2, 1000, (batch_size, 8)))"),
    _hf("LlamaForCausalLM", "LlamaConfig(vocab_size=1000, hidden_size=64, "
        "intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, "
        "num_key_value_heads=2, max_position_embeddings=64)", "LlamaForCausalLM", _IDS),
    _hf("ViTForImageClassification", f"ViTConfig(image_size=32, patch_size=8, {_SMALL}, "
        "num_labels=10)", "ViTForImageClassification", "(torch.randn(batch_size, 3, 32, 32),)"),
    _hf("RobertaModel", f"RobertaConfig(vocab_size=1000, {_SMALL}, "
        "max_position_embeddings=80)", "RobertaModel", _IDS),
)


# -- one model ------------------------------------------------------------------------------------
@dataclass
class Row:
    """The result of one model (a column of the table each)."""

    model: str
    family: str
    trace_ok: bool = False
    eval_graph: bool = False            # the eval mode traced to another graph
    stages: int = 0
    train_ok: bool = False
    eval_ok: bool = False
    onnx: str = "-"                     # "-" not checked, "ok", or "failed"
    train_out_diff: float | None = None
    train_grad_diff: float | None = None
    train_buffer_diff: float | None = None
    eval_out_diff: float | None = None
    eval_grad_diff: float | None = None
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.trace_ok and self.stages >= MIN_STAGES and self.train_ok and self.eval_ok
                and self.onnx != "failed")


@dataclass(frozen=True)
class Options:
    batch_size: int = 32               # the planned mini-batch
    check_batch: int = 2               # samples the comparisons run on
    cluster: Path = DEFAULT_CLUSTER
    onnx: frozenset[str] = frozenset(DEFAULT_ONNX)
    workdir: Path | None = None


def check_model(entry: Entry, options: Options) -> Row:
    """Trace, plan, partition, save, load and compare one model; never raises."""
    row = Row(entry.key, entry.family)
    started = time.perf_counter()
    step = "build"
    try:
        with tempfile.TemporaryDirectory(prefix="zoo-", dir=options.workdir) as tmp:
            step = _run(entry, options, row, Path(tmp))
    except Exception as exc:  # one line per failure, the traceback in the debug log
        log.debug("%s failed:\n%s", entry.key, traceback.format_exc())
        where, cause = (exc.step, exc.cause) if isinstance(exc, _StepError) else (step, exc)
        row.error = f"{where}: {type(cause).__name__}: {_first_line(cause)}"
    row.seconds = time.perf_counter() - started
    return row


class _StepError(Exception):
    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.step = step
        self.cause = cause


def _run(entry: Entry, options: Options, row: Row, tmp: Path) -> str:
    import asteroid_fx as afx
    from asteroid_fx.model_spec import load_model_spec

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise _StepError(name, exc).with_traceback(exc.__traceback__) from exc

    model_file = tmp / f"zoo_{_identifier(entry.key)}.py"
    model_file.write_text(entry.source())
    spec = step("build", lambda: load_model_spec(str(model_file)))
    model = step("build", spec.build_model)
    inputs, _ = step("build", lambda: spec.example_inputs(options.check_batch))
    graph = step("trace", lambda: afx.trace(model, inputs, model_name=entry.key))
    row.trace_ok = True
    row.eval_graph = graph.eval_graph is not None
    costs = step("costs", lambda: afx.analytic_costs(
        model, inputs, graph=graph, host_flops=REFERENCE_FLOPS, host_mem_bw=REFERENCE_MEM_BW,
        norm_efficiency=REFERENCE_NORM_EFFICIENCY, model_name=entry.key))
    cluster = afx.Cluster.from_yaml(options.cluster)
    plan = step("plan", lambda: afx.plan(costs, cluster, options.batch_size, planner=PLANNER))
    row.stages = plan.num_stages
    stages = step("partition", lambda: afx.partition(model, inputs, plan, graph=graph))
    out = tmp / "partition"
    if entry.key in options.onnx:
        try:
            afx.save_partition(out, plan, stages, model_spec=spec, onnx=True,
                               example_inputs=inputs)
            row.onnx = "ok"
        except Exception as exc:   # record it, and check the rest without ONNX
            row.onnx = "failed"
            row.notes.append(f"onnx: {type(exc).__name__}: {_first_line(exc)}")
    if row.onnx != "ok":
        step("save", lambda: afx.save_partition(out, plan, stages, model_spec=spec,
                                                onnx=False, example_inputs=inputs))
    _, loaded = step("load", lambda: afx.load_partition(out))
    for training in (True, False):
        diffs = step("compare", lambda t=training: compare(model, loaded, inputs, t))
        if training:
            row.train_out_diff, row.train_grad_diff, row.train_buffer_diff = diffs.values()
            row.train_ok = diffs.ok
        else:
            row.eval_out_diff, row.eval_grad_diff, _ = diffs.values()
            row.eval_ok = diffs.ok
        row.notes.extend(diffs.notes)
    return "done"


@dataclass
class Diffs:
    """Largest absolute differences of one mode, and whether every tensor is close."""

    outputs: float = 0.0
    grads: float = 0.0
    buffers: float = 0.0
    ok: bool = True
    notes: list[str] = field(default_factory=list)

    def values(self) -> tuple[float, float, float]:
        return self.outputs, self.grads, self.buffers

    def add(self, kind: str, name: str, got: torch.Tensor | None,
            want: torch.Tensor | None) -> None:
        if got is None or want is None or got.shape != want.shape:
            self.ok = False
            self.notes.append(f"{kind} {name}: "
                              f"{None if got is None else list(got.shape)} vs "
                              f"{None if want is None else list(want.shape)}")
            return
        if not (got.is_floating_point() or got.is_complex()):
            equal = torch.equal(got, want)
            self.ok = self.ok and equal
            diff = 0.0 if equal else float("inf")
        else:
            a, b = got.detach().double(), want.detach().double()
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            self.ok = self.ok and bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL))
        setattr(self, kind, max(getattr(self, kind), diff))


def compare(model: torch.nn.Module, stages: Sequence[torch.nn.Module],
            inputs: tuple[torch.Tensor, ...], training: bool, seed: int = 1234) -> Diffs:
    """Run ``model`` and the composed ``stages`` in one mode from the same seed; compare
    outputs, gradients of a fixed random projection of the outputs and (train mode)
    buffers. Both sides must have seen the same runs before (their buffers agree)."""
    def run(forward: Callable[[], Any],
            modules: Sequence[torch.nn.Module]) -> tuple[Any, list[torch.Tensor]]:
        for module in modules:
            module.train(training)
            module.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        output = forward()
        tensors = _tensors(output)
        generator = torch.Generator().manual_seed(seed)
        loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
                   for t in tensors if t.requires_grad and t.is_floating_point())
        if isinstance(loss, torch.Tensor):
            loss.backward()
        return output, tensors

    def composed() -> Any:
        x: Any = inputs
        for stage in stages:
            x = stage(*x) if isinstance(x, tuple) else stage(x)
        return x

    got, got_tensors = run(composed, stages)
    want, want_tensors = run(lambda: model(*inputs), [model])
    diffs = Diffs()
    if type(got) is not type(want):
        diffs.ok = False
        diffs.notes.append(f"{'train' if training else 'eval'} output is a "
                           f"{type(got).__name__}, the model's a {type(want).__name__}")
    if len(got_tensors) != len(want_tensors):
        diffs.ok = False
        diffs.notes.append(f"{len(got_tensors)} output tensors vs {len(want_tensors)}")
    for k, (g, w) in enumerate(zip(got_tensors, want_tensors, strict=False)):
        diffs.add("outputs", f"output {k}", g, w)
    grads: dict[str, torch.Tensor] = {}
    for stage in stages:   # a parameter several stages hold (tied) sums their gradients
        for name, param in stage.named_parameters():
            if param.grad is not None:
                grads[name] = grads[name] + param.grad if name in grads else param.grad
    for name, param in model.named_parameters():
        if param.grad is not None or name in grads:
            diffs.add("grads", name, grads.get(name), param.grad)
    if training:
        held = {name: b for stage in stages for name, b in stage.named_buffers()}
        for name, buffer in model.named_buffers():
            if name in held:
                diffs.add("buffers", name, held[name], buffer)
    return diffs


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output: tensor, tuple/list (named tuples), dict/ModelOutput."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _identifier(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= 200 else line[:197] + "..."


# -- report ------------------------------------------------------------------------------------
def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}" if value else "0"


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_table(rows: Sequence[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model zoo: composed stages vs model (rtol {RTOL:g}, atol {ATOL:g})")
    for column in ("model", "trace", "stages", "train ok", "eval ok", "onnx",
                   "train out/grad/buf diff", "eval out/grad diff", "s", "OK", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        done = not row.error or row.stages > 0
        table.add_row(
            row.model, _mark(row.trace_ok), str(row.stages) if row.stages else "-",
            _mark(row.train_ok) if done else "-", _mark(row.eval_ok) if done else "-", row.onnx,
            "/".join(map(_number, (row.train_out_diff, row.train_grad_diff,
                                   row.train_buffer_diff))),
            "/".join(map(_number, (row.eval_out_diff, row.eval_grad_diff))),
            f"{row.seconds:.0f}", _mark(row.ok), row.error or "; ".join(row.notes[:2]))
    Console(width=200).print(table)


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (for docs/benchmarks.md)."""
    lines = ["| model | trace | eval graph | stages | train ok | eval ok | ONNX | "
             "max diff train out / grad / buffers | max diff eval out / grad | time s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        done = not row.error or row.stages > 0
        train, evals = ((_mark(row.train_ok), _mark(row.eval_ok)) if done else ("-", "-"))
        lines.append(
            f"| {row.model} | {_mark(row.trace_ok)} | "
            f"{('yes' if row.eval_graph else 'no') if row.trace_ok else '-'} | "
            f"{row.stages or '-'} | {train} | {evals} | {row.onnx} | "
            f"{' / '.join(map(_number, (row.train_out_diff, row.train_grad_diff, row.train_buffer_diff)))} | "  # noqa: E501
            f"{' / '.join(map(_number, (row.eval_out_diff, row.eval_grad_diff)))} | "
            f"{row.seconds:.0f} | {(row.error or '; '.join(row.notes)).replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated keys (default: the whole list)")
    parser.add_argument("--family", choices=("torchvision", "transformers"),
                        help="only this family")
    parser.add_argument("--batch-size", type=int, default=32, help="planned mini-batch")
    parser.add_argument("--check-batch", type=int, default=2,
                        help="samples the comparisons run on (default 2)")
    parser.add_argument("--cluster", type=Path, default=DEFAULT_CLUSTER)
    parser.add_argument("--onnx", default=",".join(DEFAULT_ONNX),
                        help="models whose stages are also exported to ONNX and checked "
                             "('' for none)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--markdown", type=Path, help="write the rows as a markdown table")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--debug", action="store_true", help="log tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR,
                        format="%(name)s: %(message)s")
    entries = [e for e in ZOO if args.family in (None, e.family)]
    if args.models:
        wanted = [k.strip() for k in args.models.split(",") if k.strip()]
        known = {e.key: e for e in ZOO}
        unknown = [k for k in wanted if k not in known]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; known: {', '.join(known)}")
        entries = [known[k] for k in wanted]
    if args.list:
        for entry in entries:
            print(f"{entry.key:32} {entry.family}")
        return 0
    missing = _missing_packages({e.family for e in entries})
    if missing:
        parser.error(f"this check needs {' and '.join(missing)} (pip install -e '.[models]')")
    options = Options(batch_size=args.batch_size, check_batch=args.check_batch,
                      cluster=args.cluster,
                      onnx=frozenset(k.strip() for k in args.onnx.split(",") if k.strip()))
    torch.set_num_threads(1)
    rows = []
    for entry in entries:
        row = check_model(entry, options)
        print(f"{row.model}: {'ok' if row.ok else 'FAILED'} in {row.seconds:.0f} s"
              f"{' - ' + row.error if row.error else ''}", flush=True)
        rows.append(row)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": _meta(args, argv), "rows": [
            {**asdict(r), "ok": r.ok} for r in rows]}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows) + "\n")
    return 0 if all(r.ok for r in rows) else 1


def _missing_packages(families: set[str]) -> list[str]:
    import importlib.util

    need = {"torchvision": "torchvision", "transformers": "transformers"}
    return [need[f] for f in sorted(families)
            if f in need and importlib.util.find_spec(need[f]) is None]


def _meta(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"command": " ".join(["python tools/check_model_zoo.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "versions": versions, "batch_size": args.batch_size,
            "check_batch": args.check_batch, "cluster": str(args.cluster), "planner": PLANNER,
            "rtol": RTOL, "atol": ATOL, "host": platform.node()}


if __name__ == "__main__":
    sys.exit(main())
