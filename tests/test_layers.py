"""The layer contract of DESIGN.md: front end -> {cost_models, solver, runtime} -> contracts.

Every module's imports, function-local and ``TYPE_CHECKING`` ones included, are read with
``ast`` (nothing is imported), and a second check imports the runtime in a fresh
interpreter to see what it loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("contracts", "asteroid_fx", "cost_models", "solver", "runtime")

#: package -> top-level names its modules must not import, and why
FORBIDDEN: dict[str, dict[str, str]] = {
    "runtime": {"solver": "the runtime never plans (it is handed a re-planner)",
                "cost_models": "the runtime never computes costs",
                "asteroid_fx": "the runtime never traces and never imports the front end"},
    "solver": {"torch": "the solver sees plain data only",
               "asteroid_fx": "the solver never imports the front end",
               "runtime": "the solver never imports the runtime",
               "cost_models": "the solver reads cost tables from contracts"},
    "cost_models": {"solver": "cost models never plan",
                    "runtime": "cost models never import the runtime",
                    "asteroid_fx": "cost models never trace (the front end passes the graph)"},
}

#: contracts imports the standard library only; these function-local imports are the
#: documented exceptions (pyyaml, imported on first use by ``Cluster.from_yaml``)
CONTRACTS_LAZY = {("contracts.cluster", "yaml")}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, absolute module name, at module level)`` of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    found: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, id(node) in top_level))
    return found


def _where(path: Path, line: int) -> str:
    return f"{_module_name(path)} ({path.relative_to(ROOT)}:{line})"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    bad = []
    for path in _modules(package):
        for line, module, _ in _imports(path):
            top = module.split(".")[0]
            why = FORBIDDEN[package].get(top)
            if why is not None:
                bad.append(f"{_where(path, line)} imports {module}: {why}")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_contracts_import_only_the_standard_library() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for path in _modules("contracts"):
        for line, module, at_top in _imports(path):
            top = module.split(".")[0]
            if top in stdlib or top == "contracts":
                continue
            if not at_top and (_module_name(path), top) in CONTRACTS_LAZY:
                continue
            bad.append(f"{_where(path, line)} imports {module}: contracts imports the "
                       f"standard library only")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_the_scan_sees_function_local_imports(tmp_path: Path) -> None:
    """The checks above would miss nothing a function imports late."""
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from solver.api import plan\n    return plan\n")
    assert [(line, module) for line, module, _ in _imports(source)] == [(1, "os"),
                                                                       (4, "solver.api")]


def test_importing_the_runtime_loads_no_planner_cost_model_or_front_end() -> None:
    code = ("import runtime.train, runtime.recovery, runtime.emulator, runtime.launch, "
            "runtime.replanning; import sys; print(sorted(m for m in sys.modules if "
            "m.split('.')[0] in {'solver', 'cost_models', 'asteroid_fx'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_importing_the_solver_loads_no_torch() -> None:
    code = ("import solver.api, solver.replan, solver.replicas, solver.calibrate, "
            "solver.simulate, contracts.cluster, contracts.plan, contracts.table; import sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'asteroid_fx', 'runtime', 'cost_models'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
