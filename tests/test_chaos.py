"""Tests of runtime.faults and tools/chaos.py: fault points, and fixed seeds of chaos trials."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asteroid_fx.errors import RuntimeFailure
from runtime import faults
from runtime.faults import Fault, parse_faults

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import chaos  # noqa: E402


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[tuple[int, int]]]:
    """Signals ``runtime.faults`` would send (recorded, not sent); its log in tmp_path."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(faults.signal, "pthread_kill",
                        lambda thread, sig: calls.append((thread, sig)))
    monkeypatch.setenv(faults.LOG_ENV, str(tmp_path / "faults.jsonl"))
    yield calls
    faults.rearm(None)


def test_parse_faults() -> None:
    assert parse_faults(None) == () and parse_faults("  ") == ()
    assert parse_faults("slow0@2:backward:kill, d1@0:recovery:stop-cont:0.5") == (
        Fault("slow0", 2, "backward", "kill"), Fault("d1", 0, "recovery", "stop-cont", 0.5))
    assert Fault("d1", 0, "recovery", "stop-cont", 0.5).spec() == "d1@0:recovery:stop-cont:0.5"
    assert Fault("d1", 3, "forward", "kill").spec() == "d1@3:forward:kill"
    with pytest.raises(RuntimeFailure, match="expected DEVICE@STEP:MOMENT:FAULT"):
        parse_faults("slow0@2")
    with pytest.raises(RuntimeFailure, match="unknown moment 'optimizer'"):
        parse_faults("slow0@2:optimizer:kill")
    with pytest.raises(RuntimeFailure, match="unknown fault 'explode'"):
        parse_faults("slow0@2:forward:explode")


def test_a_fault_fires_once_at_its_moment_and_logs_first(sent: list[tuple[int, int]],
                                                        tmp_path: Path) -> None:
    faults.rearm("d1@2:backward:stop,d0@1:allreduce:leave")
    faults.fault_point("backward", "d1", 1)       # too early
    faults.fault_point("forward", "d1", 2)        # another moment
    faults.fault_point("backward", "d0", 2)       # another device
    assert sent == []
    faults.fault_point("backward", "d1", 3)       # the first time at or after the step
    faults.fault_point("backward", "d1", 4)       # once only
    faults.fault_point("allreduce", "d0", 1)
    assert [sig for _, sig in sent] == [int(signal.SIGSTOP), int(signal.SIGTERM)]
    logged = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert [(r["device"], r["step"], r["moment"], r["fault"]) for r in logged] == [
        ("d1", 3, "backward", "stop"), ("d0", 1, "allreduce", "leave")]
    assert faults.armed() == ()


def test_without_the_variable_nothing_is_armed(sent: list[tuple[int, int]]) -> None:
    faults.rearm(None)
    for moment in faults.MOMENTS:
        faults.fault_point(moment, "d0", 0)
    assert sent == [] and faults.armed() == ()


def test_trials_are_drawn_by_seed_within_their_constraints() -> None:
    trials = [chaos.draw(i, 7, 6) for i in range(60)]
    assert trials == [chaos.draw(i, 7, 6) for i in range(60)]   # reproducible
    assert {t.fault.moment for t in trials} == set(faults.MOMENTS)
    assert {t.fault.fault for t in trials} == set(faults.FAULTS)
    for t in trials:
        stages = chaos.layout_devices(t.layout)
        assert 3 <= sum(map(len, stages)) <= 5 and any(len(s) > 1 for s in stages)
        assert 1 <= t.fault.step <= 4
        if t.fault.moment == "allreduce":
            assert any(t.fault.device in s for s in stages if len(s) > 1)
        if t.fault.moment == "replica-push":
            assert t.fault.device in [s[0] for s in stages]
        assert (t.primary is not None) == (t.fault.moment == "recovery")
        assert t.primary != t.fault.device


def _trial(tmp_path: Path, layout: str, fault: Fault, primary: str | None = None) -> chaos.Row:
    steps = 5
    trial = chaos.Trial(0, layout, fault, primary)
    row = chaos.run_trial(trial, tmp_path, steps=steps, seed=1, deadline_s=100.0,
                          reference=chaos.reference_losses(steps, 1), hog=False)
    assert row.outcome != "hang" and row.leftover == 0, row
    assert row.devices_ok and row.losses_ok, row
    return row


@pytest.mark.slow
def test_a_kill_in_the_backward_of_a_group_member(tmp_path: Path) -> None:
    row = _trial(tmp_path, "1|2", Fault("d2", 2, "backward", "kill"))
    assert row.outcome == "finished" and row.fired == ["d2"] and row.failed == [["d2"]]
    assert row.sources == ["replica"] and row.lost_steps == 0
    assert row.detect_s is not None and 0 <= row.detect_s < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("index", [2, 4, 6, 11])
def test_fixed_seeds_of_the_chaos_run(tmp_path: Path, index: int) -> None:
    trial = chaos.draw(index, 0, 6)
    row = chaos.run_trial(trial, tmp_path, steps=6, seed=0, deadline_s=120.0,
                          reference=chaos.reference_losses(6, 0), hog=False)
    assert row.outcome in ("finished", "stopped") and row.leftover == 0, row
    assert row.devices_ok and row.losses_ok, row
    if row.outcome == "stopped":
        assert row.reason and "\n" not in row.reason


def test_a_device_stopped_during_the_hand_over_is_fenced_and_named(tmp_path: Path) -> None:
    """Chaos seed 0, trial 11, on three devices: d2 is killed during step 2 and d1 is
    SIGSTOPped in its hand-over. The launcher waited 10 s for d1's hand-over, then left it
    out of the event and of the survivors, neither fenced nor told to exit (a new process
    for d1 could start beside the stopped one). Now a stopped process fails at once."""
    row = _trial(tmp_path, "1|2", Fault("d1", 2, "recovery", "stop"), primary="d2")
    assert row.outcome == "finished" and row.fired == ["d1"]
    assert row.failed == [["d1", "d2"]] and row.sources == ["replica"]
    assert max(row.recover_s) < 5.0      # not the 10 s hand-over limit


@pytest.mark.slow
def test_a_double_failure_without_a_replica_falls_back_to_the_checkpoint(
        tmp_path: Path) -> None:
    """Layout 2|1: d2 (the last stage alone) is killed during step 3 and the holder of its
    replica dies in its hand-over: no copy of stage 1 is left, so the recovery says so and
    resumes from the disk checkpoint of step 1 (every 2 steps), re-training step 2."""
    from asteroid_fx.replanning import Replanner
    from runtime.recovery import _load_model, _replicas
    from runtime.stage_io import load_plan

    directory, cluster_file = chaos.make_partition(tmp_path, "2|1")
    model = _load_model(directory, cluster_file, Replanner())
    replicas, _ = _replicas(load_plan(directory), model, model.cluster, 1)
    holder = replicas["d2"][0]
    row = _trial(tmp_path, "2|1", Fault(holder, 3, "recovery", "kill"), primary="d2")
    assert row.outcome == "finished" and row.double and row.double_ok
    assert row.failed == [sorted(["d2", holder])] and row.sources == ["checkpoint"]
    assert row.lost_steps == 1


def _check(tmp_path: Path, trial: chaos.Trial, events: list[list[str]],
           fired: list[dict[str, object]], plans: list[list[str]]) -> chaos.Row:
    reference = [2.0, 1.5, 1.0]
    metrics = tmp_path / "metrics.jsonl"
    lines: list[dict[str, object]] = [{"step": k, "loss": v} for k, v in enumerate(reference)]
    lines += [{"event": "recovery", "failed": f, "source": "replica", "lost_steps": 0}
              for f in events]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = tmp_path / "faults.jsonl"
    log.write_text("".join(json.dumps(f) + "\n" for f in fired))
    row = chaos.Row(trial=0, layout=trial.layout, fault=trial.label, moment=trial.fault.moment,
                    kind=trial.fault.fault, outcome="finished", plans=plans)
    chaos.check(row, trial, metrics, log, reference, 3)
    return row


def test_the_checker_flags_a_wrong_or_missing_device(tmp_path: Path) -> None:
    trial = chaos.Trial(0, "1|2", Fault("d1", 1, "forward", "kill"))
    fired: list[dict[str, object]] = [{"device": "d1", "step": 1, "moment": "forward",
                                       "fault": "kill", "at": 0.0}]
    assert _check(tmp_path, trial, [["d1"]], fired, [["d0", "d2"]]).devices_ok
    wrong = _check(tmp_path, trial, [["d2"]], fired, [["d0", "d1"]])
    assert not wrong.devices_ok and "blamed ['d2']" in wrong.devices_note
    assert "['d1'] failed but no event names it" in wrong.devices_note
    assert not _check(tmp_path, trial, [["d1"], ["d1"]], fired, []).devices_ok
    # a leave asked during a recovery whose re-plan dropped the device: nothing to name
    trial = chaos.Trial(0, "1|2", Fault("d2", 1, "recovery", "leave"), primary="d1")
    fired = [{"device": "d2", "step": 1, "moment": "recovery", "fault": "leave", "at": 0.0}]
    assert _check(tmp_path, trial, [["d1"]], fired, [["d0"]]).devices_ok
    assert not _check(tmp_path, trial, [["d1"]], fired, [["d0", "d2"]]).devices_ok


def test_the_last_device_of_the_plan_leaves_and_an_unused_one_takes_over(
        tmp_path: Path) -> None:
    """Chaos seed 0, trial 41, on five steps: d0 is killed during step 2 and d1 asks to leave
    during the hand-over. When the re-plan keeps d1 alone, d1 leaves after the next round
    and no device of the plan is left: the run stopped ("no device of the plan survives")
    although d2, dropped by the re-plan, was alive. Now a fresh plan on the cluster's unused
    devices takes over, with d1's handed-over state."""
    row = _trial(tmp_path, "1|2", Fault("d1", 2, "recovery", "leave"), primary="d0")
    assert row.outcome == "finished", row.reason
    assert row.failed[0] == ["d0"]
    if row.plans[0] == ["d1"]:          # the case that stopped the run
        assert row.failed == [["d0"], ["d1"]] and row.sources[1] == "handover"
        assert row.plans[1] == ["d2"] and row.lost_steps == 0
