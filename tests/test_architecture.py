"""The house plan, read from the import lines: the core imports no feature package, feature packages import
each other without cycles, and docs/ARCHITECTURE.md draws the same package graph.

Every ``import`` / ``from ... import`` counts, at module level and inside functions (lazy imports are still
dependencies), with relative imports resolved against the importing module; so does a module named in a string
(``importlib.import_module("tmanet.engines.backend")``, a table of module names for lazy loading): it is
imported later, by name, and makes the same dependency.
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


MODULE_STRING = re.compile(rf"{CORE}(\.[A-Za-z_]\w*)+")


def is_project_module(module: str) -> bool:
    """A dotted name that is one of the project's modules or packages (files under REPO)."""
    parts = module.split(".")[1:]  # setup.py maps tmanet.<feature> to the folder <feature>/
    base, rest = (REPO / parts[0], parts[1:]) if parts and parts[0] in FEATURES else (REPO / CORE, parts)
    target = base.joinpath(*rest)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, lazy ones and module names in strings included."""
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
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value)
              and is_project_module(node.value)):
            found.append((node.lineno, node.value))
    return sorted(found)


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


def test_the_reader_follows_module_names_in_strings(tmp_path, monkeypatch):
    for folder, name in (("engines", "backend"), ("export", "cli"), ("tmanet", "io")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.py").write_text("")
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "tables.py").write_text(
        'import importlib\nBACKENDS = {"trt": ("tmanet.engines.backend", "TensorRT")}\n'
        'def load():\n    return importlib.import_module("tmanet.export.cli")\n'
        'NOT_MODULES = ("tmanet.engines is the TensorRT package", "tmanet.nothing_here", "tmanet.io.missing")\n'
        'CORE = "tmanet.io"\n')
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = imported_modules(tmp_path / "runtime" / "tables.py")
    assert found == [(1, "importlib"), (2, "tmanet.engines.backend"), (4, "tmanet.export.cli"), (6, "tmanet.io")]
    assert [package_of(m) for _, m in found] == [None, "engines", "export", "tmanet"]


def test_a_cycle_made_by_a_module_name_in_a_string_is_found(tmp_path, monkeypatch):
    for folder in ("runtime", "engines"):
        (tmp_path / folder).mkdir()
    (tmp_path / "runtime" / "backends.py").write_text('LAZY = {"trt": "tmanet.engines.backend"}\n')
    (tmp_path / "engines" / "backend.py").write_text("from tmanet.runtime.backends import LAZY\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert cycles(package_imports()) == [["engines", "runtime"]]


def test_cycle_finder():
    assert cycles([("a", "b"), ("b", "c")]) == []
    assert cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert sorted(cycles([("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")])) == [["a", "b"], ["c", "d"]]
    # any length: five packages around one ring, entered from outside, with a chord
    ring = [("p1", "p2"), ("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p1"), ("p2", "p4"), ("x", "p1")]
    assert cycles(ring) == [["p1", "p2", "p3", "p4", "p5"]]
    assert cycles(ring[:4] + ring[5:]) == []  # the ring broken: the chord alone is no cycle


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
