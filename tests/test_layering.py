"""The package layers import only downwards and no module imports itself back through others.

common <- kernels <- engine <- eval; kernels <- train; shrink drives train, engine and eval.
Every import counts, lazy ones inside functions included (they are cycles and upward reaches too)."""

from __future__ import annotations

import ast
from pathlib import Path

from support import REPO

PACKAGES = ("common", "kernels", "engine", "train", "eval", "shrink")
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "kernels": {"common"},
    "engine": {"common", "kernels"},
    "train": {"common", "kernels"},
    "eval": {"common", "kernels", "engine"},
    "shrink": {"common", "kernels", "engine", "train", "eval"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from pkg import mod` counts as pkg.mod when that is a module)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in PACKAGES:
                continue
            # the module itself, or the nearest enclosing package that is one of ours
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_imports_package(graph: dict[str, set[str]], importer: str, imported: str) -> bool:
    return any(m.split(".")[0] == imported for m in graph[importer])


def test_layers_import_only_downwards():
    graph = import_graph()
    assert len(graph) > 50 and "train.rationale" in graph and "common.tasks" in graph
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                    if target.split(".")[0] != module.split(".")[0]
                    and target.split(".")[0] not in ALLOWED[module.split(".")[0]])
    assert upward == []


def test_no_import_cycles_between_modules():
    graph = import_graph()
    # a package's __init__ re-exporting its modules is not a cycle of the modules themselves
    edges = {m: {t for t in ts if not (graph.get(t) is not None and m.startswith(t + "."))} for m, ts in graph.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_the_checks_catch_what_they_are_for():
    graph = {"train.a": {"eval.b"}, "eval.b": {"eval.c"}, "eval.c": {"eval.b"}}
    assert find_cycle(graph) == ["eval.b", "eval.c", "eval.b"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert package_imports_package(graph, "train.a", "eval") and "eval" not in ALLOWED["train"]
    # relative imports and `from pkg import module` resolve to the module
    known = {"common", "common.errors", "common.tasks"}
    source = REPO / "common" / "tasks.py"
    assert imported_modules("common.tasks", source, known) == {"common.errors"}
