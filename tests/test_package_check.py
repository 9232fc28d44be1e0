"""Tests of runtime.package_check: plan.json, stage files and model checked before a run."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
from partition_cases import EXAMPLES, example_spec, hand_plan

from asteroid_fx.package import save_partition
from asteroid_fx.partition import partition
from contracts.errors import PartitionError
from contracts.plan import Plan
from runtime.package_check import check_package, file_digest

CLUSTER = EXAMPLES / "clusters" / "local3.yaml"


def _package(out: Path, lasts: list[int], batch: int = 4) -> Path:
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(batch)
    plan = hand_plan(7, lasts, micro_batch=batch)
    plan = replace(plan, stages=tuple(replace(s, devices=(d,)) for s, d in
                                      zip(plan.stages, ("fast", "slow0", "slow1"), strict=False)))
    save_partition(out, plan, partition(model, inputs, plan),
                   model_spec=str(EXAMPLES / "mlp.py"), onnx=False)
    return out


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("packages")
    return _package(root / "a", [3]), _package(root / "b", [1])


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_package_records_the_digest_of_every_file_the_runtime_reads(
        packages: tuple[Path, Path]) -> None:
    out, _ = packages
    files = json.loads((out / "partition.json").read_text())["files"]
    assert sorted(files) == ["model.py", "plan.json", "stage_0.py", "stage_0.weights.pt",
                             "stage_1.py", "stage_1.weights.pt"]
    assert all(files[n] == file_digest(out / n) for n in files)
    assert check_package(out) == Plan.load(out / "plan.json")


def test_a_plan_of_another_partition_is_named_with_the_fix(
        packages: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = packages
    mixed = _copy(a, tmp_path / "mixed")
    (mixed / "plan.json").write_text((b / "plan.json").read_text())
    with pytest.raises(PartitionError, match=r"plan.json of .* puts layers \[0, 1\] in stage 0 "
                                             r"but stage_0.py holds layers \[0, 3\]; copy the "
                                             r"whole partition directory again, or re-run "
                                             r"`asteroid-fx partition`"):
        check_package(mixed)
    # the same cuts, another batch size: caught by the digest of plan.json
    plan = Plan.load(a / "plan.json")
    (mixed / "plan.json").write_text(replace(plan, batch_size=8, micro_batch_size=4,
                                             num_micro_batches=2,
                                             stages=tuple(replace(s, shares=(4,))
                                                          for s in plan.stages)).to_json())
    with pytest.raises(PartitionError, match=r"plan.json' is not the file this package was "
                                             r"written with \(SHA-256"):
        check_package(mixed)


def test_a_plan_for_another_model_is_refused(packages: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    pkg = _copy(packages[0], tmp_path / "pkg")
    meta = json.loads((pkg / "partition.json").read_text())
    (pkg / "partition.json").write_text(json.dumps({**meta, "model_hash": "feedbeef"}))
    plan = Plan.load(pkg / "plan.json")
    (pkg / "plan.json").write_text(replace(plan, model_hash="0123abcd").to_json())
    with pytest.raises(PartitionError, match="was made for model 0123abcd but the stage files "
                                             "for model feedbeef"):
        check_package(pkg)


@pytest.mark.parametrize(("name", "change", "message"), [
    ("stage_1.weights.pt", "delete", r"stage_1.weights.pt' is missing; copy the whole"),
    ("stage_0.py", "delete", r"stage_0.py' is missing"),
    ("model.py", "append", r"model.py' is not the file this package was written with"),
    ("stage_1.weights.pt", "append", r"stage_1.weights.pt' is not the file this package"),
])
def test_a_missing_or_changed_file_is_named(packages: tuple[Path, Path], tmp_path: Path,
                                            name: str, change: str, message: str) -> None:
    pkg = _copy(packages[0], tmp_path / "pkg")
    if change == "delete":
        (pkg / name).unlink()
    else:
        (pkg / name).write_bytes((pkg / name).read_bytes() + b"\n# changed\n")
    with pytest.raises(PartitionError, match=message):
        check_package(pkg)


def test_a_package_without_digests_is_checked_for_the_rest(
        packages: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pkg = _copy(packages[0], tmp_path / "pkg")
    meta = json.loads((pkg / "partition.json").read_text())
    del meta["files"]
    (pkg / "partition.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="runtime.package_check"):
        check_package(pkg)
    assert "records no file digests" in caplog.text
    (pkg / "stage_1.py").unlink()
    with pytest.raises(PartitionError, match="stage_1.py' is missing"):
        check_package(pkg)


def test_run_refuses_a_mixed_package_before_starting_anything(
        packages: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from asteroid_fx.cli import main

    a, b = packages
    mixed = _copy(a, tmp_path / "mixed")
    (mixed / "stage_1.weights.pt").write_bytes((b / "stage_1.weights.pt").read_bytes())
    began = time.monotonic()
    assert main(["run", str(mixed), "--emulate", str(CLUSTER), "--steps", "1"]) == 1
    assert time.monotonic() - began < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage_1.weights.pt' is not the file this package" in err
    assert not (mixed / "recovery").exists()
