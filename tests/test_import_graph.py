"""The import graph of ``service/`` and ``dino_core/``: no cycles, no upward imports.

Every import counts, also one inside a function: a lazy import is a dependency all the same.
Layers, top to bottom (a module may import its own package and anything lower):
cli; api; sweep and search; train, evaluate and embed; data, models, cluster and devtools; config,
storage and tracking; errors; dino_core.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "service.cli": 7,
    "service.api": 6,
    "service.sweep": 5, "service.search": 5,
    "service.train": 4, "service.evaluate": 4, "service.embed": 4,
    "service.data": 3, "service.models": 3, "service.cluster": 3, "service.devtools": 3,
    "service.config": 2, "service.storage": 2, "service.tracking": 2,
    "service.errors": 1, "service": 1,
    "dino_core": 0,
}  # fmt: skip
MAX_LINES = 320  # "about 300"


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("service", "dino_core"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to (``a.b.c`` may be a function ``c`` of module ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                found = _resolve(target, modules)
                if found and found != name:
                    graph[name].add(found)
    return graph


def layer(module: str) -> tuple[str, int]:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return best, LAYERS[best]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_and_an_upward_import():
    graph = {"service.cli.main": {"service.cluster.jobs"}, "service.cluster.jobs": {"service.cli.main"}}
    assert cycles(graph) == [["service.cli.main", "service.cluster.jobs"]]
    assert layer("service.cluster.jobs")[1] < layer("service.cli.main")[1]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_upward_or_sideways_imports():
    bad = []
    for module, targets in import_graph().items():
        home, rank = layer(module)
        for target in targets:
            target_home, target_rank = layer(target)
            if target_home == home:
                continue  # within one package
            if target_rank >= rank:
                bad.append(f"{module} ({home}, layer {rank}) imports {target} "
                           f"({target_home}, layer {target_rank})")
    assert bad == []


def test_every_module_has_a_layer_and_dino_core_imports_no_service():
    graph = import_graph()
    assert all(layer(m) for m in graph)
    leaks = [(m, t) for m, ts in graph.items() if m.startswith("dino_core") for t in ts
             if t.startswith("service")]
    assert leaks == []


def test_modules_stay_small_or_say_why():
    long = []
    for name, path in _modules().items():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > MAX_LINES and "over 300 lines" not in doc:
            long.append(f"{name}: {n} lines")
    assert long == []
