"""The package's shape: no import cycles (function-local imports included), and a configuration reference
generated from the schema. (ruff runs in `make test` before pytest.)"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gaudi_pretrain"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its source (top level or inside functions).
    `from a.b import c` counts as importing a.b.c when that is a module, else a.b. Importing one's own
    ancestor package is left out: Python runs it first for any submodule, which is not a cycle of ours."""
    modules = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module attribute path
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "gaudi_pretrain.train.loop" in graph and graph["gaudi_pretrain.train.loop"], "the graph saw no imports"
    assert find_cycles(graph) == []


def test_the_cycle_finder_sees_a_function_local_cycle(tmp_path):
    """The check above could pass by seeing nothing: a cycle hidden in a function-local import is found."""
    pkg = tmp_path / "gaudi_pretrain"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from gaudi_pretrain.train.evaluate import evaluate\n")
    (pkg / "train" / "evaluate.py").write_text("def evaluate():\n    from gaudi_pretrain.train import loop\n")
    (pkg / "cli.py").write_text("from gaudi_pretrain.train import loop\n")
    cycles = find_cycles(import_graph(pkg))
    assert cycles == [["gaudi_pretrain.train.evaluate", "gaudi_pretrain.train.loop"]]


def test_the_configuration_reference_is_generated_from_the_schema():
    from gaudi_pretrain.config_docs import render_configuration_doc

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == render_configuration_doc(), "docs/configuration.md is stale: run `make docs`"


def test_every_config_field_has_a_description():
    from gaudi_pretrain.config import RunConfig
    from gaudi_pretrain.config_docs import iter_fields

    missing = [path for path, field in iter_fields(RunConfig) if not field.description]
    assert missing == []


def test_every_sabotage_still_finds_its_source_text():
    """tests/sabotage.py replaces one exact piece of source per sabotage: when the code moves on, the
    sabotage must move with it (the script would stop on a stale one only when someone runs it)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import sabotage
    finally:
        sys.path.remove(str(REPO / "tests"))
    stale = [s.id for s in sabotage.SABOTAGES if (REPO / s.path).read_text().count(s.old) != 1]
    assert not stale, f"stale sabotages (their text is gone or repeated): {stale}"
