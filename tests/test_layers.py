"""The packages import one way, as docs/layout.md draws them: the import-linter contracts in
pyproject.toml hold, no module-level import cycle exists, and no project import hides inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "evals", "pretrain", "launch")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), str(path))
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported(node: ast.AST, modules: set[str]) -> list[str]:
    """The project modules an import statement names (a `from package import module` names the module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                 for alias in node.names]
    else:
        return []
    return [name for name in names if name.split(".")[0] in PACKAGES]


def test_the_import_contracts_hold():
    lint = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_no_project_import_is_placed_inside_a_function():
    trees = project_modules()
    hidden = []
    for name, tree in trees.items():
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{name}.{function.name}: {module}" for node in ast.walk(function)
                           for module in imported(node, set(trees))]
    assert not hidden, "imports inside functions (move them to the top of the module):\n" + "\n".join(hidden)


def test_every_import_inside_a_function_says_why_it_is_deferred():
    # A slow or optional package (DeepSpeed, transformers, matplotlib, W&B) is imported where it is needed, with
    # a comment starting "deferred" on its line or the line above; any other import belongs at the top.
    unexplained = []
    for path in (path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))):
        lines = path.read_text().splitlines()
        name = module_name(path)
        for function in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        said = " ".join(lines[node.lineno - 2:node.lineno]).lower()
                        if "deferred" not in said:
                            unexplained.append(f"{name}:{node.lineno}")
    assert not unexplained, "imports inside functions without a reason:\n" + "\n".join(unexplained)


def test_every_module_of_evals_outside_its_commands_is_held_to_the_library_contract():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    library = next(contract for contract in contracts if contract["name"].startswith("evals' library"))
    covered = set(library["source_modules"])
    outside = [name for name in project_modules() if name.startswith("evals.") and not name.startswith(
        ("evals.commands", "evals.__main__")) and not any(name == c or name.startswith(f"{c}.") for c in covered)]
    assert not outside, f"evals modules outside the library contract (add them, or move them to commands): {outside}"


def test_no_module_level_import_cycle():
    trees = project_modules()
    graph = {name: {module for node in tree.body for module in imported(node, set(trees)) if module in trees}
             for name, tree in trees.items()}
    visiting, done = [], set()

    def visit(module: str) -> None:
        if module in visiting:
            cycle = visiting[visiting.index(module):] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        visiting.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
