"""The layout holds: lower apps never import upward, and the gateway's modules form no import circle."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("common", "accounts", "billing", "routing_rules", "gateway", "management_api", "dwctl_site")
# What each lower package may import from the project: identity first, money on top of it.
MAY_IMPORT = {
    "common": set(),
    "accounts": {"common"},
    "billing": {"common", "accounts"},
    "routing_rules": {"common", "accounts"},
}
MAX_LINES = 450


def python_files(package: str) -> list[Path]:
    return [path for path in (ROOT / package).rglob("*.py") if "migrations" not in path.parts]


def parse(path: Path) -> ast.Module:
    # Python 3.11 keeps one AST recursion counter for all threads, and another thread of the test
    # process (traceback formatting in the live gateway) may be building an AST too; a collection
    # in the middle would let them interleave ("AST constructor recursion depth mismatch").
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        gc.enable()


def imported_modules(path: Path) -> set[str]:
    """Every project module a file imports, at any depth, except under `if TYPE_CHECKING:`."""
    tree = parse(path)
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in APPS}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_lower_package_imports_only_what_lies_below_it(package):
    allowed = MAY_IMPORT[package] | {package}
    upward = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in python_files(package)
        for name in imported_modules(path)
        if name.split(".")[0] not in allowed
    }
    assert not upward


def test_the_gateway_modules_form_no_import_circle():
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for path in python_files("gateway")
        if path.name != "__init__.py"
    }
    graph = {
        module: {name for name in imported_modules(path) if name in modules and name != module}
        for module, path in modules.items()
    }
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            circles.append([*trail[trail.index(module) :], module])
            return
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not circles


def test_no_file_outgrows_a_read():
    long = {
        f"{path.relative_to(ROOT)}: {lines} lines"
        for package in (*APPS, "tests", "bench")
        for path in python_files(package)
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long
