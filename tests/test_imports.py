"""Imports go one way: no cycles, the library never reaches the Flower apps, only one entry point does."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("fedtiny", "clients", "server")
ENTRY_POINT = "fedtiny.tools.sim"  # the one library module that starts the apps (docs/architecture.md)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports, at any depth of the file (function-level imports too).

    Importing ``a.b.c`` first runs the ``__init__`` of ``a`` and ``a.b``, so those count as edges too.
    """
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in files and name != mod:
                        graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph = import_graph()
    assert "server.strategy" in graph and "fedtiny.federated.aggregate" in graph["server.strategy"]
    assert "fedtiny.compress.uplink" in graph["fedtiny.federated.task"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_never_imports_the_apps():
    graph = import_graph()
    reaching = {
        m
        for m, deps in graph.items()
        if m.startswith("fedtiny") and any(d.split(".")[0] in ("clients", "server") for d in deps)
    }
    assert reaching == {ENTRY_POINT}


def test_clients_never_import_the_server():
    graph = import_graph()
    assert not [(m, d) for m, deps in graph.items() if m.startswith("clients") for d in deps if d.startswith("server")]


def folder_of(module: str) -> str:
    """``fedtiny.int8.ops.conv`` -> ``fedtiny.int8``; ``fedtiny.scenario`` -> itself; ``server.strategy`` -> ``server``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fedtiny" and len(parts) > 1 else parts[0]


def stated_floors() -> dict[str, int]:
    """docs/architecture.md's floors: ``- floor N: `fedtiny/int8/`, `fedtiny/scenario.py` ...``."""
    import re

    floors = {}
    for n, names in re.findall(r"^- floor (\d+): (.+)$", (ROOT / "docs" / "architecture.md").read_text(), re.M):
        for path in re.findall(r"`([^`]+)`", names):
            floors[path.rstrip("/").removesuffix(".py").replace("/", ".")] = int(n)
    return floors


def test_folders_import_one_way_as_the_architecture_page_states():
    floors = stated_floors()
    graph = import_graph()
    folders = {folder_of(m) for m in graph} - {"fedtiny"}
    assert folders <= set(floors), f"folders without a floor on the architecture page: {sorted(folders - set(floors))}"
    wrong = sorted(
        {
            (folder_of(a), folder_of(b), a, b)
            for a, bs in graph.items()
            for b in bs
            if folder_of(b) not in ("fedtiny", folder_of(a)) and floors[folder_of(a)] <= floors[folder_of(b)]
        }
    )
    assert not wrong, "imports that do not run down a floor: " + "; ".join(f"{a} -> {b}" for *_, a, b in wrong[:10])


def test_an_import_inside_a_function_says_why():
    """An import inside a function (deferred) has its reason on its line or the line above: an optional package,
    a measured start-up cost, or a lower floor that must not load a higher one (docs/architecture.md)."""
    silent = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        here, above = lines[sub.lineno - 1], lines[sub.lineno - 2].strip()
                        if "#" not in here and not above.startswith("#") and not above.startswith("import "):
                            silent.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert not silent, f"imports inside functions without a reason: {sorted(set(silent))}"
