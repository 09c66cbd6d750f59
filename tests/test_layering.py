"""The core's layers import downwards only, and its modules form no import cycle.

`desam_pipeline` sits below the stages (plans, evaluation, dataset_conversion): none of its modules
imports them. Inside the core the subpackages are layers, lowest first; a module may import its own
layer and the ones below it, never one above, so each layer can be read and tested on top of the
lower ones alone.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

STAGES = ("plans", "evaluation", "dataset_conversion")
LAYERS = ("utilities", "io", "data", "network", "inference", "training", "baselines")
CORE = Path(__file__).resolve().parents[1] / "desam_pipeline"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth (function-level imports and
    `if TYPE_CHECKING:` blocks too); `from package import name` also lists `package.name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index of the module's layer; None for the package root and modules outside the layers."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def stage_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(CORE.parent)}:{line}: imports {module}" for line, module in imported_modules(path)
            if module.split(".")[0] in STAGES]


def upward_imports(path: Path) -> list[str]:
    own = layer_of(module_name(path))
    return [f"{path.relative_to(CORE.parent)}:{line}: imports {module} ({LAYERS[layer_of(module)]} is above "
            f"{LAYERS[own]})" for line, module in imported_modules(path)
            if module.startswith("desam_pipeline.") and own is not None and layer_of(module) is not None
            and layer_of(module) > own]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the core modules it imports; `from package import module` counts as importing the module,
    not the package's `__init__`."""
    graph = {}
    for name, path in modules.items():
        imported = {m for _, m in imported_modules(path) if m in modules and m != name}
        graph[name] = {m for m in imported if not any(other.startswith(m + ".") for other in imported)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_walker_sees_stage_imports(tmp_path):
    module = tmp_path / "desam_pipeline" / "bad.py"
    module.parent.mkdir()
    module.write_text("import os\nfrom plans.planner import make_plan\n\ndef f():\n    import evaluation.report\n", encoding="utf-8")
    found = [module for _, module in imported_modules(module) if module.split(".")[0] in STAGES]
    assert found == ["plans.planner", "plans.planner.make_plan", "evaluation.report"]


def test_core_never_imports_a_stage():
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) > 20
    violations = [line for path in modules for line in stage_imports(path)]
    assert not violations, "\n".join(violations)


def test_every_core_module_sits_in_a_layer():
    outside = [name for name in core_modules() if name != "desam_pipeline" and layer_of(name) is None]
    assert not outside, f"modules outside the layers {LAYERS}: {outside}"


def test_no_layer_imports_a_layer_above_it():
    violations = [line for path in core_modules().values() for line in upward_imports(path)]
    assert not violations, "\n".join(violations)


def test_the_layer_check_sees_an_upward_import():
    path = CORE / "data" / "cache.py"
    fake = [(1, "desam_pipeline.training.trainer"), (2, "desam_pipeline.io.atomic")]
    own = layer_of(module_name(path))
    above = [m for _, m in fake if layer_of(m) > own]
    assert above == ["desam_pipeline.training.trainer"]


def test_core_modules_form_no_import_cycle():
    cycle = find_cycle(import_graph(core_modules()))
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder(graph, expected):
    assert find_cycle(graph) == expected


def test_only_public_segment_anything_api():
    """segment_anything's private names (a leading underscore) may change without notice."""
    private = [f"{path.relative_to(CORE.parent)}:{line}: {module}" for path in core_modules().values()
               for line, module in imported_modules(path)
               if module.startswith("segment_anything") and any(p.startswith("_") for p in module.split("."))]
    assert not private, "\n".join(private)
