"""The package is a stack of layers: a module imports only from its own layer or the ones below, and
no set of modules imports each other in a circle. A newcomer reads it bottom up; a change low down
never needs a change higher up to compile."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import runner

PACKAGE = Path(runner.__file__).parent

# Bottom first. A module belongs to the first entry its dotted name starts with.
LAYERS: list[tuple[str, ...]] = [
    (
        "runner.errors",
        "runner.redact",
        "runner.records",
        "runner.control",
        "runner.jsonrecord",
        "runner.files",
        "runner.columns",
    ),
    ("runner.job",),
    ("runner.state",),
    ("runner.money",),
    ("runner.output",),
    ("runner.simulator",),
    ("runner.send",),
    ("runner.observe",),
    ("runner.plan", "runner.breaker", "runner.runs"),
    ("runner.supervise", "runner.resume", "runner.run", "runner.finish", "runner.local"),
    ("runner.engine",),
    ("runner.distributed",),
    ("runner.estimate", "runner.senders"),
    ("runner.cascade",),
    ("runner.api",),
    ("runner.cli", "runner.__main__"),
]


# Imports that still run up a layer, and circles: none (issue 26 removed the last).
STILL_UPWARD: set[str] = set()
STILL_CIRCLES: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def imports() -> dict[str, set[str]]:
    """Each runner module and the runner modules it imports (type-only imports included)."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for t in targets:
                where = PACKAGE.parent / Path(*t.split("."))
                if t.startswith("runner.") and (where.with_suffix(".py").exists() or (where / "__init__.py").exists()):
                    found[name].add(t)
    return found


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" or path.parent != PACKAGE:
            layer_of(module_name(path))


def test_imports_only_go_down() -> None:
    upward = {
        f"{module} imports {target}"
        for module, targets in imports().items()
        if module != "runner"
        for target in targets
        if target != "runner" and layer_of(target) > layer_of(module)
    }
    assert upward == STILL_UPWARD


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = {m: {t for t in ts if t != m and t != "runner"} for m, ts in imports().items()}
    # A package's __init__ importing its own modules is how a package is put together, not a circle.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert {" ".join(sorted(set(c))) for c in circles} == STILL_CIRCLES


def test_the_readme_layout_names_every_module() -> None:
    """The README's Layout is drawn from the tree: a module added without a line there fails here."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    unnamed = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if f"`{path.name}`" not in layout)
    assert unnamed == []
