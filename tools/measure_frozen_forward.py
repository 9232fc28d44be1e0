"""CPU of PAC's frozen backbone segments as phase 1 runs them, against the same segments unfolded.

For each micro-batch size, in one process on one thread, the adapter model's segments run
back to back three ways, each timed in this thread's CPU seconds (median of ``--repeats``
after a warm-up):

* ``runtime``: ``AdapterModel.run_segment``, as phase 1 runs them (frozen weights, torch's
  folded matrix products; runtime/adapter_model.py, [Note: frozen weights and matmul]);
* ``unfolded``: the same frozen segments called under ``torch.no_grad`` directly, as
  phase 1 ran them before 2026-12-05 (``F.linear`` on a non-contiguous 3-D input with a
  frozen weight: a batched product over the first dimension);
* ``trainable``: the same segments with trainable weights under ``torch.no_grad`` (what the
  cost table measures, with autograd recording on).

Usage::

    PYTHONPATH=. python tools/measure_frozen_forward.py [--model examples/gpt_small.py]
        [--batch-sizes 1 2 4 8 16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def _median_cpu(fn: Callable[[Any], None], values: Any, repeats: int) -> float:
    fn(values)
    runs = []
    for _ in range(repeats):
        began = time.thread_time()
        fn(values)
        runs.append(time.thread_time() - began)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    import torch

    from asteroid_fx.finetune import build_adapter_model
    from asteroid_fx.model_spec import load_model_spec, model_inputs
    from contracts.allocator import tune_allocator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/gpt_small.py")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tune_allocator()
    spec = load_model_spec(args.model)
    _model, pac, _inputs = build_adapter_model(spec, rank=8, seed=0)
    segments = list(pac.segments)
    one, five, fifteen = os.getloadavg()
    print(f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores; "
          f"{len(segments)} segments of {spec.name}, CPU ms per micro-batch (median)")

    def runtime(values: tuple[torch.Tensor, ...]) -> None:
        for j in range(len(segments)):
            values, _tap = pac.run_segment(j, values)

    def direct(values: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            for segment in segments:
                out = segment(*values)
                values = out if isinstance(out, tuple) else (out,)

    out: dict[int, dict[str, float]] = {}
    for batch in args.batch_sizes:
        inputs, _ = spec.example_inputs(batch)
        values = tuple(model_inputs(inputs))
        row = {"runtime": _median_cpu(runtime, values, args.repeats),
               "unfolded": _median_cpu(direct, values, args.repeats)}
        for p in pac.segments.parameters():
            p.requires_grad_(True)
        row["trainable"] = _median_cpu(direct, values, args.repeats)
        for p in pac.segments.parameters():
            p.requires_grad_(False)
        out[batch] = row
        print(f"  micro-batch {batch:3d}: runtime {row['runtime'] * 1e3:7.2f}, unfolded "
              f"{row['unfolded'] * 1e3:7.2f} ({row['unfolded'] / row['runtime']:.2f}x), "
              f"trainable {row['trainable'] * 1e3:7.2f} ms")
    return out


if __name__ == "__main__":
    main()
