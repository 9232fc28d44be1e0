"""Point-to-point and group communication on torch.distributed, with timeouts and pacing."""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from contracts.errors import RuntimeFailure
from contracts.plan import SMALL_BUCKET_BYTES

__all__ = ["Comm", "CommFailure", "pack", "unpack", "encode_meta", "decode_meta",
           "gradient_buckets", "message_tag", "calm_transport_threads"]

log = logging.getLogger(__name__)

# [Note: message format]
# One transfer (a device's slice of a micro-batch's activations or gradients, for one peer)
# travels as ONE flat uint8 buffer: every tensor's bytes, each padded to 8 bytes, followed by
# the sender's clock (float64, seconds). The receiver learns shapes and dtypes once per
# (peer, channel) from a fixed-size int64 header sent (on a tag of its own) with the first
# buffer; shapes never change during a run (fixed shares), so later transfers carry no
# header, and a send whose shapes differ from the first one's raises ``CommFailure``.
#
# [Note: lean hops]
# What one message costs the runtime beyond gloo's own ping-pong (tools/measure_hop.py):
# * gloo's tcp transport writes a send's payload at once only when the peer's receive is
#   already posted (its NOTIFY_RECV_READY has arrived); otherwise it announces the send and
#   the payload follows only after the receiver posts, through the sender's gloo thread: an
#   extra round trip and two thread wake-ups per message. The executor therefore posts
#   every receive ahead (``runtime.lowering.recv_posts``: activations two ahead, gradients
#   one, see runtime/lowering.py [Note: posting receives]) and waits on it at the RECV
#   action, which stays the only blocking point, so runtime/validate.py's proof is
#   unchanged. Each message has a tag of its own (``message_tag``: channel and
#   micro-batch), so a posted receive can only match its own message whatever the order
#   of the posts.
# * Wire buffers come from per-(peer, channel) pools with typed views made once: a send
#   copies into the views (no pack/cat), a receive hands out aliases of the views (no
#   unpack/clone) that go back to the pool when the executor is done with the micro-batch
#   (``recycle``); sends go straight to the process group (no batch_isend_irecv).
# * What remained after these was not in the runtime's Python but in gloo's transport
#   thread spinning on the pair lock that the main thread holds while it sends or posts;
#   see [Note: gloo's loop thread] for that and its fix.
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

# [Note: gloo's loop thread]
# gloo's tcp transport reads its sockets on a thread of its own ("gloo_tcp_loop"):
# level-triggered epoll, and a handler that only TRIES the pair's lock and, when the lock is
# taken, returns to epoll_wait, which reports the same unread bytes at once. A pair's lock is
# taken by this process's main thread for every send and every posted receive (a writev to
# the peer inside it). When a message arrives in that window, the loop thread wakes, and the
# kernel's wake-up preemption puts it on the main thread's core in place of the main thread
# (a thread that slept is due the CPU); it then spins on the lock its own main thread holds
# until the scheduler takes the core back from it, up to a time slice (ms). In a pipeline
# the two directions' messages overlap (a rank sends its activations while the next stage
# sends its gradients back), so this happened on a good share of the hops. On this 2-core
# host (the 2-stage pipeline of tools/measure_hop.py, 16 micro-batches, uncapped, CPU read
# per thread) the loop threads of the two ranks burnt 30-50 ms of CPU per round, more than
# the main threads (~0.5-1.5 ms per message; strace: runs of epoll_wait returning EPOLLIN
# without a read); under the emulator's cgroup caps that CPU comes out of the device's
# quota, and the slow device was throttled in 3 of 4 periods. ``calm_transport_threads``
# puts the loop threads under SCHED_BATCH: a waking SCHED_BATCH thread does not preempt
# the running one (it runs when the main thread blocks, which is when a message is needed,
# or on another core), but competes with its normal weight, so unlike SCHED_IDLE it is not
# starved by other work on the host (nice 19 did not help: a niced thread that got the
# core still runs out its slice). The loop threads' CPU then fell to 1-16 ms per such
# round, the hop's CPU from 0.9 to 0.2 ms (docs/benchmarks.md, "Per-hop cost").

TRANSPORT_THREAD = "gloo_tcp_loop"
"""Name of the thread on which gloo's tcp transport handles a process's sockets."""


def calm_transport_threads() -> int:
    """Put this process's gloo transport loop threads under SCHED_BATCH (see [Note: gloo's
    loop thread]); returns how many threads were changed. Linux only (reads
    ``/proc/self/task``); elsewhere, or when the policy cannot be set, it does nothing."""
    setter = getattr(os, "sched_setscheduler", None)
    batch = getattr(os, "SCHED_BATCH", None)
    if setter is None or batch is None:
        return 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0
    changed = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                if fh.read().strip() != TRANSPORT_THREAD:
                    continue
            if os.sched_getscheduler(int(tid)) != batch:
                setter(int(tid), batch, os.sched_param(0))
                changed += 1
        except OSError:      # the thread ended, or the policy may not be changed here
            continue
    return changed


class CommFailure(RuntimeFailure):
    """A transfer or collective failed or timed out: usually the symptom of a peer's failure."""


_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]
_HEADER_LEN = 256
_ALIGN = 8
_TAG_BASE = 1 << 20   # message tags (headers use the small ones below)
_META_TAG = {"f": 1, "b": 2}


def _meta_tag(channel: str) -> int:
    """Tag of ``channel``'s shape header: 1 and 2 for the pipeline's "f" and "b"; other
    channels (PAC's ``act``, ``tap<rows>``, ``fetch`` ...) a stable tag in ``[3, 2**19)``
    from the name, below every message tag. Their data go with the tag the caller gives
    (0 by default: matched in call order)."""
    tag = _META_TAG.get(channel)
    if tag is None:
        tag = 3 + zlib.crc32(channel.encode()) % ((1 << 19) - 3)
    return tag


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


class _Slot:
    """One pooled wire buffer of a (peer, channel) with typed views of its tensors and of
    its float64 stamp, made once when the buffer is allocated (see [Note: lean hops])."""

    __slots__ = ("buffer", "views", "stamp")

    def __init__(self, layout: Sequence[tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device) -> None:
        size = sum(_nbytes(shape, dtype) for shape, dtype in layout) + 8
        self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        views, offset = [], 0
        for shape, dtype in layout:
            numel = 1
            for d in shape:
                numel *= d
            elem = torch.empty((), dtype=dtype).element_size()
            views.append(self.buffer[offset: offset + numel * elem].view(dtype).view(shape))
            offset += _nbytes(shape, dtype)
        self.views: list[torch.Tensor] = views
        self.stamp = self.buffer[offset: offset + 8].view(torch.float64)


def message_tag(channel: str, microbatch: int) -> int:
    """Tag of the message of ``channel`` ("f" or "b") for ``microbatch``: distinct for every
    (channel, micro-batch), so a pre-posted receive can only match its own message."""
    return _TAG_BASE + 2 * microbatch + (0 if channel == "f" else 1)


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
        # received tensors may alias the pooled wire buffer (no copy) when they live there
        self._lend = self._wire_device == device
        # gloo matches a message by (peer, tag) whenever its receive is posted; other
        # backends pair p2p operations by call order, so they post receives at the wait
        self.can_post = self.backend == "gloo"
        if self.backend == "gloo" and dist.is_initialized():
            # every process group of this rank exists by now (see [Note: gloo's loop thread])
            calm_transport_threads()
        self._pg: Any = dist.group.WORLD if dist.is_initialized() else None
        self._send_layout: dict[tuple[int, str], list[tuple[tuple[int, ...],
                                                            torch.dtype]]] = {}
        self._recv_meta: dict[tuple[int, str], list[tuple[tuple[int, ...], torch.dtype]]] = {}
        self._send_pool: dict[tuple[int, str], list[_Slot]] = {}
        self._recv_pool: dict[tuple[int, str], list[_Slot]] = {}
        self._link_free: dict[int, float] = {}
        # sends posted and not yet awaited, by key: (work, slot or header, pool or None)
        self._pending: dict[Any, list[tuple[Any, Any, list[_Slot] | None]]] = {}
        # receives posted and not yet awaited, by (channel, tag): (peer, work, slot, the
        # pool the slot goes back to)
        self._posted: dict[tuple[str, int], list[tuple[int, Any, _Slot, list[_Slot]]]] = {}
        # received buffers whose tensors the caller still uses, by key (see recycle)
        self._lent: dict[Any, list[tuple[list[_Slot], _Slot]]] = {}
        self.bytes_sent = 0
        self.wait_s = 0.0
        self.messages_sent = 0
        self.messages_received = 0

    # -- helpers ------------------------------------------------------------------------
    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.cpu() if self._stage_cpu else t

    def _wait(self, works: Sequence[Any], what: str | Callable[[], str]) -> None:
        """Wait for ``works``; ``what`` (or what it returns: the message is only made when
        one fails) names them in the error."""
        start = time.perf_counter()
        timeout = self.timeout
        for work in works:
            try:
                ok = work.wait(timeout)
            except RuntimeError as exc:
                name = what if isinstance(what, str) else what()
                raise CommFailure(f"rank {self.rank}: {name} failed or timed out after "
                                     f"{self.timeout.total_seconds():.0f} s: "
                                     f"{str(exc).splitlines()[0] if str(exc) else exc!r}"
                                     ) from exc
            if ok is False:
                name = what if isinstance(what, str) else what()
                raise CommFailure(f"rank {self.rank}: {name} timed out after "
                                     f"{self.timeout.total_seconds():.0f} s")
        self.wait_s += time.perf_counter() - start

    def _latency(self, src: int, dst: int) -> float:
        return 0.0 if self.link_latency_s is None else self.link_latency_s(src, dst)

    def _pace_until(self, moment: float) -> None:
        delay = moment - time.time()
        if delay > 0:
            time.sleep(delay)

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        if self._pg is not None:
            return self._pg.send([tensor], peer, tag)
        return dist.isend(tensor, peer, tag=tag)

    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        if self._pg is not None:
            return self._pg.recv([tensor], peer, tag)
        return dist.irecv(tensor, peer, tag=tag)

    # -- point to point -----------------------------------------------------------------
    def send(self, items: Sequence[tuple[int, Sequence[torch.Tensor]]], channel: str,
             key: Any = None, tag: int = 0) -> None:
        """Post asynchronous sends of ``tensors`` to each ``peer``, each packed into a
        pooled wire buffer; the buffers are kept until :meth:`release` of ``key`` or
        :meth:`flush`. The first send to a peer on a channel also sends the header.

        Raises:
            CommFailure: when the tensors' shapes or dtypes differ from the first send's.
        """
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = []
        for peer, tensors in items:
            pair = (peer, channel)
            pool = self._send_pool.get(pair)
            if pool is None:
                header = encode_meta(tensors).to(self._wire_device)
                pending.append((self._isend(header, peer, _meta_tag(channel)), header, None))
                self._send_layout[pair] = [(tuple(t.shape), t.dtype) for t in tensors]
                pool = self._send_pool[pair] = []
            slot = pool.pop() if pool else _Slot(self._send_layout[pair], self._wire_device)
            views = slot.views
            if len(tensors) != len(views):
                raise CommFailure(f"rank {self.rank}: {len(tensors)} tensors to send to rank "
                                  f"{peer} ({channel}), the first send had {len(views)}")
            for view, t in zip(views, tensors):
                if view.shape != t.shape or view.dtype != t.dtype:
                    raise CommFailure(f"rank {self.rank}: a tensor of shape "
                                      f"{tuple(t.shape)} {t.dtype} to send to rank {peer} "
                                      f"({channel}), the first send had {tuple(view.shape)} "
                                      f"{view.dtype}; shapes must not change during a run")
                view.copy_(t)
            if self.link_bytes_s is not None:
                slot.stamp.fill_(time.time())
            pending.append((self._isend(slot.buffer, peer, tag), slot, pool))
            self.bytes_sent += slot.buffer.numel()
        self.messages_sent += len(items)

    def _learn_meta(self, peers: Sequence[int], channel: str) -> None:
        new = [p for p in peers if (p, channel) not in self._recv_meta]
        if not new:
            return
        headers = {p: torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self._wire_device)
                   for p in new}
        works = [self._irecv(h, p, _meta_tag(channel)) for p, h in headers.items()]
        self._wait(works, f"receiving shapes from rank(s) {new} ({channel})")
        for p, h in headers.items():
            self._recv_meta[(p, channel)] = decode_meta(h.cpu())
            self._recv_pool[(p, channel)] = []

    def _post(self, peers: Sequence[int], channel: str, tag: int) -> None:
        entries = []
        for p in peers:
            pool = self._recv_pool[(p, channel)]
            slot = pool.pop() if pool else _Slot(self._recv_meta[(p, channel)],
                                                  self._wire_device)
            entries.append((p, self._irecv(slot.buffer, p, tag), slot, pool))
        self._posted[(channel, tag)] = entries

    def post_recv(self, peers: Sequence[int], channel: str, tag: int) -> bool:
        """Post the receives of the message ``tag`` from every peer now, into pooled
        buffers, so that the sender's data lands while this rank computes; :meth:`recv`
        with the same ``tag`` waits for them. Returns False (and posts nothing) when the
        backend pairs messages by call order or a peer's shapes are not known yet (its
        first message: :meth:`recv` learns them and posts at the wait)."""
        if not self.can_post or (channel, tag) in self._posted:
            return False
        for p in peers:
            if (p, channel) not in self._recv_meta:
                return False
        self._post(peers, channel, tag)
        return True

    def recv(self, peers: Sequence[int], channel: str, tag: int = 0,
             key: Any = None) -> list[list[torch.Tensor]]:
        """Receive one transfer from each of ``peers`` (its receive posted by
        :meth:`post_recv`, else now); tensors land on ``self.device``. Sleeps as the
        emulated links require (see [Note: emulated links]).

        With ``key`` the tensors may alias pooled wire buffers, which go back to the pool
        at :meth:`recycle` of ``key`` (the caller must not use the tensors after that);
        without it they are the caller's own."""
        entries = self._posted.pop((channel, tag), None)
        if entries is None:
            self._learn_meta(peers, channel)
            self._post(peers, channel, tag)
            entries = self._posted.pop((channel, tag))
        try:
            self._wait([entry[1] for entry in entries],
                       lambda: f"receiving from rank(s) {list(peers)} ({channel})")
        except CommFailure:
            self._posted[(channel, tag)] = entries   # still held by the backend
            raise
        out = []
        lend = self._lend and key is not None
        lent: list[tuple[list[_Slot], _Slot]] = []
        for p, _, slot, pool in entries:
            if lend:
                tensors = [view.detach() for view in slot.views]
                lent.append((pool, slot))
            else:
                tensors = [view.to(self.device, copy=True) for view in slot.views]
                pool.append(slot)
            if self.link_bytes_s is not None:
                # the link is busy for bytes / bandwidth (messages queue behind each
                # other); the latency delays the arrival without holding the link
                sent = (max(slot.stamp.item(), self._link_free.get(p, 0.0))
                        + slot.buffer.numel() / self.link_bytes_s(p, self.rank))
                self._link_free[p] = sent
                self._pace_until(sent + self._latency(p, self.rank))
            out.append(tensors)
        self.messages_received += len(entries)
        if lent:
            held = self._lent.get(key)
            if held is None:
                self._lent[key] = lent
            else:
                held.extend(lent)
        return out

    def recycle(self, key: Any) -> None:
        """The tensors :meth:`recv` returned under ``key`` are no longer used: their wire
        buffers go back to the pool."""
        for pool, slot in self._lent.pop(key, ()):
            pool.append(slot)

    def held(self) -> list[torch.Tensor]:
        """Wire buffers this rank holds besides the tensors handed out: sends posted and
        not yet awaited, receives posted and not yet awaited, and the idle pools."""
        out = [slot.buffer if isinstance(slot, _Slot) else slot
               for entries in self._pending.values() for _, slot, _ in entries]
        return out + self._posted_and_idle()

    def wire_buffers(self) -> list[torch.Tensor]:
        """Every pooled wire buffer this rank has allocated: sends pending, receives posted
        or lent out, and the idle pools. The pools keep them for the rest of the run (see
        runtime/memory.py [Note: measured memory])."""
        out = [slot.buffer for entries in self._pending.values() for _, slot, _ in entries
               if isinstance(slot, _Slot)]
        out += [slot.buffer for lent in self._lent.values() for _, slot in lent]
        return out + self._posted_and_idle()

    def _posted_and_idle(self) -> list[torch.Tensor]:
        """The buffers of receives posted and of the idle pools."""
        out = [entry[2].buffer for entries in self._posted.values() for entry in entries]
        for pools in (self._send_pool, self._recv_pool):
            out += [slot.buffer for pool in pools.values() for slot in pool]
        return out

    def _finish(self, entries: Sequence[tuple[Any, Any, list[_Slot] | None]]) -> None:
        self._wait([work for work, _, _ in entries], "sending")
        for _, slot, pool in entries:
            if pool is not None:
                pool.append(slot)

    def release(self, keys: Sequence[Any]) -> None:
        """Wait for the sends posted under ``keys`` (already received, so this does not
        block; see runtime/lowering.py [Note: releasing sends]); their buffers go back to
        the pool."""
        pending = self._pending
        for key in keys:
            entries = pending.pop(key, None)
            if entries:
                self._finish(entries)

    def flush(self) -> None:
        """Wait for every posted send."""
        pending, self._pending = self._pending, {}
        for entries in pending.values():
            self._finish(entries)

    def abandon(self) -> None:
        """Forget posted receives and sends after a failure (the process group that holds
        them is torn down by the caller); buffers are not reused."""
        self._posted.clear()
        self._pending.clear()
        self._lent.clear()

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
    gradient's bytes or :data:`SMALL_BUCKET_BYTES`, whichever is larger (contiguous tensors
    of one dtype share a bucket).

    No flat buffer is then larger than the largest gradient or 256 KiB (and never than the
    stage's gradients), which the memory model budgets for a data-parallel stage
    (``solver.evaluate.transient_gradient_bytes``); so data parallelism needs no copy of
    a whole stage's gradients. The floor, :data:`SMALL_BUCKET_BYTES`, matters for stages of
    many small layers: each bucket is one collective, and a collective costs a fixed time
    per ring step (a process wake-up on each member; on a CPU-capped emulated device up to
    a quota period) whatever its size. SkipNet's ten gradients of 19 KB went in three
    all-reduces without it.
    """
    if not grads:
        return []
    cap = max(max(g.numel() * g.element_size() for g in grads), SMALL_BUCKET_BYTES)
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
