"""Tests of asteroid_fx.cost_source: --costs FILE | measure | analytic, and the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from asteroid_fx.cost_source import default_batch_sizes, measures_by_default, resolve_costs
from asteroid_fx.model_spec import load_model_spec
from contracts.cluster import Cluster
from contracts.errors import CostModelError

ROOT = Path(__file__).resolve().parents[1]
LOCAL = Cluster.from_yaml(ROOT / "examples/clusters/local3.yaml")
BOARDS = Cluster.from_yaml(ROOT / "examples/clusters/C-1000mbps.yaml")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ASTEROID_FX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _resolve(choice: str | None, cluster: Cluster = LOCAL, model: str = "examples/mlp.py"):
    spec = load_model_spec(str(ROOT / model))
    inputs, _ = spec.sample_batch(2)
    return resolve_costs(spec, spec.build_model(), inputs, cluster, choice,
                         batch_sizes=(1, 2))


def test_default_measures_local_clusters_and_caches(cache: Path) -> None:
    first = _resolve(None)
    assert first.how == "measured" and first.table.source == "measured"
    assert first.table.batch_sizes == (1, 2)
    assert len(list((cache / "costs").glob("*.json"))) == 1
    again = _resolve("auto")
    assert again.how == "cached" and again.table == first.table


def test_default_is_analytic_for_boards_and_reproducible(cache: Path) -> None:
    first = _resolve(None, BOARDS)
    assert first.how == "analytic" and first.table.source == "analytic"
    assert "no local device" in first.detail
    # the host speed is measured once and cached: the same command plans the same way
    assert _resolve(None, BOARDS).table == first.table


def test_explicit_words_and_files(cache: Path, tmp_path: Path) -> None:
    assert _resolve("analytic").table.source == "analytic"
    measured = _resolve("measure", BOARDS)
    assert measured.table.source == "measured"
    measured.table.save(tmp_path / "costs.json")
    from_file = _resolve(str(tmp_path / "costs.json"))
    assert from_file.how == "file" and from_file.table == measured.table
    # every choice hands on the trace it made or checked the table on (partition reuses it)
    for choice in (measured, from_file, _resolve("analytic"), _resolve("measure", BOARDS)):
        assert choice.graph is not None
        assert choice.graph.model_hash == choice.table.model_hash
        assert choice.graph.num_layers == choice.table.num_layers
    with pytest.raises(CostModelError, match="neither a file nor one of auto, measure"):
        _resolve(str(tmp_path / "missing.json"))


def test_a_table_measured_by_other_profiler_code_is_measured_again(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asteroid_fx import cost_source

    assert _resolve(None).how == "measured"
    assert _resolve(None).how == "cached"
    # an edited profiler (same PROFILER_KEY): its sources' digest differs
    monkeypatch.setattr(cost_source, "code_digest", lambda *names: "edited")
    assert _resolve(None).how == "measured"
    assert len(list((cache / "costs").glob("*.json"))) == 2


def test_code_digest_follows_the_sources(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from asteroid_fx.cost_source import code_digest

    package = tmp_path / "afx_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "timing.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_digest("afx_probe_pkg")
    assert code_digest("afx_probe_pkg") == before
    (package / "timing.py").write_text("A = 2\n")
    assert code_digest("afx_probe_pkg") != before
    assert code_digest("no_such_package_here") == code_digest("no_such_package_here")


def test_unreadable_cache_is_measured_again(cache: Path) -> None:
    _resolve("measure")
    (path,) = (cache / "costs").glob("*.json")
    path.write_text("{not json")
    assert _resolve("measure").how == "measured"


def test_optimizer_state_comes_from_the_model_file(cache: Path, tmp_path: Path) -> None:
    model = tmp_path / "adam_mlp.py"
    model.write_text((ROOT / "examples/mlp.py").read_text() + (
        "\n\ndef build_optimizer(params):\n    return torch.optim.Adam(params, lr=1e-3)\n"))
    for choice in ("analytic", "measure"):
        table = _resolve(choice, model=str(model)).table
        assert table.optimizer_state_factor == pytest.approx(2.0, abs=0.02)


def test_defaults() -> None:
    assert measures_by_default(LOCAL) and not measures_by_default(BOARDS)
    assert default_batch_sizes(4) == (1, 2, 4, 8)
    assert default_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert default_batch_sizes(256) == (1, 2, 4, 8, 32)
