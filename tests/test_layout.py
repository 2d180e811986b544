"""The package import graph is layered: the shared errors and the op specs at the bottom, the methods above them,
then the writers, the engines, validation and the CLI; no cycles, not even between files of one package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package may import only the packages listed before it (CONTRIBUTING.md: what each layer may import).
LAYERS = ["pkv_core", "trt_plugins", "methods", "exporter", "engines", "validate", "pkv_cli"]


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(LAYERS)


def test_packages_only_import_the_layers_below_them():
    violations = []
    for rank, package in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in imported_packages(path) - allowed:
                violations.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert violations == []


def test_each_backend_writer_has_its_own_subpackage():
    for sub in ("onnx", "triton"):
        assert (ROOT / "exporter" / sub / "__init__.py").is_file()
    assert not list((ROOT / "exporter").glob("cli*.py")), "the CLI lives in pkv_cli/"


def test_the_methods_know_neither_the_engines_nor_the_graph_writer():
    """What the hooks need from the engines and the graph writer is handed to them: a method module imports the
    op specs and the method contract only (the layer list above already forbids more; this names the rule)."""
    for path in sorted((ROOT / "methods").glob("*.py")):
        assert imported_packages(path) <= {"pkv_core", "trt_plugins", "methods"}, path.name


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (lazy imports inside functions included; `from pkg import name`
    counts as importing pkg.name when that is a module, else pkg itself)."""
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in LAYERS for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                        for a in node.names}
        graph[name] = {m for m in out if m in paths and m != name}
    return graph


def test_no_file_level_import_cycle():
    """No two modules reach each other through imports. A package's __init__ that re-exports its modules is left
    out (its modules importing the package is how Python packages work)."""
    graph = {m: {n for n in deps if n not in LAYERS} for m, deps in module_graph().items() if m not in LAYERS}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:  # depth-first; a node on the current trail closes a cycle
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
