"""Built-in device profiles (Jetson boards, the local host) as plain data.

Each built-in type carries its memory and an *effective* training FLOP/s. A cost table
measured on a host records the host's own effective FLOP/s (one core, measured by
``asteroid-fx profile`` with a dense matmul); a device's speed relative to that host is
``device.flops / table.host_flops``. This gives one time scale for a mixed cluster of
Jetsons, the local host (``local``, speed 1.0 unless given) and inline ``custom`` devices.

Sources and assumptions (peak figures from NVIDIA's module data sheets):

* Jetson Nano: 128 Maxwell CUDA cores at 921 MHz = 236 GFLOP/s FP32 peak, 4 GB
  LPDDR4 at 25.6 GB/s.
* Jetson TX2: 256 Pascal CUDA cores at 1.30 GHz = 665 GFLOP/s FP32 peak, 8 GB
  LPDDR4 at 59.7 GB/s.
* Jetson Xavier NX: 384 Volta CUDA cores at 1.10 GHz = 845 GFLOP/s FP32 peak (plus 48
  tensor cores), 8 GB LPDDR4x at 51.2 GB/s.

Training kernels on these boards reach only part of peak (small batches, memory-bound
depthwise/normalisation layers). We assume an effective fraction of 0.25 (Nano, TX2)
and 0.30 (NX, whose tensor cores help mixed workloads), which gives the relative
training speeds Nano : TX2 : NX = 1 : 2.8 : 4.3. The Asteroid paper (MobiCom'24,
Table 2 and section 7.1) reports the TX2 and NX as several times faster than the Nano
at training; the factors are documented assumptions and every one can be overridden
per device in ``cluster.yaml`` with ``speed:`` (relative to ``local``) or ``flops:``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceType", "DEVICE_TYPES", "GIB", "device_type"]

GIB = 2**30


@dataclass(frozen=True)
class DeviceType:
    """A kind of device: memory (GiB) and effective training FLOP/s (None: relative)."""

    name: str
    memory_gb: float | None
    flops: float | None
    mem_bw_gbs: float | None
    description: str


DEVICE_TYPES: dict[str, DeviceType] = {
    t.name: t
    for t in (
        DeviceType("jetson-nano", 4.0, 236e9 * 0.25, 25.6, "Jetson Nano 4GB (Maxwell, 128 cores)"),
        DeviceType("jetson-tx2", 8.0, 665e9 * 0.25, 59.7, "Jetson TX2 8GB (Pascal, 256 cores)"),
        DeviceType(
            "jetson-xavier-nx", 8.0, 845e9 * 0.30, 51.2, "Jetson Xavier NX 8GB (Volta, 384 cores)"
        ),
        DeviceType("local", None, None, None, "the host that measured the cost table"),
        DeviceType("custom", None, None, None, "declared inline with speed and memory_gb"),
    )
}


def device_type(name: str) -> DeviceType | None:
    """The built-in type called ``name``, or None."""
    return DEVICE_TYPES.get(name)
