"""Test-only fault injection: a worker signals itself at a named point of a round."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from contracts.errors import RuntimeFailure

__all__ = ["ENV", "LOG_ENV", "MOMENTS", "FAULTS", "Fault", "parse_faults", "armed",
           "fault_point", "rearm"]

log = logging.getLogger(__name__)

# [Note: fault injection]
# For chaos tests only (tools/chaos.py, tests/test_chaos.py). A worker process reads
# ``ASTEROID_FX_FAULT`` once, at import: ``DEVICE@STEP:MOMENT:FAULT[:SECONDS]``, several
# separated by commas. When the device reaches MOMENT of round STEP it sends itself FAULT:
#
#   moment        where (the first time it is reached at or after STEP)
#   forward       start of a forward of a micro-batch (runtime.executor)
#   backward      start of a backward of a micro-batch
#   allreduce     start of the gradient all-reduce of a data-parallel group (a device of a
#                 multi-device stage only)
#   replica-push  the background thread about to send the replica of step STEP to a holder
#                 (the first device of a stage with holders only)
#   recovery      the hand-over after another device failed (a recovery already under way)
#
#   fault         signal
#   kill          SIGKILL
#   stop          SIGSTOP (a hang: the launcher must find and fence it)
#   stop-cont     SIGSTOP, then SIGCONT after SECONDS (default 1.5, a heartbeat timeout
#                 and a half) from a helper process
#   leave         SIGTERM (a graceful leave in replay mode)
#
# Before the signal it appends one JSON line to ``ASTEROID_FX_FAULT_LOG`` (when set):
# ``{"device", "step", "moment", "fault", "pid", "at"}`` (``at``: time.time()), so a chaos
# harness knows that and when the fault fired. Each fault fires once per process. Unset,
# ``fault_point`` is one truth test of a module global: nothing else runs.

ENV = "ASTEROID_FX_FAULT"
LOG_ENV = "ASTEROID_FX_FAULT_LOG"
MOMENTS = ("forward", "backward", "allreduce", "replica-push", "recovery")
FAULTS: dict[str, int] = {"kill": int(signal.SIGKILL), "stop": int(signal.SIGSTOP),
                          "stop-cont": int(signal.SIGSTOP), "leave": int(signal.SIGTERM)}
DEFAULT_CONT_S = 1.5

_SPEC = re.compile(r"^\s*([^@\s,:]+)@(\d+):([a-z-]+):([a-z-]+)(?::([0-9.]+))?\s*$")


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``device`` sends itself ``fault`` at ``moment`` of step ``step``."""

    device: str
    step: int
    moment: str
    fault: str
    cont_after_s: float = DEFAULT_CONT_S

    def spec(self) -> str:
        """This fault as ``ASTEROID_FX_FAULT`` text."""
        tail = f":{self.cont_after_s:g}" if self.fault == "stop-cont" else ""
        return f"{self.device}@{self.step}:{self.moment}:{self.fault}{tail}"


def parse_faults(text: str | None) -> tuple[Fault, ...]:
    """``DEVICE@STEP:MOMENT:FAULT[:SECONDS][,...]`` -> faults (see [Note: fault injection]).

    Raises:
        RuntimeFailure: a malformed item, an unknown moment or fault.
    """
    if not text or not text.strip():
        return ()
    out = []
    for part in text.split(","):
        match = _SPEC.match(part)
        if not match:
            raise RuntimeFailure(f"{ENV}={text!r}: expected DEVICE@STEP:MOMENT:FAULT[:SECONDS] "
                                 f"(e.g. slow0@2:backward:kill), comma-separated")
        device, step, moment, fault, seconds = match.groups()
        if moment not in MOMENTS:
            raise RuntimeFailure(f"{ENV}: unknown moment {moment!r}; choose one of "
                                 f"{list(MOMENTS)}")
        if fault not in FAULTS:
            raise RuntimeFailure(f"{ENV}: unknown fault {fault!r}; choose one of "
                                 f"{list(FAULTS)}")
        out.append(Fault(device, int(step), moment, fault,
                         float(seconds) if seconds else DEFAULT_CONT_S))
    return tuple(out)


def _from_environment() -> tuple[Fault, ...]:
    try:
        return parse_faults(os.environ.get(ENV))
    except RuntimeFailure as exc:   # a worker must not die of a bad test setting
        log.error("fault injection disabled: %s", exc)
        return ()


_ARMED: tuple[Fault, ...] = _from_environment()
_FIRED: set[Fault] = set()
_LOCK = threading.Lock()


def armed() -> tuple[Fault, ...]:
    """The faults this process may still inject."""
    return tuple(f for f in _ARMED if f not in _FIRED)


def rearm(text: str | None) -> None:
    """Replace the armed faults (tests; a worker reads ``ASTEROID_FX_FAULT`` at import)."""
    global _ARMED
    with _LOCK:
        _ARMED = parse_faults(text)
        _FIRED.clear()


def fault_point(moment: str, device: str, step: int) -> None:
    """Fire the armed fault of ``device`` at ``moment`` of ``step`` (or a later step), if
    any; without ``ASTEROID_FX_FAULT`` this returns at once."""
    if not _ARMED:
        return
    with _LOCK:
        due = [f for f in _ARMED if f not in _FIRED and f.device == device
               and f.moment == moment and step >= f.step]
        if not due:
            return
        fault = due[0]
        _FIRED.add(fault)
    _fire(fault, step)


def _fire(fault: Fault, step: int) -> None:
    pid = os.getpid()
    at = time.time()
    record = {"device": fault.device, "step": step, "moment": fault.moment,
              "fault": fault.fault, "pid": pid, "at": at}
    path = os.environ.get(LOG_ENV)
    if path:
        with Path(path).open("a") as fh:     # one short line: appends do not interleave
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    log.warning("fault injection: device %s sends itself %s at %s of step %d", fault.device,
                fault.fault, fault.moment, step)
    if fault.fault == "stop-cont":
        # the helper outlives nothing: it ends after the sleep, whether or not the
        # launcher fenced (killed) this process in the meantime
        subprocess.Popen(["/bin/sh", "-c", f"sleep {fault.cont_after_s:g}; "
                          f"kill -CONT {pid} 2>/dev/null"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True)
    # to this thread, not the process: a process-directed SIGSTOP may be taken by another
    # thread (e.g. a training thread throttled by its CPU quota), and this one would go on
    # (chaos seed 0 trial 11 under --hog: the hand-over was published after the "stop")
    signal.pthread_kill(threading.get_ident(), FAULTS[fault.fault])
