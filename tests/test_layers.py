"""The layering of m3d_lit is checked, not hoped for: import-linter's contracts and no cycles between files.

The contracts are `[tool.importlinter]` in pyproject.toml (`make lint` runs them too): commands on top,
then app, tasks, evaluation | models, data | losses, and the bottom modules; the data layer loads no
model library. The graph holds every import, those inside functions included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
from conftest import REPO
from importlinter.api import read_configuration

import m3d_lit

SRC = Path(m3d_lit.__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(repo: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(repo / "pyproject.toml")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _layers() -> list[str]:
    (contract,) = [c for c in read_configuration(str(REPO / "pyproject.toml"))["contracts_options"]
                   if c["type"] == "layers"]  # fmt: skip
    return [name.strip() for layer in contract["layers"] for name in layer.replace(":", "|").split("|")]


def test_the_contracts_hold_with_no_exceptions():
    contracts = read_configuration(str(REPO / "pyproject.toml"))["contracts_options"]
    assert {c["type"] for c in contracts} >= {"layers", "forbidden"}
    assert not any(c.get("ignore_imports") for c in contracts), "the contracts list no exceptions"
    result = _lint(REPO, SRC)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout


def test_every_top_level_module_has_a_layer():
    # a new module or package outside every layer would be free to import anything
    tops = {p.stem for p in SRC.joinpath("m3d_lit").iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    tops |= {p.name for p in SRC.joinpath("m3d_lit").iterdir() if (p / "__init__.py").is_file()}
    assert {f"m3d_lit.{name}" for name in tops} == set(_layers())


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(
        SRC / "m3d_lit", tmp_path / "src" / "m3d_lit", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    phrasing = tmp_path / "src" / "m3d_lit" / "data" / "phrasing.py"
    phrasing.write_text(phrasing.read_text() + "\nfrom m3d_lit.inference import loading  # noqa: E402\n")
    result = _lint(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "m3d_lit.data.phrasing -> m3d_lit.inference.loading" in result.stdout


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_files():
    graph = grimp.build_graph("m3d_lit", cache_dir=None)
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    assert cycles(edges) == []
