"""Tests of tools/check_readme.py: parsing the README's commands and running one."""

from __future__ import annotations

from pathlib import Path

from partition_cases import ROOT, load_tool

tool = load_tool("check_readme")

README = """intro
```bash
pip install torch==2.13.0 -e . && asteroid-fx partition m.py --cluster c.yaml \\
    --batch-size 64 --out out/
# a comment line
asteroid-fx trace examples/skipnet.py      # layers, params
PYTHONPATH=. python tools/x.py --flag "a b"
```
```python
not_a_command()
```
```bash
torchrun --nnodes N -m asteroid_fx.device run out/
python -m pytest -q
```
"""


def test_commands_join_continuations_split_chains_and_drop_comments() -> None:
    found = [c for block in tool.bash_blocks(README) for c in tool.commands(block)]
    assert [c.argv for c in found] == [
        ("pip", "install", "torch==2.13.0", "-e", "."),
        ("asteroid-fx", "partition", "m.py", "--cluster", "c.yaml", "--batch-size", "64",
         "--out", "out/"),
        ("asteroid-fx", "trace", "examples/skipnet.py"),
        ("python", "tools/x.py", "--flag", "a b"),
        ("torchrun", "--nnodes", "N", "-m", "asteroid_fx.device", "run", "out/"),
        ("python", "-m", "pytest", "-q"),
    ]
    assert found[3].env == (("PYTHONPATH", "."),)
    skipped = [tool.skip_reason(c) is not None for c in found]
    assert skipped == [True, False, False, False, True, True]


def test_the_real_readme_has_runnable_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    found = [c for block in tool.bash_blocks(readme) for c in tool.commands(block)]
    runnable = [c for c in found if tool.skip_reason(c) is None]
    assert any(c.argv[:2] == ("asteroid-fx", "partition") for c in runnable)
    assert all(c.argv[0] in ("asteroid-fx", "python") for c in runnable), runnable


def test_run_reports_rc_wall_and_memory(tmp_path: Path) -> None:
    ok = tool.run(tool.Command("python -c pass", (), ("python", "-c", "pass")), tmp_path, 60)
    assert ok["rc"] == 0 and ok["within_targets"] is True
    assert float(str(ok["peak_rss_mib"])) >= 0.0
    # (a process that holds 64 MiB of its own: both measures see it; PSS at most RSS)
    big = tool.run(tool.Command("hold", (), ("python", "-c", "import time; b = bytearray("
                                            "64 << 20); time.sleep(1.0)")), tmp_path, 60)
    rss, pss = float(str(big["peak_rss_mib"])), float(str(big["peak_pss_mib"]))
    assert big["rc"] == 0 and rss >= 64.0
    assert 64.0 <= pss <= rss + 1.0 or pss == 0.0     # (0: no smaps_rollup here)
    bad = tool.run(tool.Command("exit 3", (), ("python", "-c", "raise SystemExit(3)")),
                   tmp_path, 60)
    assert bad["rc"] == 3 and bad["within_targets"] is False
    slow = tool.run(tool.Command("sleep", (), ("python", "-c", "import time; time.sleep(30)")),
                    tmp_path, 0.5)
    assert slow["rc"] == -9 and float(str(slow["wall_s"])) < 10
    assert "$ sleep" in (tmp_path / "check_readme.log").read_text()
