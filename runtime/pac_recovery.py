"""Recovery of a PAC run from a device lost in phase 1: the launcher's side and the store keys.

[Note: PAC phase-1 recovery]
Phase 1 (the frozen backbone's forward pipeline that fills the activation cache, see
[Note: PAC run] in runtime.pac_train) is a pipeline plan: losing a device there loses a
stage (or a member of one), the cache entries it held, and whatever it had in flight. The
workers recover by themselves, but the new phase-1 plan comes from a planner, which the
runtime never imports: the launcher is handed a :class:`Phase1Replanner` (the front end's
``asteroid_fx.finetune.PacReplanner``, on ``solver.pac.replan_phase1``) and
:class:`Phase1Recovery` calls it, as ``runtime.recovery`` calls its ``Replanner``.

1. The lost process ends (``--fail DEVICE@STEP`` with ``STEP`` < the steps of an epoch: it
   exits at the start of phase-1 mini-batch ``STEP``, after writing the time to
   :data:`KILLED_KEY`). Every worker runs a watcher thread during phase 1 that polls
   ``notice/<n>`` every :data:`NOTICE_POLL_S` and, when it appears, shuts the process
   group's TCP connections down (``runtime.replication.abort_connections``), so that no
   survivor stays blocked in a receive from another survivor.
2. Whoever sees the loss first sets ``notice/<n>``: the launcher, whose supervision loop
   sees the process exit (``Supervisor.watch(..., on_lost=...)``), or a survivor whose
   receive, send or barrier failed (the dead peer's sockets are closed).
3. The launcher re-plans phase 1 on the survivors (only when the lost device ran a
   phase-1 stage; otherwise the plan stays and only the owners of its samples change)
   and publishes ``replan/<n>``: the failed devices, the new phase-1 ``Plan`` as JSON
   (or the one-line error when no plan fits), the seconds the search took and when the
   launcher saw the loss. When every device has already finished phase 1
   (:data:`DONE_KEY` counts them) it does nothing: phase 2 recovers by itself
   ([Note: PAC recovery]).
4. The survivors (``runtime.pac_train``) wait for ``replan/<n>`` (at most
   :data:`REPLAN_WAIT_S`), start a process group of the survivors, load the segments of
   their new stage, agree on the first mini-batch not every survivor finished, recompute
   the lost device's rows of the mini-batches before it through the new pipeline, and go
   on from that mini-batch with the new plan. Phase 2 then runs without the lost device,
   its rows split as the plan's ``fallback`` says.

Everything here is plain JSON in the job's store (no pickle); every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from contracts.errors import AsteroidError, RuntimeFailure
from contracts.pac_plan import PacPlan
from contracts.plan import Plan

__all__ = ["Phase1Replanner", "Phase1Recovery", "FailSpec", "fail_specs", "parse_fail",
           "notice_key",
           "replan_key", "KILLED_KEY", "DONE_KEY", "REPLAN_WAIT_S", "NOTICE_POLL_S"]

log = logging.getLogger(__name__)

_PREFIX = "asteroid-fx/pac/p1"
#: the time (``time.time()``) at which an emulated loss (``--fail``) ended its process
KILLED_KEY = f"{_PREFIX}/killed_at"
#: counter: the devices that finished phase 1 (after its last barrier)
DONE_KEY = f"{_PREFIX}/done"
#: how long survivors wait for the launcher's re-plan (seconds)
REPLAN_WAIT_S = 60.0
#: how often a worker's watcher looks for a loss notice during phase 1 (seconds)
NOTICE_POLL_S = 0.02


def notice_key(n: int) -> str:
    """Set when the ``n``-th device of the run (from 1) is seen lost in phase 1."""
    return f"{_PREFIX}/notice/{n}"


def replan_key(n: int) -> str:
    """The launcher's answer to the ``n``-th loss: JSON (see :meth:`Phase1Recovery.__call__`)."""
    return f"{_PREFIX}/replan/{n}"


@runtime_checkable
class Phase1Replanner(Protocol):
    """What phase-1 recovery asks of a planner: plain data in and out."""

    def replan_phase1(self, pac: PacPlan, failed: Sequence[str]) -> Plan:
        """The phase-1 plan of ``pac`` on its devices without ``failed`` (``pac.phase1``
        itself when none of them ran a phase-1 stage). Raises ``PlanError`` when none
        fits."""
        ...


class Phase1Recovery:
    """The launcher's side of [Note: PAC phase-1 recovery]: called with the launch rank of a
    lost process and the job's store (``runtime.emulator.emulate(..., on_lost=...)``)."""

    def __init__(self, pac: PacPlan, replanner: Phase1Replanner) -> None:
        self.pac = pac
        self.replanner = replanner
        self.lost: list[str] = []
        #: what was published, per loss (for the caller's report)
        self.records: list[dict[str, Any]] = []

    def __call__(self, rank: int, store: Any) -> None:
        seen_at = time.time()
        device = self.pac.devices[rank]
        self.lost.append(device)
        n = len(self.lost)
        if int(store.add(DONE_KEY, 0)) >= len(self.pac.devices):
            log.info("device %s lost after phase 1: phase 2 recovers by itself", device)
            return
        store.set(notice_key(n), json.dumps({"failed": list(self.lost), "seen_at": seen_at}))
        began = time.perf_counter()
        record: dict[str, Any] = {"n": n, "failed": list(self.lost), "seen_at": seen_at}
        try:
            plan = self.replanner.replan_phase1(self.pac, list(self.lost))
            record.update(phase1=plan.to_dict(), replanned=plan != self.pac.phase1)
        except AsteroidError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["replan_s"] = time.perf_counter() - began
        store.set(replan_key(n), json.dumps(record))
        self.records.append(record)
        log.warning("phase 1 lost %s; re-planned in %.3f s", device, record["replan_s"])


@dataclass(frozen=True)
class FailSpec:
    """``--fail DEVICE@STEP`` of a PAC run: that device's process ends at the start of
    global step ``step`` (phase-1 mini-batch ``step`` when it is in epoch 1)."""

    device: str
    step: int
    #: ``DEVICE@aSTEP``: at the start of adapter step ``step`` of epoch 1, after phase 1
    #: ended everywhere (recovered as a phase-2 loss, [Note: PAC recovery])
    after_phase1: bool = False

    def in_phase1(self, pac: PacPlan) -> bool:
        return self.step < pac.steps_per_epoch and not self.after_phase1


def fail_specs(text: str, devices: Sequence[str], where: str) -> list[FailSpec]:
    """The ``DEVICE@STEP`` (or ``DEVICE@aSTEP``: epoch 1's adapter step, after phase 1)
    parts of ``--fail``, each naming one of ``devices`` (those of ``where``: the PAC plan,
    or the cluster before a plan is made); ``RuntimeFailure`` (one line) otherwise."""
    parsed: list[FailSpec] = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        device, sep, step = part.partition("@")
        adapter = step.startswith("a")
        step = step[1:] if adapter else step
        if not sep or not step.isdigit():
            raise RuntimeFailure(f"--fail must be DEVICE@STEP (or DEVICE@aSTEP: epoch 1's "
                                 f"adapter step STEP, after phase 1) with a device of "
                                 f"{list(devices)}, got {part!r}")
        if device not in devices:
            raise RuntimeFailure(f"--fail {part}: device {device!r} is not in {where} "
                                 f"(devices {list(devices)})")
        parsed.append(FailSpec(device, int(step), adapter))
    return parsed


def parse_fail(text: str | None, pac: PacPlan) -> FailSpec | None:
    """``--fail`` of a PAC run, checked against the plan (one lost device per run).

    Raises:
        RuntimeFailure: (one line) malformed, a device not in the plan, a step outside
            the run, several devices, every device of the plan lost, or a device whose
            samples no other device can cache.
    """
    if not text:
        return None
    parsed = fail_specs(text, pac.devices, "the PAC plan")
    total = pac.epochs * pac.steps_per_epoch
    for spec in parsed:
        if spec.step >= total:
            raise RuntimeFailure(f"--fail {spec.device}@{'a' if spec.after_phase1 else ''}"
                                 f"{spec.step}: the run has steps 0..{total - 1} "
                                 f"({pac.epochs} epochs of {pac.steps_per_epoch})")
    if not parsed:
        raise RuntimeFailure(f"--fail must be DEVICE@STEP, got {text!r}")
    lost = {f.device for f in parsed}
    if lost >= set(pac.devices):
        raise RuntimeFailure(f"--fail {text}: every device of the PAC plan "
                             f"{list(pac.devices)} would be lost; nothing is left to recover")
    if len(parsed) > 1:
        raise RuntimeFailure(f"--fail {text}: PAC recovers one lost device per run, got "
                             f"{len(parsed)}")
    spec = parsed[0]
    if spec.device not in pac.fallback:
        raise RuntimeFailure(f"--fail {text}: no other device can cache the samples of "
                             f"{spec.device!r} (the plan has fallback shares for "
                             f"{sorted(pac.fallback)})")
    return spec


def read_record(store: Any, n: int, timeout_s: float = REPLAN_WAIT_S) -> dict[str, Any]:
    """The launcher's ``replan/<n>`` (waited for at most ``timeout_s``).

    Raises:
        RuntimeFailure: it did not come (no device was lost, or no launcher re-plans), or
            it carries the re-planner's error.
    """
    from datetime import timedelta

    try:
        store.wait([replan_key(n)], timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise RuntimeFailure(f"phase 1 failed and no re-plan came from the launcher within "
                             f"{timeout_s:.0f} s (no device was seen lost, or the launcher "
                             f"does not recover PAC's phase 1): {exc}") from None
    record: dict[str, Any] = json.loads(store.get(replan_key(n)).decode())
    if "error" in record:
        raise RuntimeFailure(f"phase 1 lost {record['failed']} and could not be re-planned: "
                             f"{record['error']}")
    return record
