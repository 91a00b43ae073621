"""The house plan, read from the import lines: the core imports no feature package, feature packages import
each other without cycles, and docs/ARCHITECTURE.md draws the same package graph.

Every ``import`` / ``from ... import`` counts, at module level and inside functions (lazy imports are still
dependencies), with relative imports resolved against the importing module.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = "tmanet"
FEATURES = ("export", "runtime", "calibration", "engines", "training")
# The application layer: the only code allowed to reach into every feature package.
APPLICATION = {"tmanet/cli.py", "tmanet/demo.py", "tmanet/__main__.py"}


def module_name(path: Path) -> str:
    """``runtime/segmenter.py`` -> ``tmanet.runtime.segmenter`` (setup.py maps the feature folders into
    the ``tmanet`` namespace); a package's ``__init__.py`` is the package itself."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == CORE else [CORE, *parts])


def package_of(module: str) -> str | None:
    """The layer a dotted module belongs to: a feature package, the core, or None (outside the project)."""
    parts = module.split(".")
    if parts[0] != CORE:
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FEATURES else CORE


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, lazy ones included."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb level-1 packages up from the importing module's package
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
    return found


def project_files() -> list[Path]:
    files = [p for folder in (CORE, *FEATURES) for p in sorted((REPO / folder).rglob("*.py"))]
    return [p for p in files if str(p.relative_to(REPO)) not in APPLICATION]


def package_imports() -> dict[tuple[str, str], list[str]]:
    """Package -> package arrows, each with the import lines that make it ("file:line -> module")."""
    arrows: dict[tuple[str, str], list[str]] = {}
    for path in project_files():
        rel = str(path.relative_to(REPO))
        source = package_of(module_name(path))
        for line, target in imported_modules(path):
            dest = package_of(target)
            if dest is None or dest == source:
                continue
            arrows.setdefault((source, dest), []).append(f"{rel}:{line} -> {target}")
    return arrows


def cycles(edges) -> list[list[str]]:
    """Every strongly connected group of two or more packages (Tarjan), each sorted."""
    graph: dict[str, set] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def documented_edges() -> set[tuple[str, str]]:
    """The arrows of the mermaid package graph in docs/ARCHITECTURE.md (``a --> b`` lines)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no mermaid package graph"
    return set(re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*$", block.group(1), re.M))


# -- the reader itself ---------------------------------------------------------------------------------
def test_the_reader_resolves_relative_and_lazy_imports(tmp_path, monkeypatch):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "__init__.py").write_text("from .segmenter import X\n")
    (tmp_path / "runtime" / "mod.py").write_text(
        "import numpy\nfrom . import slots\nfrom ..errors import UserError\n"
        "def f():\n    from tmanet.export.manifest import load_manifest\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert imported_modules(tmp_path / "runtime" / "__init__.py") == [(1, "tmanet.runtime.segmenter")]
    assert imported_modules(tmp_path / "runtime" / "mod.py") == [
        (1, "numpy"), (2, "tmanet.runtime"), (3, "tmanet.errors"), (5, "tmanet.export.manifest")]
    assert [package_of(m) for _, m in imported_modules(tmp_path / "runtime" / "mod.py")] == [
        None, "runtime", "tmanet", "export"]


def test_cycle_finder():
    assert cycles([("a", "b"), ("b", "c")]) == []
    assert cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert sorted(cycles([("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")])) == [["a", "b"], ["c", "d"]]


# -- the project -----------------------------------------------------------------------------------------
def test_the_core_imports_no_feature_package():
    arrows = package_imports()
    wrong = {f"{a} -> {b}": lines for (a, b), lines in arrows.items() if a == CORE}
    assert not wrong, f"the core reaches into feature packages: {wrong}"


def test_no_cycles_between_packages():
    arrows = package_imports()
    found = cycles(arrows)
    detail = {f"{a} -> {b}": lines for (a, b), lines in arrows.items()
              if any(a in group and b in group for group in found)}
    assert not found, f"import cycles between packages {found}: {detail}"


def test_the_architecture_doc_draws_the_same_graph():
    derived = set(package_imports())
    documented = documented_edges()
    assert documented == derived, (f"docs/ARCHITECTURE.md lacks {sorted(derived - documented)} and draws "
                                   f"{sorted(documented - derived)} that the imports do not have")
