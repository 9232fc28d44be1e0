"""Tests of the ``asteroid-fx`` CLI: outputs and one-line errors with non-zero exits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from asteroid_fx.cli import main
from contracts.table import CostTable, LayerCost, TimeFit

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "examples" / "clusters"


def _costs(tmp_path: Path) -> Path:
    """A hand-made table of examples/mlp.py's seven layers (another model's is refused)."""
    layers = tuple(LayerCost(f"l{i}", "linear", TimeFit(1e-4, 1e-3), TimeFit(2e-4, 2e-3),
                             param_bytes=4096, activation_bytes=256, output_bytes=128)
                   for i in range(7))
    table = CostTable(layers=layers, cut_bytes=(128,) * 6, input_bytes=64, model_name="toy",
                      model_hash="", host="test", host_flops=5e10, source="analytic")
    path = tmp_path / "costs.json"
    table.save(path)
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_costs_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", str(_costs(tmp_path)), "--cluster",
                 str(CLUSTERS / "C-100mbps.yaml")]) == 0
    out = capsys.readouterr().out
    assert "jetson-nano" in out and "jetson-xavier-nx" in out and "total" in out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["costs", "missing.json"], "CostModelError: cost table 'missing.json' does not exist"),
        (["costs", "{costs}", "--cluster", "missing.yaml"], "ClusterError: cluster file"),
        (["costs", "{bad}"], "bad.json' is not valid JSON"),
        # flags that did nothing where they were given
        (["costs", "{costs}", "--out", "x.json"], "applies to `costs merge` only"),
        (["costs", "{costs}", "-b", "-3"], "--batch-size must be >= 1, got -3"),
        (["run", "pkg", "--recovery", "restart"], "--recovery restart applies to a run with "
                                                  "--fail"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             args: list[str], match: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    args = [a.format(costs=_costs(tmp_path), bad=bad) for a in args]
    assert main(args) == 1
    assert match in _one_error_line(capsys.readouterr().err)


def test_an_output_in_a_missing_directory_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs" / "fleet" / "plan.json"
    assert main(["plan", str(ROOT / "examples" / "mlp.py"), "--cluster",
                 str(CLUSTERS / "C-100mbps.yaml"), "--batch-size", "8", "--costs",
                 str(_costs(tmp_path)), "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["plan", "{model}", "--out", "{tmp}"], r"OutputError: --out '.*' is a directory; give "
                                                r"a file name, e.g. '.*plan\.json'"),
        (["plan", "{model}", "--out", "{file}/plan.json"], r"OutputError: cannot make the "
                                                           r"directory .* is a file"),
        (["partition", "{model}", "--out", "{file}/pkg"], r"OutputError: .* is a file"),
        (["partition", "{model}", "--out", "{file}"], r"OutputError: --out '.*' is a file, not "
                                                      r"a directory"),
        (["costs", "merge", "{costs}", "{costs}", "--out", "{tmp}"],
         r"OutputError: --out .* is a directory.*costs\.json"),
        (["simulate", "{plan}", "--gantt", "{file}/round.png"], r"OutputError: .* is a file"),
        (["plot", "{plan}", "--out", "{tmp}"], r"OutputError: .* is a directory.*run\.png"),
        (["run", "{plan_dir}", "--metrics", "{file}/m.jsonl"], r"OutputError: .* is a file"),
        # a directory that takes no new file (root passes os.access; /proc refuses)
        (["plan", "{model}", "--out", "/proc/plan.json"],
         r"OutputError: cannot write to '/proc' \(--out '/proc/plan\.json'\)"),
        # an image in a format matplotlib does not write
        (["simulate", "{plan}", "--gantt", "{tmp}/round.txt"],
         r"OutputError: --gantt '.*round\.txt': \.txt is not an image format; end it in \.png"),
        (["plot", "{plan}", "--out", "{tmp}/run"], r"OutputError: .*no suffix is not an image"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad --out / --gantt / --metrics fails at once with one line, before the costs,
    the plan or a run (a failing planner shows that none ran)."""
    import solver.api

    def no_plan(*_: Any, **__: Any) -> Any:
        raise AssertionError("planned before checking the output")

    monkeypatch.setattr(solver.api, "plan", no_plan)
    file = tmp_path / "a-file"
    file.write_text("x")
    plan_dir = tmp_path / "pkg"
    plan_dir.mkdir()
    (plan_dir / "plan.json").write_text("{}")
    fill = {"model": str(ROOT / "examples" / "mlp.py"), "tmp": str(tmp_path),
            "file": str(file), "costs": str(_costs(tmp_path)),
            "plan": str(plan_dir / "plan.json"), "plan_dir": str(plan_dir)}
    argv = [a.format(**fill) for a in args]
    if argv[0] in ("plan", "partition"):
        argv += ["--cluster", str(CLUSTERS / "C-100mbps.yaml"), "--batch-size", "8",
                 "--costs", fill["costs"]]
    assert main(argv) == 1
    assert file.read_text() == "x"
    assert re.search(match, _one_error_line(capsys.readouterr().err))



@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_an_output_error_not_an_internal_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The write itself fails (``/dev/full``: ENOSPC) after planning: one ``error:`` line
    naming the file and the cause ([Note: whole files] in ``contracts.files``)."""
    assert main(["plan", str(ROOT / "examples" / "mlp.py"), "--cluster",
                 str(CLUSTERS / "C-100mbps.yaml"), "--batch-size", "8", "--costs",
                 str(_costs(tmp_path)), "--out", "/dev/full"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: OutputError: cannot write plan '/dev/full': No space left "
                           "on device"), line


def test_a_bad_re_plan_time_limit_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path), "--fail", "a@1", "--replan-time-limit", "0"]) == 1
    assert "PlanError: --replan-time-limit must be a number of seconds > 0, got 0" in \
        _one_error_line(capsys.readouterr().err)


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "asteroid_fx.cli", "costs", "nope.json"],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert "does not exist" in _one_error_line(proc.stderr)


def test_a_model_of_the_wrong_shapes_is_one_line_from_python_m(tmp_path: Path) -> None:
    # torch.export's fallback ran a meta kernel that logged its whole traceback at ERROR
    # (19 lines before ours); `python -m asteroid_fx` is the console script too
    (tmp_path / "model.py").write_text(
        "import torch\n\ndef build_model():\n    return torch.nn.Sequential(torch.nn.Linear("
        "5, 3), torch.nn.ReLU())\n\ndef sample_batch(b):\n    return torch.randn(b, 4), "
        "torch.zeros(b, dtype=torch.long)\n")
    proc = subprocess.run([sys.executable, "-m", "asteroid_fx", "trace", "model.py"],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert "TraceError: shape propagation failed" in _one_error_line(proc.stderr)


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "asteroid_fx.cli", "--debug", "costs",
                           "nope.json"], capture_output=True, text=True, check=False,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_unknown_command_is_usage_error() -> None:
    assert main(["no-such-command"]) == 2


def test_trace_prints_layers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", str(ROOT / "examples" / "skipnet.py")]) == 0
    out = capsys.readouterr().out
    assert "skipnet: 11 layers" in out and "conv2d" in out and "24.00 KiB" in out


MODAL = """
import torch

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(self.a(x), 0.5, self.training))

def build_model():
    return M()

def sample_batch(b):
    return (torch.randn(b, 3),), torch.zeros(b, dtype=torch.long)
"""


def test_trace_says_when_the_eval_mode_runs_other_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "modal.py"
    path.write_text(MODAL)
    assert main(["trace", str(path)]) == 0
    assert "the eval mode runs other code (3 layers)" in capsys.readouterr().out
    assert main(["trace", str(ROOT / "examples" / "skipnet.py")]) == 0
    assert "eval mode" not in capsys.readouterr().out


UNTRACEABLE = """
import torch

class M(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x

def build_model():
    return M()

def sample_batch(b):
    return (torch.randn(b, 3),), torch.zeros(b, dtype=torch.long)
"""


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "ModelSpecError: MODEL_SPEC"),
        ("x = 1\n", "build_model"),
        (UNTRACEABLE, "TraceError: torch.fx cannot trace M"),
        # what the model file's own code raises or returns is named, with its line
        ("import sys\nsys.exit(0)\n", "failed at"),
        ("def build_model():\n    raise ValueError('boom')\n\ndef sample_batch(b):\n"
         "    return 1\n", "build_model() raised ValueError: boom (at"),
        ("def build_model():\n    return 42\n\ndef sample_batch(b):\n    return 1\n",
         "build_model() returned int, not a torch.nn.Module"),
        ("import torch\n\ndef build_model():\n    return torch.nn.Linear(3, 2)\n\n"
         "def sample_batch(b):\n    raise KeyError('no data')\n",
         "sample_batch(2) raised KeyError: 'no data' (at"),
    ],
)
def test_trace_bad_models(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          content: str | None, match: str) -> None:
    path = tmp_path / "model.py"
    if content is not None:
        path.write_text(content)
    assert main(["trace", str(path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert match in line
    if content == UNTRACEABLE:
        assert "model.py:6" in line and "leaf_modules" in line


SKIPNET = str(ROOT / "examples" / "skipnet.py")
LOCAL3 = str(CLUSTERS / "local3.yaml")


def test_plan_partition_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan_path = tmp_path / "plan.json"
    assert main(["plan", SKIPNET, "--cluster", LOCAL3, "--batch-size", "8", "--check-ilp",
                 "--out", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "round time" in out and "Memory per device" in out and plan_path.is_file()
    out_dir = tmp_path / "part"
    assert main(["partition", SKIPNET, "--cluster", LOCAL3, "--batch-size", "8", "--out",
                 str(out_dir), "--no-onnx"]) == 0
    out = capsys.readouterr().out
    assert "plan.json" in out and "stage_0.weights.pt" in out
    for name in ("plan.json", "partition.json", "model.py", "stage_0.weights.pt", "stage_0.py",
                 "report.md", "gantt.png"):
        assert (out_dir / name).is_file(), name
    gantt = tmp_path / "g.png"
    assert main(["simulate", str(out_dir / "plan.json"), "--cluster", LOCAL3, "--model",
                 SKIPNET, "--gantt", str(gantt)]) == 0
    assert "round time" in capsys.readouterr().out and gantt.stat().st_size > 1000
    # --model is used even with a costs.json beside the plan (it was ignored): another
    # model's layers are refused; --costs and --model together are one too many
    plan_json = str(out_dir / "plan.json")
    assert main(["simulate", plan_json, "--model", str(ROOT / "examples" / "mlp.py")]) == 1
    assert "PlanError: the plan covers layers 0..10 but the cost table has 7 layers" in \
        _one_error_line(capsys.readouterr().err)
    assert main(["simulate", plan_json, "--model", SKIPNET, "--costs",
                 str(out_dir / "costs.json")]) == 1
    assert "--costs and --model both" in _one_error_line(capsys.readouterr().err)


def test_plan_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", SKIPNET, "--cluster", LOCAL3, "-b", "8", "--planner", "magic"]) == 1
    assert "PlanError" in _one_error_line(capsys.readouterr().err)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("devices: [{name: a, type: custom, speed: 1, memory_gb: 0.00001}]\n")
    assert main(["plan", SKIPNET, "--cluster", str(tiny), "-b", "8"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "PlanError" in line and "short" in line
    # 10 KB is below the runtime's workspace: said so, not "-1.0 MiB on the cluster"
    assert "'a' has no memory beyond the runtime's workspace" in line and "-" not in line.split(
        "against ")[1].split(" MiB")[0]
    assert main(["plan", SKIPNET, "--cluster", LOCAL3, "-b", "0"]) == 1
    assert "PlanError" in _one_error_line(capsys.readouterr().err)
    assert main(["simulate", str(tmp_path / "nope.json"), "--cluster", LOCAL3]) == 1
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


def test_run_emulated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "part"
    mlp = str(ROOT / "examples" / "mlp.py")
    assert main(["partition", mlp, "--cluster", LOCAL3, "-b", "8", "--out", str(out_dir),
                 "--no-onnx"]) == 0
    metrics = tmp_path / "metrics.jsonl"
    assert main(["run", str(out_dir), "--emulate", LOCAL3, "--steps", "3", "--metrics",
                 str(metrics)]) == 0
    assert "trained 3 step" in capsys.readouterr().out
    lines = metrics.read_text().splitlines()
    assert len(lines) == 4 and '"plan_version": 0' in lines[0]
    assert '"event": "summary"' in lines[3]
    assert main(["run", str(tmp_path / "missing"), "--emulate", LOCAL3]) == 1
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    # the run's measurements correct the partition's cost table
    calibrated = tmp_path / "calibrated.json"
    assert main(["calibrate", str(out_dir), str(metrics), "--out", str(calibrated)]) == 0
    assert "per-message overhead" in capsys.readouterr().out
    table = CostTable.load(calibrated)
    assert table.source == "calibrated" and "calibration" in table.meta
    from dataclasses import replace

    replace(table, message_overhead_s=0.002).save(tmp_path / "h.json")
    assert main(["costs", str(tmp_path / "h.json")]) == 0
    assert "runtime cost per message (local): 2.000 ms" in capsys.readouterr().out
    # bad input: steps only (no summary), another plan's metrics, a missing package file
    (tmp_path / "steps.jsonl").write_text("\n".join(lines[:3]) + "\n")
    other = lines[3].replace('"plan_hash": "', '"plan_hash": "x')
    (tmp_path / "other.jsonl").write_text(other + "\n")
    for args, match in (([str(out_dir), str(tmp_path / "steps.jsonl")], "no run summary"),
                        ([str(out_dir), str(tmp_path / "other.jsonl")], "another plan"),
                        ([str(out_dir), "nope.jsonl"], "does not exist"),
                        ([str(tmp_path), str(metrics)], "plan.json' is missing")):
        assert main(["calibrate", *args, "--out", str(tmp_path / "bad.json")]) == 1
        assert match in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "bad.json").exists()


def test_simulate_from_a_partition_directory_alone(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "part"
    assert main(["partition", SKIPNET, "--cluster", LOCAL3, "-b", "8", "--out", str(out_dir),
                 "--no-onnx"]) == 0
    assert (out_dir / "costs.json").is_file() and (out_dir / "cluster.yaml").is_file()
    capsys.readouterr()
    assert main(["simulate", str(out_dir / "plan.json")]) == 0
    assert "model predicts" in capsys.readouterr().out
    # the same stages at another micro-batch size; bad sizes are one line
    assert main(["simulate", str(out_dir / "plan.json"), "--micro-batch", "8"]) == 0
    assert "micro-batch 8: shares" in capsys.readouterr().out
    for bad, match in (("0", "integer >= 1"), ("3", "does not divide"),
                       ("16", "micro-batch 16 is larger than the batch 8")):
        assert main(["simulate", str(out_dir / "plan.json"), "--micro-batch", bad]) == 1
        assert match in _one_error_line(capsys.readouterr().err)


def test_profile_per_device_type_merge_and_show(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = str(ROOT / "examples" / "mlp.py")
    local, nano, merged = (tmp_path / n for n in ("local.json", "nano.json", "merged.json"))
    for args in (["--out", str(local)], ["--device-type", "jetson-nano", "--out", str(nano)]):
        assert main(["profile", model, "--batch-sizes", "1,2", "--repeats", "1", *args]) == 0
    assert CostTable.load(nano).device_type == "jetson-nano"
    assert main(["costs", "merge", str(local), str(nano), "--out", str(merged)]) == 0
    table = CostTable.load(merged)
    assert table.device_type == "local" and table.measured_types == ("jetson-nano",)
    capsys.readouterr()
    assert main(["costs", str(merged), "--cluster", str(CLUSTERS / "C-1000mbps.yaml")]) == 0
    out = capsys.readouterr().out
    assert "jetson-nano: measured on a jetson-nano" in out
    assert "jetson-tx2: scaled by speed from measured" in out


@pytest.mark.parametrize(("args", "match"), [
    (["profile", "{mlp}", "--device-type", "jetson-foo"], "unknown --device-type 'jetson-foo'"),
    (["profile", "{mlp}", "--device", "gpu0"], "unknown profiling device 'gpu0'"),
    *([] if torch.cuda.is_available() else
      [(["profile", "{mlp}", "--device", "cuda"], "sees no CUDA device; use --device cpu")]),
    (["costs", "merge", "{costs}"], "usage: asteroid-fx costs merge"),
    (["costs", "merge", "{costs}", "{costs}", "--out", "{out}"], "both unlabelled"),
    (["costs", "{costs}", "{costs}"], "costs shows one table"),
    (["plan", "{mlp}", "--cluster", "{local3}", "-b", "8", "--costs", "nope"],
     "neither a file nor one of"),
])
def test_cost_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             args: list[str], match: str) -> None:
    values = {"{mlp}": str(ROOT / "examples" / "mlp.py"), "{costs}": str(_costs(tmp_path)),
              "{out}": str(tmp_path / "m.json"), "{local3}": str(CLUSTERS / "local3.yaml")}
    assert main([values.get(a, a) for a in args]) == 1
    assert match in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "m.json").exists()


def test_plan_names_its_costs(capsys: pytest.CaptureFixture[str]) -> None:
    model = str(ROOT / "examples" / "mlp.py")
    assert main(["plan", model, "--cluster", str(CLUSTERS / "local3.yaml"), "-b", "8"]) == 0
    assert "costs: measured on this host" in capsys.readouterr().out
    assert main(["plan", model, "--cluster", str(CLUSTERS / "local3.yaml"), "-b", "8",
                 "--costs", "analytic"]) == 0
    assert "costs: analytic costs" in capsys.readouterr().out


def test_every_command_and_option_has_help() -> None:
    import typer

    from asteroid_fx.cli import app

    # typer >= 0.26 ships its own click: walk the command tree by duck typing
    missing = []
    seen = 0
    commands: list[tuple[str, Any]] = [("", typer.main.get_command(app))]
    while commands:
        path, cmd = commands.pop()
        seen += 1
        commands += [(f"{path} {name}".strip(), sub)
                     for name, sub in getattr(cmd, "commands", {}).items()]
        if path and not (cmd.help or "").strip():
            missing.append(f"{path}: command help")
        missing += [f"{path or 'asteroid-fx'} {p.name}" for p in cmd.params
                    if not (getattr(p, "help", None) or "").strip()]
    assert seen >= 10 and missing == []


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"asteroid-fx {version('asteroid-fx')}"


@pytest.mark.parametrize("micro, match", [
    ("0", "must be an integer >= 1, got 0"),
    ("32", "micro-batch 32 is larger than the batch 16"),
    ("5", r"micro-batch 5 does not divide the batch 16; use one of \[1, 2, 4, 8, 16\]"),
])
def test_micro_batch_is_checked(micro: str, match: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", str(ROOT / "examples" / "mlp.py"), "--cluster",
                 str(CLUSTERS / "local3.yaml"), "--batch-size", "16",
                 "--costs", "analytic", "--micro-batch", micro])
    assert code == 1
    import re

    assert re.search(match, _one_error_line(capsys.readouterr().err))


def test_micro_batch_fixes_the_plans_micro_batch(tmp_path: Path) -> None:
    from contracts.plan import Plan

    out = tmp_path / "plan.json"
    assert main(["plan", str(ROOT / "examples" / "mlp.py"), "--cluster",
                 str(CLUSTERS / "local3.yaml"), "--batch-size", "16",
                 "--costs", "analytic", "--micro-batch", "4", "--out", str(out)]) == 0
    got = Plan.load(out)
    assert got.micro_batch_size == 4 and got.num_micro_batches == 4


@pytest.mark.parametrize("cluster", ["C-1000mbps.yaml", "local3.yaml"])
def test_the_same_command_writes_the_same_plan(tmp_path: Path, cluster: str) -> None:
    # host measurements (the analytic table's host speed, a local cluster's profile) are
    # taken once and cached: a second run plans from the same numbers
    import json

    def written(i: int) -> str:
        out = tmp_path / f"plan{i}.json"
        assert main(["plan", str(ROOT / "examples" / "mlp.py"), "--cluster",
                     str(CLUSTERS / cluster), "--batch-size", "16", "--out", str(out)]) == 0
        data = json.loads(out.read_text())
        data["planner"].pop("search_time_s")
        return json.dumps(data, sort_keys=True)

    assert written(0) == written(1) == written(2)


def test_errors_under_torchrun_name_the_rank(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "3")
    assert main(["costs", "nope.json"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("[rank 3] error:") and "nope.json" in line


BLOCKS = """
import torch

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Block()
        self.second = Block()

    def forward(self, x):
        return self.second(self.first(x))

def build_model():
    return Net()

def sample_batch(b):
    return (torch.randn(b, 4),), torch.zeros(b, dtype=torch.long)
"""


def test_leaf_takes_a_class_name_or_lists_close_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "blocks.py"
    path.write_text(BLOCKS)
    assert main(["trace", str(path), "--leaf", "Block"]) == 0
    assert "blocks: 2 layers" in capsys.readouterr().out  # each Block is one layer
    assert main(["trace", str(path), "--leaf", "first"]) == 0
    assert "blocks: 4 layers" in capsys.readouterr().out
    assert main(["trace", str(path), "--leaf", "Blok"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "TraceError" in line and "'Blok'" in line and "close names: Block" in line


KEYWORD_MODEL = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.fc2(torch.relu(self.fc1(h)).mean(1))}

def build_model():
    return Net()

def sample_batch(b):
    mask = (torch.rand(b, 5) > 0.2).float()
    ids = torch.randint(0, 20, (b, 5))
    return {"attention_mask": mask, "input_ids": ids}, torch.randint(0, 3, (b,))

def loss_fn(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs["logits"], targets)
"""


def test_keyword_inputs_train_like_one_process(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from runtime.reference import reference_training
    from runtime.stage_io import load_model_module

    model = tmp_path / "keywords.py"
    model.write_text(KEYWORD_MODEL)
    out_dir = tmp_path / "part"
    assert main(["partition", str(model), "--cluster", LOCAL3, "-b", "8", "--out",
                 str(out_dir), "--no-onnx", "--planner", "pp-equal"]) == 0
    assert "def forward(self, attention_mask, input_ids)" in (out_dir / "stage_0.py").read_text()
    assert len(list(out_dir.glob("stage_*.py"))) >= 2
    metrics = tmp_path / "metrics.jsonl"
    assert main(["run", str(out_dir), "--emulate", LOCAL3, "--steps", "2", "--metrics",
                 str(metrics)]) == 0
    capsys.readouterr()
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()
              if '"loss"' in line]
    ref = reference_training(load_model_module(out_dir), 8, steps=2)
    assert losses == pytest.approx(ref.losses, rel=1e-6)


def test_plan_time_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlp = str(ROOT / "examples" / "mlp.py")
    plan_path = tmp_path / "plan.json"
    assert main(["plan", mlp, "--cluster", LOCAL3, "-b", "8", "--costs", "analytic",
                 "--time-limit", "20", "--out", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "optimality" in out and "optimal over every device order" in out
    from contracts.plan import Plan

    bound = Plan.load(plan_path).planner.bound
    assert bound is not None and bound.optimal and bound.space == "classes"
    for bad in ("0", "-2", "nan"):
        assert main(["plan", mlp, "--cluster", LOCAL3, "-b", "8", "--costs", "analytic",
                     "--time-limit", bad]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert "PlanError" in line and "time limit must be a number of seconds > 0" in line


def test_plan_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlp = str(ROOT / "examples" / "mlp.py")
    plan_path = tmp_path / "plan.json"
    assert main(["plan", mlp, "--cluster", LOCAL3, "-b", "8", "--costs", "analytic",
                 "--objective", "simulated", "--out", str(plan_path)]) == 0
    capsys.readouterr()
    from contracts.plan import Plan

    assert Plan.load(plan_path).predicted is not None
    for args, words in ((["--objective", "fastest"], "unknown objective 'fastest'"),
                        (["--objective", "simulated", "--planner", "dapple"],
                         "applies to the planner 'asteroid' only")):
        assert main(["partition", mlp, "--cluster", LOCAL3, "-b", "8", "--costs", "analytic",
                     "--no-onnx", "--out", str(tmp_path / "bad"), *args]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert "PlanError" in line and words in line
        assert not (tmp_path / "bad").exists()


def test_partition_traces_the_model_once(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # the trace the cost table was made on is the one partitioned (the model was traced
    # twice: a second trace is 0.2 s on examples/mobilenet_v2.py, 0.5 s on efficientnet)
    import importlib

    trace_module = importlib.import_module("asteroid_fx.trace")    # (afx.trace: the function)
    calls: list[str] = []
    real = trace_module.trace

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append("trace")
        return real(*args, **kwargs)

    monkeypatch.setattr(trace_module, "trace", counted)
    # (every --costs choice hands its trace on: tests/test_cost_source.py)
    assert main(["partition", str(ROOT / "examples" / "mlp.py"), "--cluster", LOCAL3, "-b",
                 "8", "--costs", "analytic", "--no-onnx", "--out", str(tmp_path / "p")]) == 0
    assert calls == ["trace"]


def test_partition_time_limit_and_the_large_fleet_hint(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    mlp = str(ROOT / "examples" / "mlp.py")
    out_dir = tmp_path / "part"
    assert main(["partition", mlp, "--cluster", LOCAL3, "-b", "8", "--costs", "analytic",
                 "--time-limit", "20", "--no-onnx", "--out", str(out_dir)]) == 0
    from contracts.plan import Plan

    bound = Plan.load(out_dir / "plan.json").planner.bound
    assert bound is not None and bound.optimal
    assert main(["partition", mlp, "--cluster", LOCAL3, "-b", "8", "--costs", "analytic",
                 "--time-limit", "0", "--no-onnx", "--out", str(tmp_path / "bad")]) == 1
    assert "time limit must be" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()
    # thirteen devices, no limit: a one-line hint that a limit exists, and what is proven
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("network: {bandwidth_mbps: 1000}\ndevices:\n" + "".join(
        f"  - {{name: d{i}, type: custom, speed: 1, memory_gb: 2}}\n" for i in range(13)))
    assert main(["plan", mlp, "--cluster", str(fleet), "-b", "8", "--costs", "analytic"]) == 0
    err = capsys.readouterr().err
    assert ("13 devices: the search may take minutes, tens of minutes on 64 boards (exact "
            "over the capability order") in err
    assert "--time-limit SECONDS returns the best plan" in err


def test_costs_of_another_model_are_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # a table of mlp.py's seven layers given for skipnet.py (eleven) planned "MLP" before
    assert main(["plan", SKIPNET, "--cluster", LOCAL3, "--batch-size", "8", "--costs",
                 str(_costs(tmp_path))]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "is a table of 'toy' with 7 layers, but" in line and "traces to 11" in line
    assert "asteroid-fx profile" in line
