"""Shaping emulated devices to their speed on this host: cgroup-v1 CPU quotas when this
process may create groups, else time dilation (each rank's compute time scaled up).

[Note: one shaping choice]
:func:`choose_shaping` is the one place that picks the mechanism, for ``runtime.emulator``
(``run --emulate``) and for every generation of ``runtime.recovery``: cgroups when allowed
and some rank is slower than one core (or, ``regroup``, when ranks of an earlier generation
sit in groups that must be replaced), falling back to time dilation when making a group
fails; nothing when every rank runs at full speed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contracts.errors import RuntimeFailure
from contracts.plan import Plan
from runtime.train import StageSource

__all__ = ["CGROUP_ROOT", "Shaping", "choose_shaping", "cgroup_available", "cfs_settings",
           "make_cgroup", "make_cgroups", "remove_cgroups", "PerRankScale", "cpu_stat",
           "CommThreads", "comm_group", "COMM_SUFFIX", "SPLIT_COMM"]

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
_CFS_PERIOD_US = 5_000

# [Note: contending devices]
# A device's cgroup quota caps its CPU time per period but does not guarantee it: when more
# device processes want to run than there are cores, CFS shares the cores between them by
# weight, and a period's unused quota is lost. On this project's 2-core host (while other
# jobs ran) a ResNet-50 pipeline on local3 (fast at 0.75 core | slow0+slow1 at 0.375 each)
# measured its `fast` device's forward/backward at 2.2x its thread CPU time, where its
# quota allows 1.33x. Each cgroup's cpu.shares therefore grows with its speed (2048 x speed,
# at least a plain process's 1024), so a contending fast device wins its quota over the
# slow ones. Pinning each device to a core
# (worst-fit by speed, no core overbooked) brought that ratio to 1.6x in one run, but made
# heartbeats miss their 1 s deadline at start-up in the recovery tests (two processes
# importing torch on one core under their quotas), so it is not done.


# [Note: communication threads]
# A device process computes on its main thread (one intra-op thread); gloo moves its
# messages and runs its collectives on threads of its own (the process group's workers
# and the transport's loop). In one CPU group with the compute, they share its quota: a
# device that has just spent its quota on compute (every busy one, at the end of each
# burst) cannot answer a message until the next period, up to (1 - speed) x 5 ms later,
# on every hop. PAC's phase-2 all-reduce over local3 (4 hops, gradients of 139 KB)
# measured 6-16 ms on the device that arrived last, against 3.9 ms predicted from the
# runtime's per-message cost, and 3.1-4.0 ms under time dilation, which caps nothing
# (2026-12-05, load 2-3). A board has more than one core, and its communication threads
# do not wait for its compute thread's time slice. So every device group has a sibling
# (the group's path + ``COMM_SUFFIX``) with the same quota, and the worker keeps every
# thread but the main one there (:class:`CommThreads`): messages are paid at the
# device's speed, never behind its compute's spent quota.
COMM_SUFFIX = "c"
SPLIT_COMM = True
"""Whether device groups get a sibling for their communication threads."""
PACE = False
"""Whether cgroup-capped ranks also pace their compute calls (runtime/pacing.py, [Note:
pacing]): off, as measured on 2026-12-05 it fixed phase 1's burst but moved the other
comparisons without making them better on a loaded host (docs/latency-model.md,
"Pacing the compute of capped devices")."""


def comm_group(path: str | Path) -> Path:
    """The sibling group of device group ``path`` for its communication threads."""
    return Path(f"{path}{COMM_SUFFIX}")


class CommThreads:
    """Keeps every thread of this process but the one that made it (the main, computing
    thread) in the communication sibling of the process's CPU group (see [Note:
    communication threads]); threads that start later (gloo's, for each new process
    group) are moved within ``interval_s``."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.main = threading.get_native_id()
        self.interval_s = interval_s
        self._target: Path | None = None
        self._moved: set[int] = set()
        self._lock = threading.Lock()
        self._thread: Any = None

    def follow(self, cgroup: str | None) -> None:
        """Put this process in ``cgroup`` (every thread) and from now on its other threads
        in the group's sibling (nothing moves when it has none; nothing at all when
        ``cgroup`` is None). Both under one lock, so that the mover never sends a new
        thread to the previous group's sibling in between."""
        target = None if cgroup is None else comm_group(cgroup)
        with self._lock:
            if cgroup is not None:
                Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
            self._target = target if target is not None and target.is_dir() else None
            self._moved = set()
        if self._target is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="asteroid-fx-comm-threads",
                                            daemon=True)
            self._thread.start()
        self.move()

    def move(self) -> None:
        """Move the threads not yet moved (a thread that ended meanwhile is skipped)."""
        with self._lock:
            target = self._target
            if target is None:
                return
            for name in os.listdir("/proc/self/task"):
                tid = int(name)
                if tid == self.main or tid in self._moved:
                    continue
                try:
                    (target / "tasks").write_text(name)
                except OSError:
                    continue
                self._moved.add(tid)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.move()


@dataclass(frozen=True)
class Shaping:
    """How the ranks of one launch are shaped: ``kind`` is "cgroup", "dilation" or
    "none"; ``cgroups`` the group each rank runs in (cgroup shaping, else None),
    ``scales`` each rank's time-dilation factor (1.0: none) and ``made`` the groups
    created for it (remove them with :func:`remove_cgroups`)."""

    kind: str
    cgroups: tuple[str, ...] | None
    scales: tuple[float, ...]
    made: tuple[str, ...] = ()
    #: each rank's speed that its compute calls are paced to (cgroup shaping: the quota's;
    #: 1.0: none; see [Note: pacing] in runtime/pacing.py)
    paces: tuple[float, ...] = ()

    def wrap(self, source: StageSource) -> StageSource:
        """``source``, carrying the per-rank dilation factors when ``kind`` is "dilation"
        and the per-rank paces when some rank is paced."""
        paced = any(p < 1.0 for p in self.paces)
        if self.kind == "dilation" or paced:
            return PerRankScale(source, self.scales, self.paces)
        return source


def choose_shaping(speeds: Sequence[float], *, use_cgroups: bool, tag: int = 0,
                   fast_in_root: bool = False, regroup: bool = False) -> Shaping:
    """Shape ranks running at ``speeds`` (fractions of one host core; see [Note: one shaping
    choice]). With cgroups, each rank gets a group of its own named by ``tag`` (a
    generation) and its rank; ``fast_in_root`` puts ranks at speed >= 1 in the root group
    instead (no cap: how recovery moves a survivor out of an older, lower cap)."""
    slow = any(s < 1.0 for s in speeds)
    ones = tuple(1.0 for _ in speeds)
    if use_cgroups and (slow or regroup):
        try:
            paces = tuple(min(1.0, s) for s in speeds) if PACE else ones
            if not fast_in_root:
                made = make_cgroups(speeds, tag=tag)
                return Shaping("cgroup", tuple(made), ones, tuple(made), paces)
            capped = [r for r, s in enumerate(speeds) if s < 1.0]
            made = (make_cgroups([speeds[r] for r in capped], tag=tag, ranks=capped)
                    if capped else [])
            groups = [str(CGROUP_ROOT)] * len(speeds)
            for r, path in zip(capped, made):
                groups[r] = path
            return Shaping("cgroup", tuple(groups), ones, tuple(made), paces)
        except OSError as exc:
            log.warning("cgroup CPU shaping unavailable (%s); using time dilation", exc)
    if slow:
        return Shaping("dilation", None, tuple(1.0 / s if s < 1.0 else 1.0 for s in speeds))
    return Shaping("none", None, ones)


def cgroup_available() -> bool:
    """Whether this process may create cgroup-v1 CPU groups (root on a v1 host)."""
    return (CGROUP_ROOT / "cpu.cfs_quota_us").exists() and os.access(CGROUP_ROOT, os.W_OK)


def cfs_settings(speed: float) -> tuple[int, int]:
    """(cpu.cfs_period_us, cpu.cfs_quota_us) holding a process to ``speed`` of one core.

    The period is short (5 ms) so that a burst of compute after idle waiting is throttled
    too (CFS only caps the CPU time per period); the kernel's 1 ms minimum quota stretches
    the period for very slow devices.
    """
    speed = min(max(speed, 1e-3), 1.0)
    period = _CFS_PERIOD_US
    quota = int(round(speed * period))
    if quota < 1000:
        quota, period = 1000, int(round(1000 / speed))
    return period, quota


def cpu_stat(path: str | Path) -> dict[str, int]:
    """The counters of the cgroup-v1 CPU group ``path`` (its ``cpu.stat``): ``nr_periods``
    (quota periods in which it ran), ``nr_throttled`` (periods in which its quota ran out),
    ``throttled_time`` (ns its runqueues spent throttled, summed over CPUs), and whatever
    else this kernel reports. Raises ``OSError`` when the group cannot be read and
    ``RuntimeFailure`` when a line is not ``name value``."""
    counters: dict[str, int] = {}
    for line in Path(path, "cpu.stat").read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise RuntimeFailure(f"{path}/cpu.stat: line {line!r} is not 'name value'; is "
                                 f"{path} a cgroup-v1 CPU group?")
        counters[parts[0]] = int(parts[1])
    return counters


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_cgroups() -> None:
    """Remove empty ``asteroid-fx-<pid>-<rank>`` groups left by launchers that were killed."""
    for path in CGROUP_ROOT.glob("asteroid-fx-*-*"):
        parts = path.name.split("-")
        if len(parts) == 4 and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            try:
                os.rmdir(path)
            except OSError:
                pass


def make_cgroup(path: Path, speed: float, *, comm: bool | None = None) -> None:
    """Create (or reuse) the cgroup-v1 CPU group ``path`` holding its processes to
    ``speed`` of one core (:func:`cfs_settings`), and with ``comm`` (default
    :data:`SPLIT_COMM`, read at the call) its sibling for the communication threads,
    alike (see [Note: communication threads])."""
    period, quota = cfs_settings(speed)
    split = SPLIT_COMM if comm is None else comm
    for group in (path, comm_group(path)) if split else (path,):
        group.mkdir(exist_ok=True)
        # weight by speed (1024 = one core; see [Note: contending devices])
        # (never below a plain process's 1024, so a device does not lose its CPU to the
        # host's other work: at least 1024, and 2048 x speed above half a core)
        (group / "cpu.shares").write_text(str(max(1024, int(round(2048 * min(speed, 1.0))))))
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))


def make_cgroups(speeds: Sequence[float], *, tag: int = 0,
                 ranks: Sequence[int] | None = None) -> list[str]:
    """One group per rank (``asteroid-fx-<pid>-<tag * 1000 + rank>``; ``ranks[i]`` is the
    rank of ``speeds[i]``, default ``i``) holding it to its speed (at most one core); on an
    OSError the groups made so far are removed."""
    _remove_stale_cgroups()
    made: list[str] = []
    try:
        for i, speed in enumerate(speeds):
            path = _group(tag, i if ranks is None else ranks[i])
            made.append(str(path))
            make_cgroup(path, speed)
    except OSError:
        remove_cgroups(made)
        raise
    return made


def _group(tag: int, rank: int) -> Path:
    return CGROUP_ROOT / f"asteroid-fx-{os.getpid()}-{tag * 1000 + rank}"


def remove_cgroups(paths: Sequence[str]) -> None:
    """Remove the (emptied) groups ``paths`` and their communication siblings, waiting up
    to 2.5 s for each to empty."""
    for path in [p for group in paths for p in (str(comm_group(group)), group)]:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
        else:
            log.warning("could not remove cgroup %s", path)


@dataclass(frozen=True)
class PerRankScale:
    """A source that also carries each rank's time-dilation factor (read by train_device)."""

    inner: StageSource
    scales: tuple[float, ...]
    paces: tuple[float, ...] = ()

    def load_plan(self) -> Plan:
        return self.inner.load_plan()

    def model_module(self) -> Any:
        return self.inner.model_module()

    def load_stage(self, index: int) -> torch.nn.Module:
        return self.inner.load_stage(index)

    def compute_scale(self, rank: int) -> float:
        return self.scales[rank]

    def pace_speed(self, rank: int) -> float:
        """The speed rank ``rank``'s compute calls are paced to (runtime/pacing.py)."""
        return self.paces[rank] if self.paces else 1.0

    def tied_parameters(self) -> dict[str, Any]:
        """The inner source's weights tied across stages (runtime/ties.py), if it says."""
        tied = getattr(self.inner, "tied_parameters", None)
        return dict(tied()) if callable(tied) else {}
