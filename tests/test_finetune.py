"""`asteroid-fx finetune`: the PAC directory, the plan report, one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asteroid_fx.cli import main
from asteroid_fx.costs import analytic_costs
from asteroid_fx.finetune import pac_model_of, prepare_finetune, reference_finetune
from asteroid_fx.model_spec import load_model_spec
from contracts.cluster import Cluster
from contracts.pac_plan import PacPlan
from runtime.pac_train import ADAPTERS_FILE, LAYOUT_FILE, PAC_PLAN_FILE, PacSource

ROOT = Path(__file__).resolve().parents[1]
GPT = str(ROOT / "examples" / "gpt_small.py")
LOCAL3 = str(ROOT / "examples" / "clusters" / "local3.yaml")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_plans_and_writes_the_pac_directory(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pac"
    assert main(["finetune", GPT, "--cluster", LOCAL3, "--batch-size", "8", "--epochs", "2",
                 "--samples", "16", "--costs", "analytic", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "taps at layers [9, 17, 25, 33]" in text and "phase 2 (data parallel" in text
    for name in (PAC_PLAN_FILE, LAYOUT_FILE, ADAPTERS_FILE, "backbone/plan.json"):
        assert (out / name).is_file()
    source = PacSource(str(out))
    plan = source.pac_plan()
    assert plan.steps_per_epoch == 2 and sum(plan.shares) == 8
    assert set(source.adapter_weights()) == {f"adapters.{i}.{p}" for i in range(4)
                                             for p in ("gate", "down.weight", "down.bias",
                                                       "up.weight", "up.bias")}
    assert json.loads((out / LAYOUT_FILE).read_text())["rank"] == 8
    # the report explains the phase-1 choice and lists the candidates it chose from
    assert "phase-1 choice (memory objective):" in text
    assert plan.meta["phase1_choice"]["objective"] == "memory"
    # and where the cache lives
    assert plan.meta["cache_choice"]["mode"] == "auto"
    # by default on disk: the nominal reads and writes cost less than the 5 % allowed
    # ([Note: choosing the store])
    assert plan.cache_store == "disk"
    assert "cache: disk: every device keeps" in text
    assert "cache store: disk: peak memory pressure " in text


def test_simulate_a_finetune_directory(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pac"
    assert main(["finetune", GPT, "--cluster", LOCAL3, "--batch-size", "8", "--epochs", "3",
                 "--samples", "16", "--costs", "analytic", "--out", str(out)]) == 0
    capsys.readouterr()
    for target in (out, out / PAC_PLAN_FILE):
        assert main(["simulate", str(target)]) == 0
        text = capsys.readouterr().out
        assert "simulated PAC: phase-1 step" in text and "3 epochs" in text
    # a plan.json's options were ignored here (no Gantt written, any micro-batch taken)
    assert main(["simulate", str(out), "--gantt", str(tmp_path / "g.png"), "--rounds", "0"]) == 1
    assert "--gantt, --rounds apply to a plan.json, not to a PAC plan" in _one_error_line(
        capsys.readouterr().err)
    (out / "cluster.json").unlink()
    assert main(["simulate", str(out)]) == 1
    assert "simulate needs the cluster" in _one_error_line(capsys.readouterr().err)
    assert main(["simulate", str(out), "--cluster", LOCAL3]) == 0


def test_phase1_objective_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from solver.pac import DEFAULT_PHASE1_SLACK

    out = tmp_path / "pac"
    assert main(["finetune", GPT, "--cluster", LOCAL3, "--batch-size", "8", "--epochs", "1",
                 "--samples", "8", "--costs", "analytic", "--out", str(out),
                 "--phase1-objective", "time"]) == 0
    assert "phase-1 choice (time objective)" in capsys.readouterr().out
    choice = PacSource(str(out)).pac_plan().meta["phase1_choice"]
    assert len(choice["candidates"]) == 1
    code = main(["finetune", GPT, "--cluster", LOCAL3, "--batch-size", "8", "--samples", "8",
                 "--costs", "analytic", "--out", str(out), "--phase1-slack", "-1"])
    assert code == 1
    assert "phase-1 slack must be >= 0" in _one_error_line(capsys.readouterr().err)
    import inspect

    from asteroid_fx.cli import finetune
    default = inspect.signature(finetune).parameters["phase1_slack"].default
    assert default == DEFAULT_PHASE1_SLACK


def test_full_fine_tuning_batches_are_the_pac_samples() -> None:
    from runtime.samples import SampleSource
    from runtime.train import TrainConfig, _batch

    spec = load_model_spec(GPT)
    samples = SampleSource(spec, 3, 24)
    config = TrainConfig(seed=3, num_samples=24)
    for step in (0, 2, 5):           # 3 steps per epoch: step 5 is mini-batch 2 again
        inputs, targets = _batch(spec, 8, config, step, samples)
        want = samples.rows((step % 3) * 8, (step % 3 + 1) * 8)
        assert torch.equal(inputs[0], want[0][0]) and torch.equal(targets, want[1])
    torch.manual_seed(3 + 1 + 4)    # without samples: the reproducible-run contract
    want_inputs, _ = spec.sample_batch(8)
    got, _ = _batch(spec, 8, TrainConfig(seed=3), 4, None)
    assert torch.equal(got[0], want_inputs[0])


def test_full_run_with_samples_refuses_failures(tmp_path: Path) -> None:
    from asteroid_fx.errors import RuntimeFailure
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from runtime.launch import run
    from solver.api import plan as plan_fn

    spec = load_model_spec(GPT)
    module = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    cluster = Cluster.from_yaml(LOCAL3)
    costs = analytic_costs(module, inputs)
    made = plan_fn(costs, cluster, 8)
    save_partition(tmp_path / "full", made, partition(module, inputs, made), model_spec=spec,
                   onnx=False, example_inputs=inputs, costs=costs, cluster=cluster)
    with pytest.raises(RuntimeFailure, match="num_samples"):
        run(tmp_path / "full", emulate=LOCAL3, steps=2, num_samples=16, fail="fast@1")


def test_pac_model_of_counts_adapters() -> None:
    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    from asteroid_fx.adapters import parallel_adapters

    pac = parallel_adapters(spec.build_model(), spec.sample_batch(2)[0], rank=8)
    model = pac_model_of(pac)
    assert model.taps == pac.taps
    assert model.entry_bytes == 4 * 64 * 256 * 4
    assert model.trainable_bytes == 4 * 4 * (256 * 8 + 8 + 8 * 256 + 256 + 1)


def test_measured_step_fit_feeds_the_prediction() -> None:
    from dataclasses import replace

    from asteroid_fx.adapters import parallel_adapters
    from asteroid_fx.finetune import measure_step
    from solver.pac import plan_finetune

    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    model = spec.build_model()
    pac = parallel_adapters(model, spec.sample_batch(2)[0], rank=8)
    before = pac.trainable_state()
    intercept, per_sample = measure_step(pac, spec, batch_sizes=(1, 8), repeats=2)
    assert per_sample >= 0 and intercept >= 0 and intercept + 8 * per_sample > 0
    for name, value in pac.trainable_state().items():
        torch.testing.assert_close(value, before[name])      # weights left unchanged
    costs = analytic_costs(model, spec.sample_batch(2)[0])
    cluster = Cluster.from_yaml(LOCAL3)
    base = pac_model_of(pac)
    slow = replace(base, step_fit=(0.0, 1.0))                # one second per sample
    plan = plan_finetune(costs, cluster, slow, batch_size=8, num_samples=8, epochs=2)
    assert plan.predicted is not None
    assert plan.predicted.phase2_step_s == pytest.approx(
        max(n / s for n, s in zip(plan.shares, (1.0, 0.5, 0.5), strict=True))
        + plan.predicted.allreduce_s)
    # the runtime's own cost of a round comes on top, at the device's speed; its per-call
    # costs do not: the fit times the calls after a wait, as the runtime makes them
    from contracts.table import RuntimeOverhead
    from solver.pac import predict_finetune

    costly = replace(costs, runtime_overhead=RuntimeOverhead(0.01, 0.02, 0.03))
    again = predict_finetune(plan, costly, cluster)
    assert again.phase2_step_s == pytest.approx(
        max((n + 0.03) / s for n, s in zip(plan.shares, (1.0, 0.5, 0.5), strict=True))
        + plan.predicted.allreduce_s)


def test_measured_step_memory_feeds_the_memory_prediction() -> None:
    from dataclasses import replace

    from asteroid_fx.adapters import parallel_adapters
    from asteroid_fx.finetune import measure_step_memory
    from contracts.pac_plan import PacModel
    from solver.pac import plan_finetune

    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    model = spec.build_model()
    pac = parallel_adapters(model, spec.sample_batch(2)[0], rank=8)
    per_sample = measure_step_memory(pac, spec, batch_size=4)
    # the side path saves more than the head's activations the cost table knows of, and
    # what it saves grows with the samples
    costs = analytic_costs(model, spec.sample_batch(2)[0])
    head = sum(lc.activation_bytes for lc in costs.layers[pac.taps[-1] + 1:])
    assert per_sample > head > 0
    assert abs(measure_step_memory(pac, spec, batch_size=2) - per_sample) <= per_sample // 10
    base = pac_model_of(pac)
    measured = replace(base, step_saved_bytes=per_sample)
    assert PacModel.from_dict(measured.to_dict()) == measured
    assert PacModel.from_dict({k: v for k, v in base.to_dict().items()
                               if k != "step_saved_bytes"}).step_saved_bytes == 0
    cluster = Cluster.from_yaml(LOCAL3)
    # a batch of 32: phase 2's step, not phase 1, is part of every device's peak
    plans = [plan_finetune(costs, cluster, m, batch_size=32, num_samples=32, epochs=2,
                           cache="local") for m in (base, measured)]
    peaks = [p.predicted.peak_memory_bytes for p in plans if p.predicted is not None]
    assert plans[0].shares == plans[1].shares
    grew = [peaks[1][d] - peaks[0][d] for d in plans[0].devices]
    assert min(grew) > 0
    assert all(g <= share * (per_sample - head)
               for g, share in zip(grew, plans[0].shares, strict=True))


def test_cold_segments_are_measured_per_segment() -> None:
    from asteroid_fx.adapters import parallel_adapters
    from asteroid_fx.finetune import measure_cold_segments

    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    model = spec.build_model()
    pac = parallel_adapters(model, spec.sample_batch(2)[0], rank=2)
    cold = measure_cold_segments(pac, spec, repeats=2, rounds=1)
    assert len(cold) == len(pac.segments) and all(v >= 0.0 for v in cold)


def test_cold_extras_only_where_the_weights_leave_the_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from asteroid_fx import finetune
    from asteroid_fx.adapters import parallel_adapters

    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    pac = parallel_adapters(spec.build_model(), spec.sample_batch(2)[0], rank=2)
    held = sum(t.numel() * t.element_size() for seg in pac.segments
               for t in [*seg.parameters(), *seg.buffers()])
    # three devices' copies within a quarter of the cache: warm; one byte less: cold
    assert finetune.weights_stay_cached(pac, 3, cache_bytes=12 * held)
    assert not finetune.weights_stay_cached(pac, 3, cache_bytes=12 * held - 1)
    assert not finetune.weights_stay_cached(pac, 4, cache_bytes=12 * held)
    # where they stay, prepare_finetune measures no extras; else it does
    monkeypatch.setattr(finetune, "weights_stay_cached", lambda *a, **k: True)
    assert finetune._cold_segments(pac, spec, 3) == ()
    monkeypatch.setattr(finetune, "weights_stay_cached", lambda *a, **k: False)
    monkeypatch.setattr(finetune, "measure_cold_segments", lambda *a, **k: (0.1,) * 4)
    assert finetune._cold_segments(pac, spec, 3) == (0.1,) * 4


def test_disk_costs_are_measured_per_byte_each_read_after_a_pause(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from asteroid_fx import finetune
    from asteroid_fx.adapters import parallel_adapters

    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    pac = parallel_adapters(spec.build_model(), spec.sample_batch(2)[0], rank=2,
                            cache_dtype="bfloat16")
    pauses: list[float] = []
    monkeypatch.setattr(finetune, "_wait", pauses.append)
    write, read = finetune.measure_disk(pac, spec, rows=4, repeats=3, pause_s=0.002,
                                        directory=str(tmp_path))
    assert write > 0 and read > 0
    assert pauses == [0.002] * (3 + 1)
    # a byte of a cache row costs less than a microsecond to copy on any host we know
    assert write < 1e-6 and read < 1e-6
    assert list(tmp_path.iterdir()) == []          # the file is gone with its store


def test_paired_extra_keeps_the_hosts_drift_out() -> None:
    from asteroid_fx.finetune import paired_extra

    # a host that slows down run by run: each cold run comes one tick after its warm one
    clock = iter(range(100))
    assert paired_extra(lambda: 1.0 + next(clock), lambda: 1.2 + next(clock),
                        9) == pytest.approx(1.2)
    # a busy moment (3.0) or a quick one (0.5) in one pair moves the median only a little
    ticks = iter([1.0, 3.0, 1.0, 1.5, 1.0, 1.4, 1.0, 0.5, 1.0, 1.3])
    assert paired_extra(lambda: next(ticks), lambda: next(ticks), 5) == pytest.approx(0.4)
    warm_only = iter([1.0, 0.8] * 3)
    assert paired_extra(lambda: next(warm_only), lambda: next(warm_only), 3) == 0.0


def test_measured_step_runs_the_runs_optimizer_on_cached_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from asteroid_fx import finetune
    from asteroid_fx.adapters import parallel_adapters
    from asteroid_fx.finetune import measure_step

    spec = load_model_spec(GPT)
    torch.manual_seed(0)
    model = spec.build_model()
    pac = parallel_adapters(model, spec.sample_batch(2)[0], rank=2)
    steps: list[int] = []

    def build_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        opt.register_step_post_hook(lambda *_: steps.append(1))
        return opt

    before = pac.trainable_state()
    measure_step(pac, replace(spec, build_optimizer=build_optimizer), batch_sizes=(1, 2),
                 repeats=2, rounds=2)
    # the model file's optimizer, every run: 2 rounds x 2 sizes x (a warm-up + 2 timed)
    assert len(steps) == 2 * 2 * (2 + 1)
    # each run after a pause, as a device's step after its all-reduce wait
    pauses: list[float] = []
    monkeypatch.setattr(finetune, "_wait", pauses.append)
    measure_step(pac, spec, batch_sizes=(1, 2), repeats=2, rounds=2, pause_s=0.004)
    assert pauses == [0.004] * (2 * 2 * (2 + 1))
    pauses.clear()
    measure_step(pac, spec, batch_sizes=(1,), repeats=2, rounds=1, pause_s=0.0)
    assert pauses == []
    for name, value in pac.trainable_state().items():
        torch.testing.assert_close(value, before[name])      # weights left unchanged


def test_reference_trains(tmp_path: Path) -> None:
    spec = load_model_spec(GPT)
    losses = reference_finetune(spec, batch_size=4, epochs=2, num_samples=8, rank=4, lr=0.5)
    assert len(losses) == 4
    assert losses[2] < losses[0] and losses[3] < losses[1]   # same batches, lower loss


NO_LEN = '''"""A model whose dataset has no length."""
import torch
from torch import nn


class Stream:
    def __getitem__(self, i):
        return (torch.zeros(4),), 0


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def build_model():
    return M()


def sample_batch(n):
    return (torch.randn(n, 4),), torch.randint(0, 2, (n,))


def dataset():
    return Stream()
'''

TINY_MEMORY = """devices:
  - {name: a, type: local, speed: 1.0, memory_gb: 0.03}
  - {name: b, type: local, speed: 0.5, memory_gb: 0.03}
network:
  bandwidth_mbps: 100
"""


@pytest.mark.parametrize("extra, words", [
    (["--rank", "0"], "AdapterError: adapter rank must be an integer >= 1, got 0"),
    (["--method", "lora"], "--method must be pac or full"),
    (["--tap", "nope"], "no layer or module named 'nope'"),
    (["--cache", "disk"], "cache placement must be one of ['auto', 'local'], got 'disk'"),
    (["--cache-slack", "-1"], "cache slack must be >= 0"),
    (["--cache-dtype", "int8"], "unknown cache dtype 'int8'; choose one of float32"),
    (["--method", "full", "--cache-dtype", "bfloat16"],
     "--cache-dtype bfloat16 applies to --method pac only"),
    (["--cache-store", "flash"], "cache store must be one of ['auto', 'memory', 'disk'], got "
                                 "'flash'"),
    (["--method", "full", "--cache-store", "disk"],
     "--cache-store and --store-slack apply to --method pac only"),
    (["--store-slack", "-0.5"], "store slack must be >= 0 (a fraction of the predicted total), "
                                "got -0.5"),
    # options that did nothing where they were given
    (["--method", "full", "--rank", "4"], "--rank, --tap and --train-head shape the adapters"),
    (["--lr", "nan"], "--lr must be a learning rate >= 0, got nan"),
    (["--fail", "slow0@1"], "--fail and --metrics apply to a run: add --emulate"),
    (["--emulate", LOCAL3, "--fail", "ghost@1"], "device 'ghost' is not in the cluster"),
])
def test_bad_options_are_one_line(extra: list[str], words: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", GPT, "--cluster", LOCAL3, "--batch-size", "8", "--samples", "16",
                 "--costs", "analytic", "--out", str(tmp_path / "o"), *extra])
    assert code == 1
    assert words in _one_error_line(capsys.readouterr().err)


def test_full_method_partitions_the_whole_model(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # `--method full` without --emulate: the plan and the stage package of the whole model,
    # on the trace its costs were made on (one trace, not two)
    import importlib

    from contracts.plan import Plan

    trace_module = importlib.import_module("asteroid_fx.trace")
    real, calls = trace_module.trace, []
    monkeypatch.setattr(trace_module, "trace",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "full"
    assert main(["finetune", str(ROOT / "examples" / "mlp.py"), "--method", "full",
                 "--cluster", LOCAL3, "--batch-size", "8", "--samples", "32", "--epochs", "2",
                 "--costs", "analytic", "--out", str(out)]) == 0
    assert f"wrote {out}/ (8 steps)" in capsys.readouterr().out
    plan = Plan.load(out / "plan.json")
    assert plan.batch_size == 8 and plan.stages[0].first == 0
    assert plan.stages[-1].last == plan.num_layers - 1
    assert sorted(p.name for p in out.glob("stage_*.py")) == [
        f"stage_{i}.py" for i in range(len(plan.stages))]
    assert len(calls) == 1


def test_nothing_to_tap_and_dataset_without_len(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--cluster", LOCAL3, "--batch-size", "4", "--costs", "analytic", "--out",
            str(tmp_path / "o")]
    assert main(["finetune", str(ROOT / "examples" / "mlp.py"), "--samples", "8", *base]) == 1
    assert "AdapterError" in _one_error_line(capsys.readouterr().err)
    model = tmp_path / "nolen.py"
    model.write_text(NO_LEN)
    assert main(["finetune", str(model), *base]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "DatasetError" in line and "without __len__" in line


def test_cache_that_fits_nowhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = tmp_path / "tiny.yaml"
    cluster.write_text(TINY_MEMORY)
    assert main(["finetune", GPT, "--cluster", str(cluster), "--batch-size", "8",
                 "--samples", "800", "--costs", "analytic", "--out", str(tmp_path / "o"),
                 "--cache-store", "memory"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "PlanError: the activation cache does not fit: device" in line
    assert "bytes short" in line
    assert line.endswith("or --cache-dtype bfloat16 (half the bytes)")
    # with the cache already in bfloat16 the hint is not repeated
    assert main(["finetune", GPT, "--cluster", str(cluster), "--batch-size", "8",
                 "--samples", "1600", "--costs", "analytic", "--out", str(tmp_path / "o"),
                 "--cache-dtype", "bfloat16", "--cache-store", "memory"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "bytes short" in line and line.endswith("devices with more memory or --cache-store "
                                                   "disk")
    # by default (--cache-store auto) such a cache goes to disk, and the report says why
    assert main(["finetune", GPT, "--cluster", str(cluster), "--batch-size", "8",
                 "--samples", "800", "--costs", "analytic", "--out", str(tmp_path / "d")]) == 0
    report = capsys.readouterr().out
    assert "cache store: disk: the cache does not fit in memory (the activation cache does " \
        "not fit" in report
    plan = PacPlan.load(tmp_path / "d" / PAC_PLAN_FILE)
    assert plan.cache_store == "disk" and plan.predicted is not None
    cluster_obj = Cluster.from_yaml(cluster)
    assert all(peak <= cluster_obj.device(d).memory_bytes
               for d, peak in plan.predicted.peak_memory_bytes.items())


def test_prepare_refuses_a_cache_too_big_for_the_cluster(tmp_path: Path) -> None:
    from asteroid_fx.errors import PlanError

    cluster_file = tmp_path / "tiny.yaml"
    cluster_file.write_text(TINY_MEMORY)
    spec = load_model_spec(GPT)
    costs = analytic_costs(spec.build_model(), spec.sample_batch(2)[0])
    with pytest.raises(PlanError, match="bytes short"):
        prepare_finetune(spec, Cluster.from_yaml(cluster_file), costs, tmp_path / "o",
                         batch_size=8, epochs=1, num_samples=800, cache_store="memory")


def test_a_fail_the_plan_cannot_take_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """``finetune --out DIR --fail slow0@99`` replaced DIR's PAC plan, then failed."""
    from contracts.errors import RuntimeFailure

    spec = load_model_spec(GPT)
    costs = analytic_costs(spec.build_model(), spec.sample_batch(2)[0])
    cluster = Cluster.from_yaml(ROOT / "examples" / "clusters" / "local3.yaml")
    for fail, match in (("slow0@99", r"the run has steps 0\.\.\d+"),
                        ("fast@1,slow0@2", "PAC recovers one lost device per run")):
        with pytest.raises(RuntimeFailure, match=match):
            prepare_finetune(spec, cluster, costs, tmp_path / "o", batch_size=6, epochs=1,
                             num_samples=24, fail=fail)
    assert not (tmp_path / "o").exists()


def test_finetune_refuses_to_write_into_a_partition_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It replaced the partition's costs.json; that partition's next recovery then failed
    with "the plan is for a model of 36 layers but MLP traces to 7 layers"."""
    out = tmp_path / "part"
    out.mkdir()
    (out / "partition.json").write_text("{}")
    (out / "costs.json").write_text("the partition's")
    assert main(["finetune", GPT, "--cluster", LOCAL3, "--batch-size", "6", "--epochs", "1",
                 "--samples", "24", "--costs", "analytic", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds files and is not a fine-tuning directory (costs.json, partition.json)" in err
    assert (out / "costs.json").read_text() == "the partition's"
