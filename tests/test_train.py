"""Tests of runtime.train / runtime.launch: a saved partition trained end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_executor import MODEL, write_model

from contracts.errors import RuntimeFailure
from contracts.plan import Plan, Stage
from runtime.launch import metrics_lines, run
from runtime.reference import reference_training
from runtime.stage_io import load_model_module
from runtime.train import DirectorySource, load_stage_weights, model_state

CLUSTER = """
devices:
  - {name: fast, type: local, speed: 1.0, memory_gb: 1}
  - {name: slow0, type: local, speed: 0.5, memory_gb: 1}
  - {name: slow1, type: local, speed: 0.5, memory_gb: 1}
network:
  bandwidth_mbps: 1000
"""


def _partition(tmp_path: Path, predicted: bool = False, text: str = MODEL,
               prefix: str = "", stages: tuple[Stage, ...] | None = None) -> Path:
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition

    model_file = write_model(tmp_path, text)
    namespace: dict[str, object] = {}
    exec(compile(text, model_file, "exec"), namespace)
    model = namespace[f"{prefix}build_model"]()  # type: ignore[operator]
    inputs, _ = namespace[f"{prefix}sample_batch"](4)  # type: ignore[operator]
    plan = Plan("m", "c", 12, 6, 2, stages or (Stage((0, 1), ("fast",), (6,)),
                                               Stage((2, 4), ("slow0", "slow1"), (2, 4))),
                num_layers=5)
    if predicted:
        import yaml

        from asteroid_fx.costs import analytic_costs
        from contracts.cluster import Cluster
        from solver.evaluate import evaluate

        cluster = Cluster.from_dict(yaml.safe_load(CLUSTER))
        plan = plan.with_prediction(evaluate(plan, analytic_costs(model, inputs), cluster))
    out = tmp_path / "part"
    save_partition(out, plan, partition(model, inputs, plan),
                   model_spec=f"{model_file}:{prefix[:-1]}" if prefix else model_file, onnx=False)
    return out


def test_partition_directory_trains_like_one_process(tmp_path: Path) -> None:
    directory = _partition(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    seen: list[int] = []
    result = run(directory, emulate=cluster, steps=3, seed=5, lr=0.05,
                 metrics=tmp_path / "metrics.jsonl",
                 progress=lambda record: seen.append(int(record["step"])))
    ref = reference_training(load_model_module(directory), 12, steps=3, seed=5, lr=0.05)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)
    every = metrics_lines(tmp_path / "metrics.jsonl")
    lines = [line for line in every if "event" not in line]
    summary = every[-1]
    assert summary["event"] == "summary" and summary["steps"] == 3
    assert set(summary["devices"]) == {"fast", "slow0", "slow1"}
    assert summary["devices"]["slow1"]["stage"] == 1 and summary["devices"]["slow1"]["share"] == 4
    assert all(d["forward_s"] > 0 and d["backward_s"] > 0 for d in summary["devices"].values())
    # the computing thread's CPU time rides along: never more than the wall time it took
    # (plus the clocks' granularity), so wall / CPU says how long a device waited for a core
    for d in summary["devices"].values():
        assert 0 < d["forward_cpu_s"] <= d["forward_s"] + 1e-3
        assert 0 < d["backward_cpu_s"] <= d["backward_s"] + 1e-3
    assert summary["shaping"] == result.shaping
    assert summary["slowdown_factor"] == result.slowdown_factor
    assert [line["step"] for line in lines] == [0, 1, 2] == seen
    assert set(lines[0]) >= {"step", "loss", "round_time_s", "plan_version"}
    assert set(lines[0]) <= {"step", "loss", "round_time_s", "plan_version",
                             "peak_memory_bytes", "peak_reserved_bytes"}
    assert [line["loss"] for line in lines] == pytest.approx(ref.losses, rel=1e-6)
    assert all(line["round_time_s"] > 0 and line["plan_version"] == 0 for line in lines)
    from runtime.emulator import usable_cores

    assert result.mode == "emulate"
    assert result.slowdown_factor == pytest.approx(max(1.0, 2.0 / usable_cores()))
    assert [s.devices for s in result.stages] == [("fast",), ("slow0", "slow1")]
    assert "round time" in result.summary()
    json.dumps(lines)


def test_metrics_and_summary_carry_each_device_peak_memory(tmp_path: Path) -> None:
    directory = _partition(tmp_path, predicted=True)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    result = run(directory, emulate=cluster, steps=2, metrics=tmp_path / "metrics.jsonl")
    every = metrics_lines(tmp_path / "metrics.jsonl")
    lines = [line for line in every if "event" not in line]
    devices = {"fast", "slow0", "slow1"}
    summary_line = every[-1]["devices"]
    assert {d: summary_line[d]["peak_memory_bytes"] for d in devices} == \
        lines[-1]["peak_memory_bytes"]
    assert all(summary_line[d]["predicted_peak_memory_bytes"] > 0 for d in devices)
    for line in lines:
        assert set(line["peak_memory_bytes"]) == devices
        assert all(v > 0 for v in line["peak_memory_bytes"].values())
    assert result.peak_memory_bytes == lines[-1]["peak_memory_bytes"]
    for device, parts in result.tensor_memory.items():
        # the tensor count: weights, gradients, no SGD state, and the in-flight tensors
        assert parts["params"] == parts["grads"] > 0 and parts["optimizer_state"] == 0
        assert parts["in_flight"] > 0
        assert parts["total"] == result.peak_memory_bytes[device]
    if result.reserved_method == "rss":          # Linux: the resident high-water mark
        assert set(lines[-1]["peak_reserved_bytes"]) == devices
        assert result.peak_reserved_bytes == lines[-1]["peak_reserved_bytes"]
    plan_peaks = result.predicted_peak_memory_bytes
    assert set(plan_peaks) == devices
    summary = result.summary()
    assert "peak memory per device" in summary
    for device in devices:
        assert f"predicted {plan_peaks[device] / 2**20:.1f} MiB" in summary


def test_emulated_link_latency_delays_every_hop(tmp_path: Path) -> None:
    # 100 ms one-way latency: every micro-batch's activations reach stage 1 at least 100 ms
    # after they leave stage 0 and its gradients come back at least 100 ms later, so no
    # round can be shorter than 2 x 100 ms (a lower bound: sleeps are never cut short);
    # the losses do not change
    directory = _partition(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER.replace("bandwidth_mbps: 1000",
                                       "bandwidth_mbps: 1000\n  latency_ms: 100"))
    result = run(directory, emulate=cluster, steps=2, seed=5, lr=0.05)
    ref = reference_training(load_model_module(directory), 12, steps=2, seed=5, lr=0.05)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)
    # (the emulator dilates the latency by its slow-down factor, like every other time)
    assert min(result.round_times) >= 0.2 * result.slowdown_factor


def test_stage_weights_come_from_the_seeded_model(tmp_path: Path) -> None:
    directory = _partition(tmp_path)
    source = DirectorySource(str(directory))
    module = source.model_module()
    torch.manual_seed(3)
    full = module.build_model().state_dict()
    stage = source.load_stage(1)
    load_stage_weights(stage, full, 1)
    for name, value in stage.state_dict().items():
        assert torch.equal(value, full[name])
    with pytest.raises(RuntimeFailure, match="that build_model\\(\\) does not define"):
        load_stage_weights(stage, {}, 1)


NON_PERSISTENT = '''
import torch
from torch import nn

class Scaled(nn.Module):
    """A layer with a buffer its forward reads but state_dict() leaves out (as Llama's
    rotary inv_freq)."""
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 10), persistent=False)
    def forward(self, x):
        return x * self.scale

def build_model():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), Scaled(),
                         nn.Linear(10, 3))

def sample_batch(batch_size):
    return (torch.randn(batch_size, 6),), torch.randint(0, 3, (batch_size,))
'''


def test_a_stage_with_a_non_persistent_buffer_loads_it_from_the_model(tmp_path: Path) -> None:
    directory = _partition(tmp_path, text=NON_PERSISTENT)
    source = DirectorySource(str(directory))
    stage = source.load_stage(1)
    assert any(name.endswith("scale") for name in stage.state_dict())
    full = source.model_module().build_model()
    assert not any(name.endswith("scale") for name in full.state_dict())
    load_stage_weights(stage, model_state(full), 1)       # the buffer comes from the model
    for name, value in stage.state_dict().items():
        assert torch.equal(value, model_state(full)[name])
    with pytest.raises(RuntimeFailure, match="that build_model\\(\\) does not define"):
        load_stage_weights(stage, full.state_dict(), 1)


def test_a_prefixed_model_spec_trains_like_one_process(tmp_path: Path) -> None:
    # file.py:tiny names tiny_build_model, tiny_sample_batch: the devices call those (the
    # model has a non-persistent buffer in stage 1, which the stage loads from the model)
    text = NON_PERSISTENT.replace("def build_model", "def tiny_build_model").replace(
        "def sample_batch", "def tiny_sample_batch")
    directory = _partition(tmp_path, text=text, prefix="tiny_")
    functions = DirectorySource(str(directory)).model_module()
    assert callable(functions.build_model) and callable(functions.sample_batch)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    result = run(directory, emulate=cluster, steps=2, seed=5, lr=0.05)
    ref = reference_training(functions, 12, steps=2, seed=5, lr=0.05)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)


TIED = '''
import torch
from torch import nn

class TiedLM(nn.Module):
    """The output head is the token embedding (weight tying, as GPT-2's)."""
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 6)
        self.act = nn.Tanh()
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
    def forward(self, ids):
        return self.head(self.b(self.act(self.a(self.emb(ids)))))

def build_model():
    return TiedLM()

def sample_batch(batch_size):
    return (torch.randint(0, 11, (batch_size,)),), torch.randint(0, 11, (batch_size,))
'''


@pytest.mark.parametrize("stages", [
    # the embedding on one device, the head on a data-parallel group of two
    (Stage((0, 1), ("fast",), (6,)), Stage((2, 4), ("slow0", "slow1"), (2, 4))),
    # embedding and head three stages apart: the middle stage holds no copy
    (Stage((0, 0), ("slow0",), (6,)), Stage((1, 3), ("fast",), (6,)),
     Stage((4, 4), ("slow1",), (6,))),
], ids=["two-stages", "three-stages"])
def test_a_weight_tied_across_stages_trains_like_one_process(
        tmp_path: Path, stages: tuple[Stage, ...]) -> None:
    # each stage holds a copy of the tied weight; their gradients are summed over every
    # rank of the holding stages, so the copies stay equal and the losses are the
    # single-process model's (without the sum they part from step 1 on)
    directory = _partition(tmp_path, text=TIED, stages=stages)
    tied = DirectorySource(str(directory)).tied_parameters()
    assert set(tied) == {"emb.weight"}
    assert {s for s, _ in tied["emb.weight"]} == {0, len(stages) - 1}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    result = run(directory, emulate=cluster, steps=4, seed=5, lr=0.5)
    ref = reference_training(load_model_module(directory), 12, steps=4, seed=5, lr=0.5)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)
    assert len(set(ref.losses)) == 4



def test_a_tied_weight_trains_under_time_dilation(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # without cgroups the emulator wraps the source to carry each rank's dilation: the
    # wrapper still tells the devices which weights are tied
    import runtime.emulator

    monkeypatch.setattr(runtime.emulator, "cgroup_available", lambda: False)
    directory = _partition(tmp_path, text=TIED)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    result = run(directory, emulate=cluster, steps=3, seed=5, lr=0.5)
    assert result.shaping == "dilation"
    ref = reference_training(load_model_module(directory), 12, steps=3, seed=5, lr=0.5)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6)


def test_run_needs_a_partition_and_a_launcher(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeFailure, match="is not a partition directory"):
        run(tmp_path / "nope")
    directory = _partition(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeFailure, match="pass --emulate cluster.yaml"):
        run(directory)
    with pytest.raises(RuntimeFailure, match="steps must be an integer >= 1, got 0"):
        run(directory, emulate=tmp_path / "c.yaml", steps=0)
    for lr in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeFailure, match=f"--lr must be a learning rate >= 0, got "
                                                 f"{lr}"):
            run(directory, emulate=tmp_path / "c.yaml", steps=2, lr=lr)
        with pytest.raises(RuntimeFailure, match="--lr must be"):
            run(directory, emulate=tmp_path / "c.yaml", steps=2, lr=lr, fail="a@1")


def test_a_torchrun_worker_ends_without_the_interpreters_teardown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.launch.end_process: under torchrun, os._exit after flushing (the exit code
    and everything printed arrive; atexit handlers, part of the teardown, do not run);
    elsewhere a plain SystemExit."""
    import subprocess
    import sys

    from runtime.launch import end_process

    script = ("import atexit, sys\n"
              "from runtime.launch import end_process\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              "print('trained', end='')\n"
              "end_process(3)\n")
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 3 and done.stdout == "trained", done.stderr
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as exited:
        end_process(2)
    assert exited.value.code == 2


def _group_alive(pgid: int) -> list[int]:
    """The processes still in process group ``pgid`` (zombies excluded)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_stopped_launcher_leaves_no_device_process(tmp_path: Path, signal_name: str) -> None:
    """SIGTERM stops ``asteroid-fx run`` as Ctrl-C does (one line, exit 143, the device
    processes ended, the metrics moved into place); after SIGKILL the device processes and
    the forkserver end by themselves ([Note: orphaned workers] in runtime.worker). Both
    left three workers training for minutes under PID 1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux's /proc")
    directory = _partition(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    metrics = tmp_path / "m.jsonl"
    partial = tmp_path / ".m.jsonl.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from asteroid_fx.cli import entry; entry()", "run",
         str(directory), "--emulate", str(cluster), "--steps", "100000", "--metrics",
         str(metrics)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.stat().st_size > 0):   # (training runs)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.2)
        assert len(_group_alive(proc.pid)) >= 4     # launcher, forkserver, three devices
        proc.send_signal(getattr(signal, signal_name))
        _, err = proc.communicate(timeout=60)
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_alive(proc.pid) == []
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    if signal_name == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM
        assert err.strip().splitlines()[-1] == "stopped by SIGTERM"
        assert metrics.stat().st_size > 0 and not partial.exists()


def test_metrics_that_name_an_input_of_the_run_are_refused(tmp_path: Path) -> None:
    """``--metrics DIR/plan.json`` ran, then the next run found no plan."""
    from contracts.errors import OutputError

    directory = _partition(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    plan_text = (directory / "plan.json").read_text()
    for target in (directory / "plan.json", cluster):
        with pytest.raises(OutputError, match=r"--metrics .* is .*, an input of this run; "
                                              r"give a new \.jsonl file"):
            run(directory, emulate=cluster, steps=1, metrics=target)
    assert (directory / "plan.json").read_text() == plan_text
    assert cluster.read_text() == CLUSTER


def test_emulating_another_cluster_than_the_plans_is_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run on a cluster the plan was not made for reported the other cluster's predicted
    round beside its own measurement, silently."""
    import logging

    import yaml

    from contracts.cluster import Cluster

    directory = _partition(tmp_path)     # (its plan's cluster hash is "c")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    with caplog.at_level(logging.WARNING, logger="runtime.launch"):
        run(directory, emulate=cluster, steps=1)
    assert "the plan was made for another cluster (hash c)" in caplog.text
    same = Cluster.from_dict(yaml.safe_load(CLUSTER)).cluster_hash
    plan = Plan.load(directory / "plan.json")
    assert plan.cluster_hash == "c" and same != "c"


def test_run_on_a_fine_tuning_directory_points_at_finetune(tmp_path: Path) -> None:
    """It said "not a partition directory (no plan.json); create it with `asteroid-fx
    partition`" of a directory `finetune` had just written."""
    (tmp_path / "pac_plan.json").write_text("{}")
    with pytest.raises(RuntimeFailure, match=r"is a fine-tuning directory \(pac_plan.json\), "
                                              r"not a partition: it runs with `asteroid-fx "
                                              r"finetune .*backbone"):
        run(tmp_path)
