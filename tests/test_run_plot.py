"""Tests of asteroid_fx.run_plot: reading metrics.jsonl and plotting it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asteroid_fx.cli import main
from asteroid_fx.run_plot import plot_metrics, read_metrics
from contracts.errors import RuntimeFailure


def _metrics(path: Path) -> Path:
    rows = [{"step": s, "loss": 1.0, "round_time_s": 0.1 + 0.01 * s, "plan_version": 0,
             "predicted_round_time_s": 0.1, "prediction": "emulated"} for s in range(4)]
    rows.append({"event": "recovery", "failed": ["b"], "mode": "replay", "resume_step": 3})
    rows += [{"step": s, "loss": 1.0, "round_time_s": 0.2, "plan_version": 1,
              "predicted_round_time_s": 0.18, "prediction": "calibrated"} for s in range(3, 6)]
    rows.append({"event": "summary", "round_time_s": 0.15})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_read_metrics_splits_steps_and_events(tmp_path: Path) -> None:
    got = read_metrics(_metrics(tmp_path / "m.jsonl"))
    assert [r["step"] for r in got.steps] == [0, 1, 2, 3, 3, 4, 5]
    assert got.recoveries[0]["failed"] == ["b"]
    assert got.summary is not None and got.summary["round_time_s"] == 0.15


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.png"
    assert main(["plot", str(_metrics(tmp_path / "m.jsonl")), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(tmp_path / "m.jsonl", tmp_path / "again.png").stat().st_size > 1000


@pytest.mark.parametrize("content, match", [
    ("not json\n", "line 1 is not a metrics record"),
    ('{"a": 1}\n', "line 1 is not a metrics record"),
    ('{"event": "summary"}\n', "has no step rows"),
])
def test_not_metrics_is_refused_in_one_line(tmp_path: Path, content: str, match: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(RuntimeFailure, match=match):
        read_metrics(bad)
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(RuntimeFailure, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("row", [{"step": "x", "round_time_s": 0.1},
                                 {"step": 1.5, "round_time_s": 0.1},
                                 {"step": 1, "round_time_s": "slow"},
                                 {"step": 1, "round_time_s": 0.1, "predicted_round_time_s": []}])
def test_a_step_row_of_other_types_is_refused_with_its_line(tmp_path: Path,
                                                            row: dict[str, object]) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 0, "round_time_s": 0.1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RuntimeFailure, match="line 2: step .* must be numbers"):
        read_metrics(path)


def test_a_directory_is_not_called_missing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="is a directory, not a file"):
        read_metrics(tmp_path)
