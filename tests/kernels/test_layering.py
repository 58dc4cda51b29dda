"""Imports point one way: no module under ``dora_tune/kernels/`` imports the layers above it — at module level or
inside a function (an import hidden in a function still closes a circle)."""

import ast
from pathlib import Path

import dora_tune

FORBIDDEN = ("dora_tune.dispatch", "dora_tune.tuning", "dora_tune.nn")
KERNELS = Path(dora_tune.__file__).parent / "kernels"


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement of ``source`` (a module of ``package``), relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def test_kernels_import_nothing_above_them():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    bad = [
        f"{path.relative_to(KERNELS.parent)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(
            path.read_text(), ["dora_tune", *path.parent.relative_to(KERNELS.parent).parts]
        )
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert bad == []


def test_the_walk_sees_imports_inside_functions():
    text = "def f():\n    from dora_tune.dispatch.runtime import auto\n    from ..nn import layer\n"
    found = [m for _, m in imported_modules(text, ["dora_tune", "kernels"])]
    assert "dora_tune.dispatch.runtime" in found and "dora_tune.nn" in found
