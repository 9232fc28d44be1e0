"""Tests of asteroid_fx.device: the device-side entry point and what it may import."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from partition_cases import EXAMPLES, ROOT, example_spec, hand_plan

from asteroid_fx.device import main
from asteroid_fx.package import save_partition
from asteroid_fx.partition import partition
from asteroid_fx.trace import trace
from contracts.errors import RuntimeFailure
from runtime.reference import reference_training
from runtime.stage_io import load_model_module

#: what the workstation installs and a device must never need
WORKSTATION_ONLY = ("typer", "rich", "pulp", "onnx", "onnxruntime", "onnxscript", "matplotlib")


def _mlp_partition(tmp_path: Path, lasts: list[int], name: str = "part") -> Path:
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(8)
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, lasts, micro_batch=4)
    plan = type(plan)(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                         "batch_size": 8, "num_micro_batches": 2})
    out = tmp_path / name
    save_partition(out, plan, partition(model, inputs, plan, graph=graph),
                   model_spec=str(EXAMPLES / "mlp.py"), onnx=False)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], env: dict[str, str] | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in
                ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_the_device_path_imports_no_workstation_package(tmp_path: Path) -> None:
    """One process trains a one-device partition through the entry point, then lists what
    it imported: nothing of the workstation's dependencies, only device-side modules."""
    out = _mlp_partition(tmp_path, [])
    script = textwrap.dedent(f"""
        import json, sys
        from asteroid_fx.device import main
        import runtime.emulator, runtime.replication, runtime.checkpoint, runtime.heartbeat
        rc = main(["run", {str(out)!r}, "--steps", "2"])
        mods = sorted(m for m in sys.modules if m.split(".")[0] in {WORKSTATION_ONLY!r})
        ours = sorted(m for m in sys.modules if m.split(".")[0] in
                      ("asteroid_fx", "runtime", "solver", "cost_models", "contracts"))
        print(json.dumps({{"rc": rc, "bad": mods, "ours": ours}}))
    """)
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "LOCAL_RANK": "0"}
    result = _run(["-c", script], env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and report["bad"] == []
    assert "step 1: loss" in result.stdout
    ours = set(report["ours"])
    assert {"asteroid_fx.device", "runtime.train", "runtime.stage_io", "contracts.plan"} <= ours
    assert not ours & {"asteroid_fx.trace", "asteroid_fx.partition", "asteroid_fx.package",
                       "asteroid_fx.cli", "solver.api", "solver.evaluate", "contracts.table"}
    (tmp_path / "device_modules.json").write_text(json.dumps(sorted(ours)))


# constructs of Python >= 3.9 that parse on 3.8 but fail when they run there
_NEWER_CALLS = {"removeprefix": "3.9", "removesuffix": "3.9", "is_relative_to": "3.9",
                "with_stem": "3.9", "bit_count": "3.10", "cache": "3.9"}
_GENERICS = {"dict", "list", "tuple", "set", "frozenset", "type"}


def _python38_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), feature_version=(3, 8))
    problems: list[str] = []
    abc_names = {alias.asname or alias.name for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module == "collections.abc"
                 for alias in node.names}
    annotations: set[int] = set()
    for node in ast.walk(tree):
        for field in ("annotation", "returns"):
            sub = getattr(node, field, None)
            if sub is not None:
                annotations.update(id(n) for n in ast.walk(sub))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "zip" and any(
                    k.arg == "strict" for k in node.keywords):
                problems.append(f"{where}: zip(strict=) needs 3.10")
            if isinstance(node.func, ast.Attribute) and node.func.attr in _NEWER_CALLS:
                problems.append(f"{where}: .{node.func.attr}() needs "
                                f"{_NEWER_CALLS[node.func.attr]}")
        if id(node) in annotations:
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in _GENERICS:
            problems.append(f"{where}: {node.value.id}[...] evaluated at run time needs 3.9")
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in abc_names:
            problems.append(f"{where}: collections.abc.{node.value.id}[...] evaluated at run "
                            f"time needs 3.9 (use typing's)")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and any(
                isinstance(side, ast.Constant) and side.value is None
                or isinstance(side, ast.Name) and side.id in ("int", "str", "float", "bool")
                for side in (node.left, node.right)):
            problems.append(f"{where}: X | Y of types evaluated at run time needs 3.10")
    return problems


def test_device_modules_run_on_python_38() -> None:
    """Every module the device path imports parses as Python 3.8 and avoids 3.9+ run-time
    constructs (the venv check of tools/check_device_env.py runs them on a real 3.8)."""
    files = sorted({*ROOT.glob("runtime/*.py"), *ROOT.glob("contracts/*.py"),
                    ROOT / "solver" / "__init__.py", ROOT / "asteroid_fx" / "__init__.py",
                    ROOT / "asteroid_fx" / "errors.py",
                    ROOT / "asteroid_fx" / "device.py", ROOT / "asteroid_fx" / "model_spec.py",
                    # the profiler (`python -m asteroid_fx.device profile`)
                    *ROOT.glob("cost_models/*.py"), ROOT / "asteroid_fx" / "costs.py",
                    ROOT / "asteroid_fx" / "runtime_overhead.py",
                    ROOT / "asteroid_fx" / "trace.py",
                    ROOT / "asteroid_fx" / "shape_prop.py",
                    # what trace imports when torch.fx fails
                    ROOT / "asteroid_fx" / "capture.py"})
    problems = [p for f in files for p in _python38_problems(f)]
    assert problems == []


def test_two_devices_under_torchrun_train_like_one_process(tmp_path: Path) -> None:
    out = _mlp_partition(tmp_path, [2])
    metrics = tmp_path / "metrics.jsonl"
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "asteroid_fx.device", "run", str(out), "--steps", "3", "--seed", "4",
                   "--lr", "0.05", "--metrics", str(metrics)])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [line["loss"] for line in lines if "event" not in line]
    assert lines[-1]["event"] == "summary" and lines[-1]["mode"] == "torchrun"
    assert len(lines[-1]["devices"]) == 2
    ref = reference_training(load_model_module(out), 8, steps=3, seed=4, lr=0.05)
    assert losses == pytest.approx(ref.losses, rel=1e-6)
    assert "trained 3 step(s) (torchrun" in result.stdout


def test_bad_input_is_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = _mlp_partition(tmp_path, [2])
    assert main(["run", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: start one process per " \
           "device with `torchrun" in err
    for argv in (["--debug", "run", str(out)], ["run", "--debug", str(out)]):
        with pytest.raises(RuntimeFailure, match="not set: start one process per device"):
            main(argv)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    cases = [(["run", str(tmp_path / "nowhere")], "is not a partition directory (no plan.json)"),
             (["run", str(out), "--steps", "0"], "--steps must be >= 1, got 0"),
             (["run", str(out), "--metrics", str(tmp_path / "no" / "m.jsonl")],
              "does not exist")]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    data = json.loads((out / "partition.json").read_text())
    (out / "partition.json").write_text(json.dumps({**data, "version": 9}))
    assert main(["run", str(out)]) == 1
    err = capsys.readouterr().err
    assert "written by a newer asteroid-fx (format 9, this reads <= 2); upgrade the device " \
           "side with `pip install --no-deps .`" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as usage:
        main(["run"])
    assert usage.value.code == 2


def test_profile_on_the_device_labels_the_table_and_imports_no_workstation_package(
        tmp_path: Path) -> None:
    out = tmp_path / "nano.json"
    script = textwrap.dedent(f"""
        import json, sys
        from asteroid_fx.device import main
        rc = main(["profile", {str(EXAMPLES / "mlp.py")!r}, "--device-type", "jetson-nano",
                   "--out", {str(out)!r}, "--batch-sizes", "1,2", "--repeats", "1"])
        mods = sorted(m for m in sys.modules if m.split(".")[0] in {WORKSTATION_ONLY!r})
        print(json.dumps({{"rc": rc, "bad": mods}}))
    """)
    result = _run(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "bad": []}
    table = json.loads(out.read_text())
    assert table["device_type"] == "jetson-nano" and table["batch_sizes"] == [1, 2]
    # the runtime's own overhead, measured here in-process, rides along to the column
    assert table["message_overhead_s"] > 0 and sum(table["runtime_overhead"].values()) > 0
    probe = table["meta"]["runtime_overhead_probe"]
    assert probe["shaping"][0] == "in-process" and probe["allreduce_s"] > 0
    bad = _run(["-m", "asteroid_fx.device", "profile", str(EXAMPLES / "mlp.py"),
                "--device-type", "jetson-foo", "--out", str(tmp_path / "x.json")])
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown --device-type 'jetson-foo'" in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_a_rank_whose_peer_stopped_the_job_says_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The rank that held the right token, when another's was refused, printed 55 lines of
    traceback ending in DistNetworkError "Failed to recv, got 0 bytes"."""
    import asteroid_fx.device as device

    def lost(*_: object, **__: object) -> None:
        raise RuntimeError("Failed to recv, got 0 bytes.\n  Exception raised from recvBytes")

    monkeypatch.setattr(device, "run_device", lost)
    assert main(["run", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "asteroid-fx device: error: RuntimeError: Failed to recv, got 0 bytes. Exception "
        "raised from recvBytes (if another rank stopped the job, its message says why")
    with pytest.raises(RuntimeError):
        main(["run", str(tmp_path), "--debug"])
