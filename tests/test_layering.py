"""The core (`desam_pipeline`) sits below the stages: none of its modules imports plans, evaluation or
dataset_conversion, so each stage can be read, tested and replaced on top of the core alone."""
from __future__ import annotations

import ast
from pathlib import Path

STAGES = ("plans", "evaluation", "dataset_conversion")
CORE = Path(__file__).resolve().parents[1] / "desam_pipeline"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def stage_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(CORE.parent)}:{line}: imports {module}" for line, module in imported_modules(path)
            if module.split(".")[0] in STAGES]


def test_the_walker_sees_stage_imports(tmp_path):
    module = tmp_path / "desam_pipeline" / "bad.py"
    module.parent.mkdir()
    module.write_text("import os\nfrom plans.planner import make_plan\n\ndef f():\n    import evaluation.report\n")
    found = [module for _, module in imported_modules(module) if module.split(".")[0] in STAGES]
    assert found == ["plans.planner", "evaluation.report"]


def test_core_never_imports_a_stage():
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) > 20
    violations = [line for path in modules for line in stage_imports(path)]
    assert not violations, "\n".join(violations)
