"""The exporter's modules import one another one way only (no cycles, not even inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import edgecl.exporters

PACKAGE = "edgecl.exporters"


def _imports(path: Path) -> set[str]:
    """Sibling modules of edgecl.exporters that `path` imports anywhere (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:
                names = [base] if base else [a.name for a in node.names]
            elif base.startswith(PACKAGE + "."):
                names = [base[len(PACKAGE) + 1:]]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len(PACKAGE) + 1:].split(".")[0] for a in node.names
                         if a.name.startswith(PACKAGE + "."))
    return found


def test_exporter_modules_import_each_other_one_way():
    folder = Path(edgecl.exporters.__file__).parent
    graph = {p.stem: _imports(p) - {p.stem} for p in folder.glob("*.py") if p.stem != "__init__"}
    assert graph["portable"] and graph["ort_training"]  # the scan sees their imports at all

    def cycle_from(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, [*path, nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, f"import cycles among edgecl.exporters modules: {cycles}"
