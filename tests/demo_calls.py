"""Run a demo's main with its stages stubbed: the commands it would run, in order, with their arguments."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from desam_pipeline.utilities.paths import ROOT_VARIABLES


def demo_calls(module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               **stubs) -> list[tuple[str, list[str]]]:
    """(command, argv) of every stage `module.main([])` runs with its trees under `tmp_path`; `stubs` replace
    module attributes that would read the stages' outputs. Asserts the demo exits 0."""
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(module, "DATA_DIR", tmp_path)
    for kind, variable in ROOT_VARIABLES.items():
        monkeypatch.setenv(variable, str(tmp_path / kind))  # demo_roots exports the roots; undone after the test
    monkeypatch.setattr(module, "run", lambda main, command, argv: calls.append((command, argv)))
    for name, stub in stubs.items():
        monkeypatch.setattr(module, name, stub)
    with pytest.raises(SystemExit) as stop:
        module.main([])
    assert stop.value.code == 0
    return calls


def flag_value(argv: list[str], flag: str) -> str:
    """The value after `flag` in `argv` (ValueError when the flag is missing)."""
    return argv[argv.index(flag) + 1]
