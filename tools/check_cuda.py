"""On a CUDA machine: profile on the GPU, plan with that table, train under torchrun, compare."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# [Note: checking on CUDA]
# Opt-in, for a machine with a GPU (the project never needs one). Per model:
# 1. `python -m asteroid_fx.device profile MODEL --device-type TYPE --device auto`: the
#    layers measured on the GPU ([Note: profiling on an accelerator]);
# 2. `asteroid-fx partition MODEL --cluster` (one device of TYPE) `--costs` that table
#    `--no-onnx`: a one-device plan whose prediction comes from the GPU's column;
# 3. `torchrun --standalone --nproc-per-node 1 -m asteroid_fx.device run` on CUDA (NCCL),
#    then the same package on the CPU (`CUDA_VISIBLE_DEVICES=` empty, gloo);
# and prints measured against predicted: the round, forward and backward per micro-batch,
# peak memory (`torch.cuda.max_memory_allocated` on CUDA), and the largest relative
# difference between the CUDA and CPU losses (TF32 and cuDNN's algorithms differ from
# the CPU's, so they agree to about 1e-3, not bit for bit). One process per GPU: NCCL
# refuses two ranks on one device, so multi-device plans need as many GPUs.


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 600.0) -> float:
    start = time.perf_counter()
    print("$", " ".join(argv), flush=True)
    done = subprocess.run(argv, cwd=cwd, env=env, timeout=timeout, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
        raise SystemExit(f"failed (rc {done.returncode}): {' '.join(argv)}")
    return time.perf_counter() - start


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check(model: str, batch: int, steps: int, device_type: str, work: Path) -> dict[str, Any]:
    """One model through profile, partition and two runs; the measured figures."""
    name = model.replace("/", "_").replace(":", "_").replace(".py", "")
    table, pkg = work / f"{name}.cuda.json", work / f"{name}.pkg"
    cluster = work / f"{name}.cluster.yaml"
    cluster.write_text(f"devices:\n  - {{name: gpu0, type: {device_type}}}\n"
                       f"network:\n  bandwidth_mbps: 1000\n")
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sizes = ",".join(str(b) for b in sorted({max(1, batch // 4), max(1, batch // 2), batch}))
    walls = {"profile": _run([py, "-m", "asteroid_fx.device", "profile", model,
                              "--device-type", device_type, "--batch-sizes", sizes,
                              "--out", str(table)], ROOT, env)}
    walls["partition"] = _run([py, "-m", "asteroid_fx.cli", "partition", model, "--cluster",
                               str(cluster), "--batch-size", str(batch), "--costs", str(table),
                               "--no-onnx", "--out", str(pkg)], ROOT, env)
    metrics = {}
    for where, visible in (("cuda", os.environ.get("CUDA_VISIBLE_DEVICES", "0")), ("cpu", "")):
        metrics[where] = work / f"{name}.{where}.jsonl"
        walls[f"run {where}"] = _run(
            [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
             "-m", "asteroid_fx.device", "run", str(pkg), "--steps", str(steps),
             "--metrics", str(metrics[where])], ROOT,
            dict(env, CUDA_VISIBLE_DEVICES=visible))
    rows = {where: _lines(path) for where, path in metrics.items()}
    summary = next(r for r in rows["cuda"] if r.get("event") == "summary")
    plan = json.loads((pkg / "plan.json").read_text())
    stage = plan["predicted"]["stages"][0]
    device = summary["devices"]["gpu0"]
    losses = {w: [r["loss"] for r in rs if "step" in r and "loss" in r] for w, rs in rows.items()}
    rel = max(abs(a - b) / max(abs(b), 1e-12)
              for a, b in zip(losses["cuda"], losses["cpu"], strict=True))
    rounds = [r["round_time_s"] for r in rows["cuda"] if "step" in r][2:]
    out = {
        "model": model, "batch": batch, "micro_batch": plan["micro_batch_size"],
        "micro_batches": plan["num_micro_batches"], "gpu": json.loads(table.read_text())
        .get("meta", {}).get("device", "?"),
        "round_predicted_s": plan["predicted"]["round_time_s"],
        "round_measured_s": summary["round_time_s"],
        "round_median_after_2_s": statistics.median(rounds) if rounds else None,
        "forward_predicted_s": stage["e_f"], "forward_measured_s": device["forward_s"],
        "backward_predicted_s": stage["e_b"], "backward_measured_s": device["backward_s"],
        "peak_predicted_bytes": device.get("predicted_peak_memory_bytes"),
        "peak_measured_bytes": device.get("peak_memory_bytes"),
        "loss_max_rel_diff_cuda_vs_cpu": rel,
        "loss_rel_diff_by_step": [round(abs(a - b) / max(abs(b), 1e-12), 8)
                                  for a, b in zip(losses["cuda"], losses["cpu"], strict=True)],
        "steps": steps, "walls_s": walls,
    }
    for key in ("round", "forward", "backward"):
        measured = out.get(f"{key}_measured_s")
        out[f"{key}_ratio"] = measured / out[f"{key}_predicted_s"] if measured else None
    if out["peak_predicted_bytes"]:
        out["peak_ratio_predicted_over_measured"] = (out["peak_predicted_bytes"]
                                                     / out["peak_measured_bytes"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*",
                        default=["examples/resnet.py:cifar@64", "examples/mobilenet_v2.py@64"],
                        help="MODEL_SPEC@BATCH ...")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device-type", default="jetson-agx-orin",
                        help="the type the GPU's table is labelled with (a built-in type)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run even without a GPU (a dry run of this script on the CPU)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device here: this check needs one (it is opt-in, never in CI)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="afx-cuda-"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
    print(f"torch {torch.__version__}, {gpu}; work in {work}", flush=True)
    results = []
    for item in args.models:
        model, _, batch = item.rpartition("@")
        results.append(check(model, int(batch), args.steps, args.device_type, work))
        print(json.dumps(results[-1], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
