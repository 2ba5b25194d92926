"""The shape of the code, checked so that it stays: imports go one way between the top-level folders (the table in
docs/design.md) and never in a circle, every error of ours has one root that carries its exit code, and no module
or function of ``pipeline/`` grows past what a reader holds in view (the training loop least of all)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from data_loaders.errors import SovitError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "data_loaders", "launchers", "benchmarks")
# what each folder may import of the project (docs/design.md, "Folders"); benchmarks and tests may import everything
MAY_IMPORT = {
    "pipeline.models": {"pipeline.models"},
    "pipeline": {"pipeline", "pipeline.models", "data_loaders"},
    "data_loaders": {"data_loaders"},
    "launchers": {"launchers", "pipeline", "pipeline.models", "data_loaders"},
    "benchmarks": {"benchmarks", "pipeline", "pipeline.models", "data_loaders", "launchers"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (a lazy import inside a function counts too: it
    is an edge all the same, only a later one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:  # the module itself, or the nearest package of it that is ours
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _folder(module: str) -> str:
    return "pipeline.models" if module.startswith("pipeline.models") else module.split(".")[0]


def test_imports_between_folders_go_one_way():
    back = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                  if _folder(t) not in MAY_IMPORT[_folder(m)])
    assert back == []


def test_no_module_imports_itself_through_others():
    graph, circles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def _project_classes() -> list[type]:
    """Every class defined in the project's modules (benchmarks' scripts included), imported for real."""
    classes = []
    for name, path in _modules().items():
        defined = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
        if defined:
            module = importlib.import_module(name)
            classes += [getattr(module, c) for c in defined]
    return classes


def test_every_error_of_the_project_has_one_root_that_carries_its_exit_code():
    errors = [c for c in _project_classes() if issubclass(c, Exception)]
    assert len(errors) >= 10  # ConfigError, DataError, WriteError, CheckpointError, UsageError, SlurmError, ...
    assert [c.__qualname__ for c in errors if not issubclass(c, SovitError)] == []
    assert [c.__qualname__ for c in errors if issubclass(c, (ValueError, RuntimeError))] == []
    assert {c.__qualname__: c.exit_code for c in errors if c.exit_code != 2} == {"NonFiniteLoss": 1, "CheckFailed": 1}


def test_no_module_of_the_pipeline_is_longer_than_a_few_screens():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "pipeline").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_of_the_pipeline_is_longer_than_a_screen():
    long = {f"{p.relative_to(ROOT)}:{name}": n for p in (ROOT / "pipeline").rglob("*.py")
            for name, n in _functions(p) if n > 45}
    assert long == {}
    loop = dict(_functions(ROOT / "pipeline" / "trainer.py"))
    assert loop["_train"] < 40
