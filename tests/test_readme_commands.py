"""Every desam command written in README.md parses with that command's real argument parser.

Commands are taken from the README's code blocks: plain `desam_*` lines (also inside `for` loops
and after line continuations) and `torchrun ... -m desam_pipeline.<module>` / `torchrun --no-python
... desam_*` lines. Usage synopses (`[...]`) and lines that abbreviate with `...` are skipped; shell variables get
sample values.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE_VALUES = {"$SAM": "/models/sam_vit_h_4b8939.pth", "$f": "0", "$FOLD": "0"}


def console_scripts() -> dict[str, str]:
    """desam console command -> module that defines its main()."""
    return {entry.name: entry.value.split(":")[0]
            for entry in importlib.metadata.entry_points(group="console_scripts") if entry.name.startswith("desam_")}


def code_lines(text: str) -> list[str]:
    """Lines inside ``` fences or 4-space indented blocks, with backslash continuations joined."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            inside = not inside
            continue
        if not (inside or raw.startswith("    ")):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def commands(text: str, scripts: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(README line, module, argv) for every desam invocation in the code blocks."""
    found = []
    for line in code_lines(text):
        if line.startswith("#") or " ... " in f" {line} " or "[" in line:
            continue  # comments, abbreviations and usage synopses
        for segment in re.split(r";|&&|\bdo\b", line.split(" #")[0]):
            words = segment.split()
            if "torchrun" in words:  # also behind a launcher such as srun
                segment = " ".join(words[words.index("torchrun"):])
                tokens = shlex.split(re.sub(r"\$\([^)]*\)", "HOST", segment))
                if "-m" in tokens:
                    at = tokens.index("-m")
                    found.append((line, tokens[at + 1], tokens[at + 2:]))
                else:
                    at = next(i for i, token in enumerate(tokens) if token in scripts)
                    found.append((line, scripts[tokens[at]], tokens[at + 1:]))
            elif words and words[0] in scripts:
                for variable, value in SAMPLE_VALUES.items():
                    segment = segment.replace(variable, value)
                tokens = shlex.split(segment)
                found.append((line, scripts[tokens[0]], tokens[1:]))
    return found


def test_every_readme_command_parses():
    scripts = console_scripts()
    found = commands(README.read_text(), scripts)
    modules = {module for _, module, _ in found}
    # the main workflow's commands are all documented
    for name in ("desam_convert_prostate_multisite", "desam_verify_dataset",
                 "desam_plan_and_embed", "desam_train", "desam_predict", "desam_evaluate", "desam_report"):
        assert scripts[name] in modules, f"{name} is not shown in README.md"
    for line, module, argv in found:
        parser = importlib.import_module(module).build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README.md command does not parse: {line}")


def test_the_extraction_catches_a_wrong_flag():
    scripts = console_scripts()
    text = "```\nfor f in 0 1; do desam_train 1 $f --sources RUNMC; done\n```\n"
    [(line, module, argv)] = commands(text, scripts)
    assert module == "desam_pipeline.training.train" and argv == ["1", "0", "--sources", "RUNMC"]
    with pytest.raises(SystemExit):
        importlib.import_module(module).build_parser().parse_args(argv)
