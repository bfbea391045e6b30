"""The project's import graph (read with ast, imports inside functions included): no cycle among project modules,
`pipeline/` never imports `stages/`, and no stage imports Ray (all Ray plumbing lives in `pipeline/`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_names(path: Path, module: str) -> set[str]:
    """Every absolute module name `path` imports at run time (TYPE_CHECKING blocks excluded), `from a import b`
    giving both `a` and `a.b`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports. An import of a package whose `__init__` imports nothing adds no
    edge (importing `pipeline.models.clip` runs the empty `pipeline.models`, which cannot close a cycle)."""
    modules = project_modules()
    inert = {name for name, path in modules.items() if path.name == "__init__.py" and not imported_names(path, name)}
    return {name: {n for n in imported_names(path, name) if n in modules and n != name and n not in inert}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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


def test_no_import_cycle_among_project_modules():
    assert cycles(import_graph()) == []


def test_cycle_finder_sees_a_cycle_through_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.x\n"
                      "def f():\n    from pipeline.models import clip\n")
    assert imported_names(source, "m") == {"typing", "typing.TYPE_CHECKING", "pipeline.models",
                                           "pipeline.models.clip"}


def test_pipeline_never_imports_stages():
    offenders = {name: sorted(n for n in imported_names(path, name) if n.split(".")[0] == "stages")
                 for name, path in project_modules().items() if name.startswith("pipeline")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("name", sorted(n for n in project_modules() if n.startswith("stages")))
def test_stages_do_not_import_ray(name):
    imports = imported_names(project_modules()[name], name)
    assert not {n for n in imports if n.split(".")[0] == "ray"}
