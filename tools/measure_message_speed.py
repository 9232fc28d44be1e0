"""Measure the runtime's per-message cost at several emulated device speeds.

The latency model charges a message ``message_overhead_s / v`` at its slower end (speed
``v``; docs/latency-model.md, "The runtime's own overhead"). This checks that on this host:
the probe of ``asteroid_fx.runtime_overhead`` (its all-reduce over two devices) runs with
both devices at each ``--speeds`` value, rounds alternating, and prints the per-message
cost and that cost times the speed, which should not depend on the speed.

    python tools/measure_message_speed.py --rounds 2 --speeds 0.75 0.375 0.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--speeds", type=float, nargs="+", default=[0.75, 0.375, 0.25])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("ASTEROID_FX_CACHE", tempfile.mkdtemp(prefix="afx-message-"))
    import asteroid_fx.runtime_overhead as ro

    found: dict[float, list[float]] = {v: [] for v in args.speeds}
    for rnd in range(args.rounds):
        for speed in args.speeds:
            ro._TWO_DEVICE_SPEED = speed
            ro._TWO_DEVICES = "".join(["devices:\n"] + [
                f"  - {{name: {n}, type: local, speed: {speed}, memory_gb: 1}}\n"
                for n in "ab"] + ["network:\n  bandwidth_mbps: 1000\n"])
            started = time.time()
            at_one_core = ro._measure(args.steps)["message_overhead_s"]
            per_message = at_one_core / speed
            found[speed].append(at_one_core)
            print(f"round {rnd}: speed {speed:g}: {per_message * 1e3:.3f} ms per message, "
                  f"x speed {at_one_core * 1e3:.3f} ms (load {os.getloadavg()[0]:.1f}, "
                  f"{time.time() - started:.0f} s)", flush=True)
    print("median per message x speed (ms): " + ", ".join(
        f"{v:g}: {statistics.median(xs) * 1e3:.3f}" for v, xs in found.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
