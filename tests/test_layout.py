"""The package import graph is layered: the op spec at the bottom, the CLI on top, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package may import only the packages listed before it.
LAYERS = ["pkv_core", "trt_plugins", "exporter", "engines", "validate", "pkv_cli"]


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
