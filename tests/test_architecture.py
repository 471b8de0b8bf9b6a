"""The package's imports form no cycle (docs/architecture.md), those inside functions included.

An edge A -> B is an import statement in A that names module B: `from .b import x`, `import
qtune.b`, or `from . import b` where b is a submodule (when b is a name defined in the package's
`__init__`, the edge goes to the package). Python also runs a package's `__init__` before any of
its submodules; that implicit step is not an edge, or every registry package (an `__init__` that
imports its plugins) would be a cycle by construction.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import qtune

PACKAGE = Path(qtune.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package named `package`)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, by any import statement anywhere in the file."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target not in modules:
                    continue
                submodules = [f"{target}.{alias.name}" for alias in node.names]
                edges.update(m for m in submodules if m in modules)
                if any(m not in modules for m in submodules):  # a name defined in `target` itself
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    arrows = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"import cycle of {len(component)} modules: " + "; ".join(arrows)


def test_qtune_has_no_import_cycle():
    graph = import_graph(PACKAGE, "qtune")
    assert len(graph) > 30 and "qtune.methods.rules" in graph["qtune.selectors.base"]
    found = cycles(graph)
    assert not found, "\n".join(describe(c, graph) for c in found)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root / "pkg"


def test_a_cycle_through_an_import_inside_a_function_is_found_and_named(tmp_path):
    pkg = write_package(tmp_path, {
        "__init__.py": "",
        "config.py": """
            def check(name):
                from .registry import NAMES  # the planted cycle: config -> registry -> config
                return name in NAMES
        """,
        "registry.py": "from .config import check\nNAMES = set()\n",
        "leaf.py": "from . import config\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.leaf"] == {"pkg.config"}
    assert cycles(graph) == [["pkg.config", "pkg.registry"]]
    assert describe(cycles(graph)[0], graph) == ("import cycle of 2 modules: pkg.config -> pkg.registry; "
                                                 "pkg.registry -> pkg.config")


def test_a_registry_package_is_no_cycle_but_a_plugin_importing_its_init_is(tmp_path):
    files = {
        "plugins/__init__.py": "from . import one\nfrom .base import REGISTRY\n",
        "plugins/base.py": "REGISTRY = {}\n",
        "plugins/one.py": "from .base import REGISTRY\n",
    }
    assert cycles(import_graph(write_package(tmp_path / "a", files), "pkg")) == []
    files["plugins/one.py"] = "from . import REGISTRY\n"  # a name of the package's __init__
    assert cycles(import_graph(write_package(tmp_path / "b", files), "pkg")) == [["pkg.plugins", "pkg.plugins.one"]]
