"""Check that the device side installs and trains bit for bit on an old Python + torch (opt-in).

What a JetPack 5 board has (Python 3.8, torch 2.0/2.1) is rebuilt as a virtual environment:

1. a venv of ``--python`` (from pyenv, /root/.pyenv/versions/X.Y.*) with ``torch==--torch``
   from PyPI (a CUDA build: several GB) plus numpy and pyyaml, or the venv ``--venv``
   when it exists (reused; missing packages installed);
2. the device side installed into it with the README's command, ``pip install --no-deps .``;
3. a 2-stage, 2-device stage package of ``--model`` written by *this* install
   (``python -m asteroid_fx.cli partition ... --planner pp-equal``);
4. that package trained ``--steps`` steps under the venv's torchrun (gloo on the CPU,
   ``--nproc-per-node 2`` on localhost), ``python -m asteroid_fx.device run``, from a
   directory outside the checkout so the installed package is the one imported;
5. the same package trained by this install under its own torchrun (``asteroid-fx run``);
6. ``python -m asteroid_fx.device profile`` of ``--model`` in the venv, labelled
   ``jetson-nano``, with the runtime's own overhead measured there in-process; the table
   must load here with a per-message cost and a runtime overhead;
7. both runs' per-step losses printed side by side; exit 0 only if they agree to
   ``--tolerance`` (relative), with the max absolute difference reported.

Not part of CI and not imported by tests (it downloads GBs). Usage::

    python tools/check_device_env.py --python 3.8 --torch 2.1.2 --venv /work/venvs/py38
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
CLUSTER = """\
# two devices of equal speed on one slow link: pp-equal cuts the model into 2 stages
devices:
  - {name: dev0, type: local, speed: 1.0, memory_gb: 1}
  - {name: dev1, type: local, speed: 1.0, memory_gb: 1}
network:
  bandwidth_mbps: 10
"""


class CheckFailed(Exception):
    """A step of the check failed; the message says which and why."""


def _log(message: str) -> None:
    print(f"[check_device_env] {message}", flush=True)


def _run(cmd: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 1800, what: str = "") -> str:
    """Run ``cmd``; its output on failure goes into the error."""
    _log(f"$ {' '.join(str(c) for c in cmd)}" + (f"   (in {cwd})" if cwd != ROOT else ""))
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise CheckFailed(f"{what or cmd[0]} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "LOCAL_RANK", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def find_python(version: str) -> Path:
    """The newest pyenv interpreter ``version`` (``3.8`` or ``3.8.18``)."""
    candidates = sorted((p for p in PYENV.glob(f"{version}*") if (p / "bin" / "python").is_file()
                         and re.fullmatch(rf"{re.escape(version)}(\.\d+)*", p.name)),
                        key=lambda p: tuple(int(x) for x in p.name.split(".")))
    if not candidates:
        raise CheckFailed(f"no Python {version} under {PYENV}; install it with "
                          f"`pyenv install {version}` or pass --venv")
    return candidates[-1] / "bin" / "python"


def _venv_versions(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-c", "import json, sys\ninfo = {'python': sys.version.split()[0]}\n"
         "for m in ('torch', 'numpy', 'yaml'):\n"
         "    try:\n        info[m] = __import__(m).__version__\n"
         "    except ImportError:\n        pass\nprint(json.dumps(info))"],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env=_clean_env())
    if out.returncode != 0:
        raise CheckFailed(f"{python} does not run: {out.stderr[-500:]}")
    info: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return info


def prepare_venv(venv: Path, python_version: str, torch_version: str) -> Path:
    """A venv of that Python with that torch, numpy and pyyaml; returns its python."""
    python = venv / "bin" / "python"
    if not python.is_file():
        base = find_python(python_version)
        _run([base, "-m", "venv", venv], cwd=ROOT, env=_clean_env(), what="creating the venv")
    info = _venv_versions(python)
    if not info["python"].startswith(python_version):
        raise CheckFailed(f"--venv {venv} has Python {info['python']}, not {python_version}")
    wanted = []
    if info.get("torch", "").split("+")[0] != torch_version:
        wanted.append(f"torch=={torch_version}")
    if "numpy" not in info:
        # torch < 2.3 was built against numpy 1.x
        old = tuple(int(x) for x in torch_version.split(".")[:2]) < (2, 3)
        wanted.append("numpy<2" if old else "numpy")
    if "yaml" not in info:
        wanted.append("pyyaml")
    if wanted:
        _log(f"installing {' '.join(wanted)} into {venv} (torch from PyPI is a CUDA build: "
             f"several GB, minutes)")
        _run([python, "-m", "pip", "install", *wanted], cwd=ROOT, env=_clean_env(),
             timeout=3600, what="installing torch into the venv")
    return python


def install_device_side(python: Path) -> str:
    """The README's device install command, run in the checkout; returns where it went."""
    _run([python, "-m", "pip", "install", "--no-deps", "."], cwd=ROOT, env=_clean_env(),
         what="pip install --no-deps . (the device install)")
    where = _run([python, "-c", "import asteroid_fx.device, runtime, os; "
                  "print(os.path.dirname(os.path.dirname(runtime.__file__)))"],
                 cwd=Path(tempfile.gettempdir()), env=_clean_env())
    return where.strip()


def write_package(work: Path, model: str, batch_size: int) -> Path:
    """A 2-stage, 2-device partition written by this (workstation) install."""
    cluster = work / "cluster.yaml"
    cluster.write_text(CLUSTER)
    out = work / "package"
    _run([sys.executable, "-m", "asteroid_fx.cli", "partition", model, "--cluster", cluster,
          "--batch-size", str(batch_size), "--planner", "pp-equal", "--no-onnx", "--out", out],
         cwd=ROOT, env=_clean_env(PYTHONPATH=str(ROOT)), what="asteroid-fx partition")
    plan = json.loads((out / "plan.json").read_text())
    stages = [s["devices"] for s in plan["stages"]]
    devices = [d for group in stages for d in group]
    if len(stages) != 2 or len(devices) != 2:
        raise CheckFailed(f"the package has stages {stages}; expected 2 stages on 2 devices")
    _log(f"package: {len(stages)} stages on devices {devices}, batch {plan['batch_size']} = "
         f"{plan['num_micro_batches']} micro-batches x {plan['micro_batch_size']}; files "
         f"{sorted(p.name for p in out.iterdir())}")
    return out


def train(python: Path, module: list[str], package: Path, metrics: Path, steps: int,
          cwd: Path, env: dict[str, str], what: str) -> list[float]:
    """``torchrun --standalone --nproc-per-node 2 -m MODULE run PACKAGE`` -> losses."""
    _run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", *module, "run", package, "--steps", str(steps), "--metrics", metrics],
         cwd=cwd, env=env, timeout=900, what=what)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in records if "event" not in r]


def profile_on_device(python: Path, model: str, out: Path, cwd: Path) -> str:
    """``python -m asteroid_fx.device profile`` in the device venv (with the runtime's own
    overhead, measured in-process there); the table must load in the main install with a
    per-message cost and a runtime overhead. Returns one line of what it measured."""
    from contracts.table import CostTable

    _run([python, "-m", "asteroid_fx.device", "profile", model, "--device-type",
          "jetson-nano", "--out", out, "--batch-sizes", "1,2", "--repeats", "3"],
         cwd=cwd, env=_clean_env(), timeout=900, what="the device-side profile")
    table = CostTable.load(out)
    over = table.runtime_overhead
    if table.message_overhead_s <= 0 or over.is_zero:
        raise CheckFailed(f"the device-side table has no runtime overhead "
                          f"({over.describe()}, {table.message_overhead_s * 1e3:.3f} ms per "
                          f"message)")
    return (f"{table.num_layers} layers on a {table.device_type} ({table.torch_version}); "
            f"runtime overhead {over.describe()}, {table.message_overhead_s * 1e3:.3f} ms per "
            f"message")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--python", default="3.8", help="Python version of the venv (3.8)")
    parser.add_argument("--torch", default="2.1.2", help="torch version of the venv (2.1.2)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="venv to build or reuse (default: a fresh one in a temp dir)")
    parser.add_argument("--model", default=str(ROOT / "examples" / "mlp.py"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest relative loss difference accepted (float rounding)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work directory to keep (package, metrics); default: temp")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="check_device_env_"))
    work.mkdir(parents=True, exist_ok=True)
    venv = args.venv or work / "venv"
    try:
        t0 = time.perf_counter()
        python = prepare_venv(venv, args.python, args.torch)
        info = _venv_versions(python)
        _log(f"device venv {venv}: Python {info['python']}, torch {info.get('torch')}, numpy "
             f"{info.get('numpy')}, pyyaml {info.get('yaml')} ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        where = install_device_side(python)
        _log(f"device side installed in {where} ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        package = write_package(work, args.model, args.batch_size)
        _log(f"partition written by Python {sys.version.split()[0]}, torch "
             f"{_main_torch()} ({time.perf_counter() - t0:.0f} s)")
        run_dir = work / "device-run"
        run_dir.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        device = train(python, ["asteroid_fx.device"], package, work / "device.jsonl",
                       args.steps, run_dir, _clean_env(), "the device-side run")
        device_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        main_losses = train(Path(sys.executable), ["asteroid_fx.cli"], package,
                            work / "main.jsonl", args.steps, ROOT,
                            _clean_env(PYTHONPATH=str(ROOT)), "the main install's run")
        main_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        measured = profile_on_device(python, args.model, work / "device-table.json", run_dir)
        _log(f"device-side profile ({time.perf_counter() - t0:.0f} s): {measured}")
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"check_device_env: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None and args.venv is not None:
            shutil.rmtree(work, ignore_errors=True)
        elif args.venv is None:
            _log(f"the venv stays in {venv}: pass --venv {venv} to reuse it")
    if len(device) != args.steps or len(main_losses) != args.steps:
        print(f"check_device_env: FAILED: {len(device)} device and {len(main_losses)} main "
              f"losses for {args.steps} steps", file=sys.stderr)
        return 1
    left = f"device (Python {info['python']}, torch {info.get('torch')})"
    right = f"main (Python {sys.version.split()[0]}, torch {_main_torch()})"
    print(f"\n{'step':>4}  {left:>40}  {right:>40}  {'abs diff':>10}")
    worst = 0.0
    ok = True
    for step, (a, b) in enumerate(zip(device, main_losses, strict=True)):
        diff = abs(a - b)
        worst = max(worst, diff)
        ok = ok and diff <= args.tolerance * max(1.0, abs(b))
        print(f"{step:>4}  {a:>40.10f}  {b:>40.10f}  {diff:>10.3g}")
    total = time.perf_counter() - started
    print(f"max abs difference {worst:.3g} (tolerance {args.tolerance:g} relative); device run "
          f"{device_s:.1f} s, main run {main_s:.1f} s, total {total:.0f} s")
    print("PASS: the device side trains like the main install" if ok else
          "FAIL: the losses differ beyond float rounding")
    return 0 if ok else 1


def _main_torch() -> str:
    import torch

    return str(torch.__version__)


if __name__ == "__main__":
    sys.exit(main())
