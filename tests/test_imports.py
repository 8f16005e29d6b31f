"""The package's imports run one way: no module of fastdpo (kernels/ included) imports, at module level or
inside a function, a module that imports it back. Read from the source with ast, so lazy imports count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fastdpo": ROOT / "fastdpo", "fastdpo.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the package (fastdpo's own, and kernels/ as fastdpo.kernels)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (a package's __init__ is left out
    for `from . import x`, which names the submodule x)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = ".".join(part for part in (base if node.level else "", node.module or "") if part)
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules or {source})
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == "open":
                return path[path.index(succ):] + [succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert {"fastdpo.logprobs", "fastdpo.ops", "fastdpo.kernels.logprob_forward"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_holds_function_local_and_relative_imports():
    graph = import_graph()
    assert "fastdpo.triton_head" in graph["fastdpo.ops"]  # imported inside a function
    assert "fastdpo.kernels.logprob_forward" in graph["fastdpo.triton_head"]  # from .kernels.x, inside a function
    assert "fastdpo.kernels.config" in graph["fastdpo.kernels.logits_tile"]  # from .x inside kernels/
    assert "fastdpo.distributed" in graph["fastdpo.logprobs"]  # from . import x


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
