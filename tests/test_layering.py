"""The pack's floors: data flows one way, nodes -> loading -> models -> layers.

Each folder of ``core/`` is a floor; a module may import from its own folder and from floors
below it, never from above or from a sibling floor. Inside a folder, module-level imports form
no circle. No module imports another module's private (underscore) names. These are read from
the source with ``ast``, so a lazy import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lower number = lower floor. Floors with the same number are siblings and may not import each other.
FLOORS = {
    "core/errors.py": 0,
    "core/quant": 1,
    "core/layers": 2,
    "core/models": 3,
    "core/encoders": 3,
    "core/formats": 4,
    "core/pipeline": 4,
    "core/keymaps": 5,
    "core/loading": 6,
    "nodes": 7,
}


def _floor_of(module_path: Path) -> str:
    rel = module_path.relative_to(ROOT).as_posix()
    for floor in sorted(FLOORS, key=len, reverse=True):
        if rel == floor or rel.startswith(floor + "/"):
            return floor
    raise AssertionError(f"{rel} is on no floor: add its folder to FLOORS (and to ARCHITECTURE.md)")


def _modules() -> list[Path]:
    return sorted(p for d in ("core", "nodes") for p in (ROOT / d).rglob("*.py") if _in_package(p))


def _in_package(p: Path) -> bool:
    """Empty ``__init__.py`` files only mark packages: they hold no code and import nothing."""
    return p.name != "__init__.py" or bool(p.read_text().strip())


def _resolve(path: Path, node: ast.ImportFrom) -> list[Path]:
    """The files a relative ``from ... import ...`` reads (a module, or a package's modules)."""
    base = path.parent
    for _ in range(node.level - 1):
        base = base.parent
    target = base.joinpath(*node.module.split(".")) if node.module else base
    if target.with_suffix(".py").is_file():
        return [target.with_suffix(".py")]
    if target.is_dir():  # from .pkg import module_a, module_b
        return [target / f"{alias.name}.py" for alias in node.names if (target / f"{alias.name}.py").is_file()] \
            or [target / "__init__.py"]
    raise AssertionError(f"{path.relative_to(ROOT)}: cannot resolve 'from {'.' * node.level}{node.module or ''}'")


def _imports(path: Path, top_level_only: bool = False):
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            yield node, _resolve(path, node)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_go_down_only(path):
    here = _floor_of(path)
    for node, targets in _imports(path):
        for target in targets:
            there = _floor_of(target)
            if there == here:
                continue
            assert FLOORS[there] < FLOORS[here], (
                f"{path.relative_to(ROOT)}:{node.lineno} imports {target.relative_to(ROOT)}: "
                f"{here} (floor {FLOORS[here]}) may only import floors below it, not {there} (floor {FLOORS[there]})"
            )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_private_name_is_imported_from_another_module(path):
    for node, _ in _imports(path):
        private = [a.name for a in node.names if a.name.startswith("_")]
        assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports private {private} from {node.module}"


def test_no_import_circle_inside_a_floor():
    graph = {p: {t for _, ts in _imports(p, top_level_only=True) for t in ts if t != p and _in_package(t)}
             for p in _modules()}
    done: set[Path] = set()

    def visit(p: Path, trail: list[Path]) -> None:
        if p in trail:
            circle = trail[trail.index(p):] + [p]
            raise AssertionError("import circle: " + " -> ".join(q.relative_to(ROOT).as_posix() for q in circle))
        if p in done:
            return
        for q in graph.get(p, ()):
            visit(q, trail + [p])
        done.add(p)

    for p in graph:
        visit(p, [])


def test_every_module_stays_readable():
    """No file past ~600 lines: a module that grows that long holds more than one concern."""
    long = {p.relative_to(ROOT).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these modules: {long}"
