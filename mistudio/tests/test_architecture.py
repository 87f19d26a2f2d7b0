"""The house's rules, measured on the code's real import graph (grimp reads every import, at any
depth): no cycles, apps depend on the shared kernel `mistudio/` and never the other way, models
depend on datasets and templates and never back, `ml/` knows nothing of Django, and no function
hides an import of our own code (the usual way to dodge a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mistudio", "models_app", "datasets_app", "templates_app")
APPS = ("models_app", "datasets_app", "templates_app")


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return "tests" in parts or parts[-1] == "conftest"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    g = grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)
    for module in [m for m in g.modules if _is_test_module(m)]:
        g.remove_module(module)
    return g


def _own_edges(graph: grimp.ImportGraph) -> nx.DiGraph:
    g = nx.DiGraph()
    for module in graph.modules:
        if module.split(".")[0] in PACKAGES:
            g.add_node(module)
            for imported in graph.find_modules_directly_imported_by(module):
                if imported.split(".")[0] in PACKAGES:
                    g.add_edge(module, imported)
    return g


def test_the_product_has_no_import_cycle(graph):
    edges = _own_edges(graph)
    # A package's __init__ is imported by every child: only module-to-module loops count.
    for node in list(edges):
        for parent in [m for m in edges.successors(node) if node.startswith(f"{m}.")]:
            edges.remove_edge(node, parent)
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert cycles == []


@pytest.mark.parametrize("app", APPS)
def test_the_shared_kernel_never_imports_an_app(graph, app):
    assert graph.find_shortest_chain(importer="mistudio", imported=app, as_packages=True) is None


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("datasets_app", "models_app"),
        ("templates_app", "models_app"),
        ("datasets_app", "templates_app"),
        ("templates_app", "datasets_app"),
    ],
)
def test_apps_depend_one_way(graph, importer, imported):
    chain = graph.find_shortest_chain(importer=importer, imported=imported, as_packages=True)
    assert chain is None, f"{importer} reaches {imported}: {' -> '.join(chain or ())}"


def test_ml_never_imports_django(graph):
    chain = graph.find_shortest_chain(importer="models_app.ml", imported="django", as_packages=True)
    assert chain is None, " -> ".join(chain or ())


def _hidden_own_imports(path: Path) -> list[str]:
    """Imports of our packages inside a function body (AppConfig.ready, where Django wants signal
    handlers and app registries imported, excepted)."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.name == "ready":
            continue
        for node in ast.walk(fn):
            module = None
            if isinstance(node, ast.ImportFrom):
                module = "." if node.level else node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            if module and (module == "." or module.split(".")[0] in PACKAGES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}()")
    return found


def test_no_function_imports_our_own_code():
    sources = [
        p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "tests" not in p.parts and "migrations" not in p.parts
    ]
    assert len(sources) > 50
    hidden = [hit for path in sources for hit in _hidden_own_imports(path)]
    assert hidden == []
