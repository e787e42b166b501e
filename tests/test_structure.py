"""The house rules that keep the code readable, checked on the source: imports only go down (no
cycle among the package's modules, function-level imports included), no module over 500 lines and no
class over 250. docs/architecture.md describes the rooms these rules keep apart."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reconstruct", "calib")
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _runs_only_for_type_checkers(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in `name`'s body (except under `if
    TYPE_CHECKING:`), relative imports made absolute: `from .a import b` in package `p` is ("p.a", "b")."""
    is_package = path.name == "__init__.py"
    imports = []

    def visit(node):
        if isinstance(node, ast.If) and _runs_only_for_type_checkers(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            imports.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            imports.extend((source, alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return imports


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its body (except under `if TYPE_CHECKING:`).

    `from package import thing` is an arrow to `package.thing` when that is a module, else to the
    package itself."""
    targets = set()
    for source, imported in imported_names(name, path):
        submodule = f"{source}.{imported}"
        targets.add(submodule if imported and submodule in known else source)
    return {target for target in targets if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_modules(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "__init__.py").write_text("from . import leaf\nfrom ..top import thing\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    from .. import top\n")
    (package / "top.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import leaf\n")
    known = {"pkg", "pkg.sub", "pkg.sub.leaf", "pkg.top"}
    assert imported_modules("pkg.sub", package / "sub" / "__init__.py", known) == {"pkg.sub.leaf", "pkg.top"}
    assert imported_modules("pkg.sub.leaf", package / "sub" / "leaf.py", known) == {"pkg.top"}
    assert imported_modules("pkg.top", package / "top.py", known) == set()


@pytest.mark.parametrize("name", sorted(module_files()))
def test_every_import_of_our_packages_names_a_module_that_exists(name):
    """An import left behind by a move (`from .writer import OutputError` after writer.py moved)
    fails only when that line runs, often on an error path no other test reaches."""
    known = set(module_files())
    missing = sorted({source for source, _ in imported_names(name, module_files()[name])
                      if source.split(".")[0] in PACKAGES and source not in known})
    assert not missing, f"{name} imports modules that do not exist: {missing}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(module_files()))
def test_module_and_class_sizes(name):
    path = module_files()[name]
    source = path.read_text()
    lines = source.count("\n") + (not source.endswith("\n") and bool(source))
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_MODULE_LINES})"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, (f"class {node.name} in {path.relative_to(ROOT)} has {size} lines "
                                             f"(at most {MAX_CLASS_LINES})")


def test_the_package_version_is_pyproject_s():
    """The version a report records (reconstruct/versions.py) is the one the package is installed as."""
    import tomllib

    from reconstruct.versions import __version__

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
