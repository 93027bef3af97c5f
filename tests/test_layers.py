"""The architecture, checked: no import cycle in fgloc, and no import from a lower layer to a
higher one (issue 14). Every module belongs to exactly one layer (DEVELOPING.md); a module may
import only modules of its own layer or of lower layers. Function-level (lazy) imports count:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Lowest first. A module's layer is the first whose prefixes match its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "ops",  # pure array functions, constants and the runtime: no model, weights, training
        (
            "fgloc.cache",
            "fgloc.distributed",
            "fgloc.metrics",
            "fgloc.maps",
            "fgloc.localize.boxes",
            "fgloc.localize.keypoints",
            "fgloc.localize.coordinate_transfer",
            "fgloc.localize.ridge",
            "fgloc.data.images",
            "fgloc.data.cub_parts",
            "fgloc.data.pipeline",
        ),
    ),
    ("models", ("fgloc.models",)),
    ("weights", ("fgloc.weights",)),
    ("registry", ("fgloc.registry", "fgloc.pretrained", "fgloc.__init__")),
    ("methods", ("fgloc.localize", "fgloc.data")),
    ("train", ("fgloc.train",)),
    # Offline converters import the library; only the CLI above them dispatches to them.
    ("converters", ("weights_conversion",)),
    ("app", ("fgloc.app", "fgloc.cli")),
    ("experiments", ("experiments",)),
]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module {name} is in no layer: add it to LAYERS and DEVELOPING.md")


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # a submodule (``from fgloc import cache``) or an attribute
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m.split(".")[0] in ("fgloc", "weights_conversion", "experiments")}


def _project_modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in ("fgloc", "weights_conversion", "experiments"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            mods[name.removesuffix(".__init__") if name.endswith("__init__") and name != "fgloc.__init__" else name] = path  # fmt: skip
    return mods


MODULES = _project_modules()


def _resolve(target: str) -> str | None:
    """The project module a dotted import refers to (``from a.b import c`` may name a module
    ``a.b.c`` or an attribute of ``a.b``)."""
    while target:
        if target in MODULES:
            return target
        if target == "fgloc":
            return "fgloc.__init__"
        target = target.rpartition(".")[0]
    return None


@functools.cache
def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = {_resolve(t) for t in _imports(path)}
        graph[name] = {d for d in deps if d is not None and d != name}
    return graph


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_lower_layer_to_a_higher_one(name):
    mine = _layer(name)
    up = sorted(d for d in _graph()[name] if _layer(d) > mine)
    assert not up, f"{name} (layer {LAYERS[mine][0]}) imports higher layers: " + ", ".join(
        f"{d} ({LAYERS[_layer(d)][0]})" for d in up
    )


def test_experiments_never_import_each_other():
    for name, deps in _graph().items():
        if name.startswith("experiments.") and not name.startswith("experiments.configs"):
            others = {
                d for d in deps
                if d.startswith("experiments.") and d not in ("experiments.common", "experiments.common_bench", "experiments.common_torch")
                and not d.startswith("experiments.configs")
            }  # fmt: skip
            assert not others, f"{name} imports other experiments: {sorted(others)}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
