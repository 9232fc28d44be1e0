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

* Jetson AGX Xavier 32GB: 512 Volta CUDA cores at 1.377 GHz = 1.41 TFLOP/s FP32 peak,
  32 GB LPDDR4x at 136.5 GB/s (NVIDIA Jetson AGX Xavier series data sheet).
* Jetson Orin Nano 8GB: 1024 Ampere CUDA cores at 625 MHz = 1.28 TFLOP/s FP32 peak,
  8 GB LPDDR5 at 68 GB/s (Jetson Orin Nano series data sheet; the later "Super" power
  mode raises the GPU to 1020 MHz and memory to 102 GB/s: declare ``flops:`` for it).
* Jetson Orin NX 16GB: 1024 Ampere CUDA cores at 918 MHz = 1.88 TFLOP/s FP32 peak,
  16 GB LPDDR5 at 102.4 GB/s (Jetson Orin NX series data sheet).
* Jetson AGX Orin 64GB: 2048 Ampere CUDA cores at 1.3 GHz = 5.32 TFLOP/s FP32 peak,
  64 GB LPDDR5 at 204.8 GB/s (Jetson AGX Orin series data sheet).
* Raspberry Pi 5 8GB (CPU only): 4 Cortex-A76 cores at 2.4 GHz, two 128-bit NEON FMA
  pipes each = 16 FP32 FLOP/cycle/core = 153.6 GFLOP/s peak, 8 GB LPDDR4X-4267 on a
  32-bit bus = 17.1 GB/s (Raspberry Pi 5 product brief; Arm Cortex-A76 TRM).

Fixed workspace (``workspace_bytes``): memory a training process holds on the device
beyond its tensors, which the memory model adds to every device's peak
(solver/evaluate.py). On a GPU it is cuBLAS's workspace, one per thread that runs
matrix products (the forward's and autograd's backward thread), allocated through
torch's caching allocator, so ``torch.cuda.max_memory_allocated`` counts it. For the
Jetsons (pre-Hopper GPUs) torch's default ``CUBLAS_WORKSPACE_CONFIG`` is ``:4096:2:16:8``,
2 x 4096 KiB + 8 x 16 KiB = 8.125 MiB a workspace, so 16.25 MiB for two; on an H200
(Hopper's larger default) ``asteroid-fx profile --device cuda`` measured 65.0 MiB
(torch 2.11). A column measured on the board records its own (``CostTable.workspace_bytes``),
which replaces this default. On a CPU (``local``, the Raspberry Pi 5) there is none: the
operators' scratch grows with the activations and is ``WORKSPACE_FRACTION`` of them.
``custom`` devices keep a 1 MiB margin unless the cluster says ``workspace_mb``.

Training kernels on these boards reach only part of peak (small batches, memory-bound
depthwise/normalisation layers). We assume an effective fraction of 0.25 (Nano, TX2)
and 0.30 (NX, whose tensor cores help mixed workloads), which gives the relative
training speeds Nano : TX2 : NX = 1 : 2.8 : 4.3. The Asteroid paper (MobiCom'24,
Table 2 and section 7.1) reports the TX2 and NX as several times faster than the Nano
at training; the factors are documented assumptions and every one can be overridden
per device in ``cluster.yaml`` with ``speed:`` (relative to ``local``) or ``flops:``.
For the newer boards we assume 0.30 (AGX Xavier, as the NX; the Orin family, whose
Ampere GPUs are at least as well used) and 0.25 for the Raspberry Pi 5's CPU (PyTorch's
CPU kernels on small batches). These analytic defaults are only a starting point: a
column measured on the board itself (``asteroid-fx profile --device-type TYPE`` run there,
then ``asteroid-fx costs merge``) replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceType", "DEVICE_TYPES", "GIB", "CUSTOM_WORKSPACE_BYTES", "device_type"]

GIB = 2**30


@dataclass(frozen=True)
class DeviceType:
    """A kind of device: memory (GiB), effective training FLOP/s (None: relative), memory
    bandwidth (GB/s) and peak FP32 FLOP/s from the data sheet."""

    name: str
    memory_gb: float | None
    flops: float | None
    mem_bw_gbs: float | None
    description: str
    peak_flops: float | None = None
    #: fixed bytes a training process holds beyond its tensors (see the module docstring)
    workspace_bytes: int = 0


_MIB = 2**20
#: two cuBLAS workspaces of torch's default size on a pre-Hopper GPU (module docstring)
_CUBLAS_WORKSPACES = 2 * (2 * 4096 + 8 * 16) * 1024
#: the margin for a device of unknown kind (``custom``)
CUSTOM_WORKSPACE_BYTES = _MIB


def _board(name: str, memory_gb: float, peak: float, fraction: float, mem_bw_gbs: float,
           description: str, workspace_bytes: int = _CUBLAS_WORKSPACES) -> DeviceType:
    return DeviceType(name, memory_gb, peak * fraction, mem_bw_gbs, description, peak,
                      workspace_bytes)


DEVICE_TYPES: dict[str, DeviceType] = {
    t.name: t
    for t in (
        _board("jetson-nano", 4.0, 236e9, 0.25, 25.6, "Jetson Nano 4GB (Maxwell, 128 cores)"),
        _board("jetson-tx2", 8.0, 665e9, 0.25, 59.7, "Jetson TX2 8GB (Pascal, 256 cores)"),
        _board("jetson-xavier-nx", 8.0, 845e9, 0.30, 51.2,
               "Jetson Xavier NX 8GB (Volta, 384 cores)"),
        _board("jetson-agx-xavier", 32.0, 1.41e12, 0.30, 136.5,
               "Jetson AGX Xavier 32GB (Volta, 512 cores)"),
        _board("jetson-orin-nano", 8.0, 1.28e12, 0.30, 68.0,
               "Jetson Orin Nano 8GB (Ampere, 1024 cores)"),
        _board("jetson-orin-nx", 16.0, 1.88e12, 0.30, 102.4,
               "Jetson Orin NX 16GB (Ampere, 1024 cores)"),
        _board("jetson-agx-orin", 64.0, 5.32e12, 0.30, 204.8,
               "Jetson AGX Orin 64GB (Ampere, 2048 cores)"),
        _board("raspberry-pi-5", 8.0, 153.6e9, 0.25, 17.1,
               "Raspberry Pi 5 8GB (4x Cortex-A76, CPU only)", workspace_bytes=0),
        DeviceType("local", None, None, None, "the host that measured the cost table"),
        DeviceType("custom", None, None, None, "declared inline with speed and memory_gb",
                   workspace_bytes=CUSTOM_WORKSPACE_BYTES),
    )
}


def device_type(name: str) -> DeviceType | None:
    """The built-in type called ``name``, or None."""
    return DEVICE_TYPES.get(name)
