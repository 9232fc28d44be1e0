"""Point-to-point and group communication on torch.distributed, with timeouts and pacing."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import RuntimeFailure

__all__ = ["Comm", "CommFailure", "pack", "unpack", "encode_meta", "decode_meta",
           "gradient_buckets"]

log = logging.getLogger(__name__)

# [Note: message format]
# One transfer (a device's slice of a micro-batch's activations or gradients, for one peer)
# travels as ONE flat uint8 buffer: every tensor's bytes, each padded to 8 bytes, followed by
# the sender's clock (float64, seconds). The receiver learns shapes and dtypes once per
# (peer, channel) from a fixed-size int64 header sent before the first buffer; shapes never
# change during a run (fixed shares), so later transfers carry no header.
#
# [Note: emulated links]
# Under emulation every process shares one host clock. A link of ``b`` bytes/s is emulated
# on the receiving side: a buffer of ``n`` bytes sent at ``t`` on a link last free at ``f``
# leaves the link at ``max(t, f) + n / b`` and becomes usable a one-way latency ``L``
# later (``network: latency_ms`` of the cluster file, 0 by default); the receiver sleeps
# until then. Sends stay asynchronous, as on a real network, and each link carries one
# transfer at a time (the latency of one message overlaps the next one's transmission).
# Group all-reduces are paced the same way with the ring cost
# ``2 (g-1)/g * bytes / b_min + 2 (g-1) L_max``, counted from the moment the all-reduce
# starts: gloo's own work over loopback (copies and the reduction, on the device's CPU
# share) overlaps the emulated transfer as a real ring's chunks overlap theirs, so the
# all-reduce takes the longer of the two. The host's own cost of a p2p message (gloo over
# loopback, waking a process) is likewise inside the paced time when the link is slow.

class CommFailure(RuntimeFailure):
    """A transfer or collective failed or timed out: usually the symptom of a peer's failure."""


_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]
_HEADER_LEN = 256
_ALIGN = 8


def encode_meta(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fixed-size int64 header describing shapes and dtypes of ``tensors``."""
    values = [len(tensors)]
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise RuntimeFailure(f"cannot send a tensor of dtype {t.dtype} between stages; "
                                 f"supported: {_DTYPES}")
        values += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(values) > _HEADER_LEN:
        raise RuntimeFailure(f"too many tensors/dimensions cross this cut ({len(values)} "
                             f"header entries > {_HEADER_LEN})")
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header


def decode_meta(header: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    values = header.tolist()
    count, pos, out = int(values[0]), 1, []
    for _ in range(count):
        dtype, ndim = _DTYPES[int(values[pos])], int(values[pos + 1])
        shape = tuple(int(v) for v in values[pos + 2: pos + 2 + ndim])
        out.append((shape, dtype))
        pos += 2 + ndim
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    size = numel * torch.empty((), dtype=dtype).element_size()
    return -(-size // _ALIGN) * _ALIGN


def pack(tensors: Sequence[torch.Tensor], stamp: float) -> torch.Tensor:
    """Concatenate the raw bytes of ``tensors`` (8-byte aligned) plus a float64 stamp."""
    parts = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % _ALIGN
        parts.append(raw)
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
    device = tensors[0].device if tensors else torch.device("cpu")
    parts.append(torch.frombuffer(bytearray(struct.pack("<d", stamp)),
                                  dtype=torch.uint8).to(device))
    return torch.cat(parts)


def unpack(buffer: torch.Tensor, meta: Sequence[tuple[tuple[int, ...], torch.dtype]]
           ) -> tuple[list[torch.Tensor], float]:
    """Inverse of :func:`pack`: fresh tensors (not views of ``buffer``) and the stamp."""
    out, offset = [], 0
    for shape, dtype in meta:
        size = _nbytes(shape, dtype)
        numel = 1
        for d in shape:
            numel *= d
        elem = torch.empty((), dtype=dtype).element_size()
        out.append(buffer[offset: offset + numel * elem].view(dtype).reshape(shape).clone())
        offset += size
    stamp = struct.unpack("<d", bytes(buffer[offset: offset + 8].cpu().tolist()))[0]
    return out, float(stamp)


class Comm:
    """Point-to-point transfers and group all-reduce for one rank.

    Args:
        rank: this process's global rank.
        device: where this rank computes (CUDA tensors are staged through CPU for gloo).
        timeout_s: every wait gives up after this long and raises ``RuntimeFailure``.
        link_bytes_s: emulated bandwidth between two ranks (bytes/s), or None for no pacing.
        link_latency_s: emulated one-way latency of a message between two ranks (seconds),
            or None for none (only used with ``link_bytes_s``).
    """

    def __init__(self, rank: int, device: torch.device, *, timeout_s: float = 120.0,
                 link_bytes_s: Callable[[int, int], float] | None = None,
                 link_latency_s: Callable[[int, int], float] | None = None) -> None:
        self.rank = rank
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.link_bytes_s = link_bytes_s
        self.link_latency_s = link_latency_s
        self.backend = str(dist.get_backend()) if dist.is_initialized() else "gloo"
        self._stage_cpu = self.backend == "gloo" and device.type != "cpu"
        self._wire_device = torch.device("cpu") if self.backend == "gloo" else device
        self._sent_meta: set[tuple[int, str]] = set()
        self._recv_meta: dict[tuple[int, str], list[tuple[tuple[int, ...], torch.dtype]]] = {}
        self._link_free: dict[int, float] = {}
        self._pending: list[tuple[Any, torch.Tensor, Any]] = []   # (work, buffer, key)
        self.bytes_sent = 0
        self.wait_s = 0.0

    # -- helpers ------------------------------------------------------------------------
    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.cpu() if self._stage_cpu else t

    def _wait(self, works: Sequence[Any], what: str) -> None:
        start = time.perf_counter()
        for work in works:
            try:
                ok = work.wait(self.timeout)
            except RuntimeError as exc:
                raise CommFailure(f"rank {self.rank}: {what} failed or timed out after "
                                     f"{self.timeout.total_seconds():.0f} s: "
                                     f"{str(exc).splitlines()[0] if str(exc) else exc!r}"
                                     ) from exc
            if ok is False:
                raise CommFailure(f"rank {self.rank}: {what} timed out after "
                                     f"{self.timeout.total_seconds():.0f} s")
        self.wait_s += time.perf_counter() - start

    def _latency(self, src: int, dst: int) -> float:
        return 0.0 if self.link_latency_s is None else self.link_latency_s(src, dst)

    def _pace_until(self, moment: float) -> None:
        delay = moment - time.time()
        if delay > 0:
            time.sleep(delay)

    # -- point to point -----------------------------------------------------------------
    def send(self, items: Sequence[tuple[int, Sequence[torch.Tensor]]], channel: str,
             key: Any = None) -> None:
        """Post asynchronous sends of ``tensors`` to each ``peer`` (batched); the buffers
        are kept alive until :meth:`release` of ``key`` or :meth:`flush`."""
        ops = []
        posted: list[torch.Tensor] = []
        for peer, tensors in items:
            pair = (peer, channel)
            if pair not in self._sent_meta:
                header = encode_meta(tensors).to(self._wire_device)
                ops.append(dist.P2POp(dist.isend, header, peer))
                posted.append(header)
                self._sent_meta.add(pair)
            buffer = self._wire(pack(tensors, time.time()))
            ops.append(dist.P2POp(dist.isend, buffer, peer))
            posted.append(buffer)
            self.bytes_sent += buffer.numel()
        if ops:
            works = list(dist.batch_isend_irecv(ops))
            # one work per op (gloo), or fewer for a coalesced batch (NCCL): the works go
            # with the last buffers, and waiting on them covers the whole batch
            skip = len(posted) - len(works)
            for i, buffer in enumerate(posted):
                self._pending.append((works[i - skip] if i >= skip else None, buffer, key))

    def recv(self, peers: Sequence[int], channel: str) -> list[list[torch.Tensor]]:
        """Receive one transfer from each of ``peers`` (batched); tensors land on
        ``self.device``. Sleeps as the emulated links require (see [Note: emulated links])."""
        new = [p for p in peers if (p, channel) not in self._recv_meta]
        if new:
            headers = {p: torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self._wire_device)
                       for p in new}
            works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, h, p)
                                            for p, h in headers.items()])
            self._wait(works, f"receiving shapes from rank(s) {new} ({channel})")
            for p, h in headers.items():
                self._recv_meta[(p, channel)] = decode_meta(h.cpu())
        buffers = {}
        for p in peers:
            meta = self._recv_meta[(p, channel)]
            size = sum(_nbytes(shape, dtype) for shape, dtype in meta) + 8
            buffers[p] = torch.empty(size, dtype=torch.uint8, device=self._wire_device)
        if buffers:
            works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, b, p)
                                            for p, b in buffers.items()])
            self._wait(works, f"receiving from rank(s) {list(peers)} ({channel})")
        out = []
        for p in peers:
            tensors, stamp = unpack(buffers[p].to(self.device), self._recv_meta[(p, channel)])
            if self.link_bytes_s is not None:
                # the link is busy for bytes / bandwidth (messages queue behind each
                # other); the latency delays the arrival without holding the link
                sent = (max(stamp, self._link_free.get(p, 0.0))
                        + buffers[p].numel() / self.link_bytes_s(p, self.rank))
                self._link_free[p] = sent
                self._pace_until(sent + self._latency(p, self.rank))
            out.append(tensors)
        return out

    def held(self) -> list[torch.Tensor]:
        """Send buffers posted and not yet awaited."""
        return [buffer for _, buffer, _ in self._pending]

    def release(self, keys: Sequence[Any]) -> None:
        """Wait for the sends posted under ``keys`` (already received, so this does not
        block; see runtime/lowering.py [Note: releasing sends]) and drop their buffers."""
        wanted = set(keys)
        done = [w for w, _, k in self._pending if k in wanted and w is not None]
        self._pending = [entry for entry in self._pending if entry[2] not in wanted]
        self._wait(done, "sending")

    def flush(self) -> None:
        """Wait for every posted send."""
        works = [w for w, _, _ in self._pending if w is not None]
        self._pending.clear()
        self._wait(works, "sending")

    # -- collectives --------------------------------------------------------------------
    def all_reduce(self, buckets: Sequence[Sequence[torch.Tensor]], group: Any,
                   group_ranks: Sequence[int],
                   observe: Callable[[torch.Tensor], None] | None = None) -> None:
        """Sum every tensor of ``buckets`` in place over ``group``, one bucket after the
        other (see ``gradient_buckets``): a bucket of one contiguous tensor is reduced in
        place, a larger one through a flat buffer of its own (handed to ``observe`` while
        it lives). The buckets are paced together as one ring all-reduce of their bytes."""
        start = time.time()
        what = f"all-reduce over ranks {list(group_ranks)}"
        nbytes = 0
        for bucket in buckets:
            alone = len(bucket) == 1 and bucket[0].is_contiguous()
            flat = bucket[0] if alone else torch.cat([t.reshape(-1) for t in bucket])
            if observe is not None and not alone:
                observe(flat)
            wire = self._wire(flat)
            self._wait([dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group,
                                        async_op=True)], what)
            if wire is not flat:
                flat.copy_(wire)
            if not alone:
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset: offset + t.numel()].view_as(t))
                    offset += t.numel()
            nbytes += flat.numel() * flat.element_size()
        g = len(group_ranks)
        if self.link_bytes_s is not None and g > 1:
            slowest = min(self.link_bytes_s(a, b) for a in group_ranks for b in group_ranks
                          if a != b)
            latency = max(self._latency(a, b) for a in group_ranks for b in group_ranks
                          if a != b)
            # gloo's own transfer over loopback stands in for part of the link's time
            self._pace_until(start + 2 * (g - 1) / g * nbytes / slowest
                             + 2 * (g - 1) * latency)


def gradient_buckets(grads: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``grads`` in order, grouped into all-reduce buckets of at most the largest
    gradient's bytes (contiguous tensors of one dtype share a bucket).

    No flat buffer is then larger than the largest gradient, which the memory model already
    budgets (the largest layer's gradient, ``LayerSums.largest_params``), so data
    parallelism needs no copy of a whole stage's gradients.
    """
    if not grads:
        return []
    cap = max(g.numel() * g.element_size() for g in grads)
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if (buckets and g.is_contiguous() and buckets[-1][0].is_contiguous()
                and buckets[-1][0].dtype == g.dtype and size + nbytes <= cap):
            buckets[-1].append(g)
            size += nbytes
        else:
            buckets.append([g])
            size = nbytes
    return buckets
