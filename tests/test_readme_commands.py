"""Every command written in README.md, docs/*.md and benchmarks/README.md parses with that command's real
argument parser, and every link, code path and Python import in those pages exists.

Commands are taken from the code blocks (``` fences and 4-space indented blocks): `desam_*` lines (also
inside `for` loops, after `&&` or `;`, and after line continuations), `torchrun ... -m <module>` and
`torchrun --no-python ... desam_*` lines (also behind a launcher such as srun), `python -m <module>` lines
and `make <target> [ARGS=...]` lines, plus the same commands in inline code spans of the text.
- A complete line is parsed with the command's parser; shell variables get sample values.
- A usage synopsis (`[...]`, `{a,b}`, `a|b`, lines continued by indentation), a line that abbreviates
  with `...`, and an inline span are checked flag by flag: every option must be one the parser knows,
  and every listed choice one it accepts.
The console commands and their modules are read from setup.py (not from the installed metadata, which
can predate a rename).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SAMPLE_VALUES = {"$SAM": "/models/sam_vit_h_4b8939.pth", "$f": "0", "$FOLD": "0"}
MAIN_WORKFLOW = ("desam_convert_prostate_multisite", "desam_verify_dataset", "desam_plan_and_embed", "desam_train",
                 "desam_predict", "desam_evaluate", "desam_report")
OPTION = re.compile(r"(?<![\w\-./=])(--?[A-Za-z][\w\-]*)")
TOP_FOLDERS = ("desam_pipeline", "plans", "evaluation", "dataset_conversion", "benchmarks", "tests", "docs", ".ci")
# files of the authors' reference code that the pages name; they are not part of this repository
REFERENCE_CODE_FILES = {"desam_train_gridpoints.py", "desam_train_wholebox.py"}


@dataclass
class Command:
    document: str
    line: str
    module: str
    argv: list[str]
    complete: bool  # False: a synopsis or abbreviation, checked flag by flag
    dash_m: bool = False  # run as `python -m`/`torchrun -m` (or by make, which does so)
    inline: bool = False  # from an inline code span of the text, not a code block


def console_scripts() -> dict[str, str]:
    """desam console command -> module that defines its main(), from setup.py's entry points."""
    return dict(re.findall(r'"(desam_\w+)\s*=\s*([\w.]+):main"', (ROOT / "setup.py").read_text(encoding="utf-8")))


def make_targets() -> dict[str, str | None]:
    """Makefile target -> the module its recipe runs with $(ARGS) (None when it passes no ARGS)."""
    targets: dict[str, str | None] = {}
    current = None
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^([\w.\-/]+):(?!=)", line):
            current = match.group(1)
            targets[current] = None
        elif line.startswith("\t") and current and (match := re.search(r"-m ([\w.]+) \$\(ARGS\)", line)):
            targets[current] = match.group(1)
    return targets


def split_markdown(text: str) -> tuple[list[tuple[str, bool]], str]:
    """(code lines, prose) of a page. Code lines are those of ``` fences (with whether the fence is
    ```python) and of indented blocks (4 spaces after a blank line), with backslash continuations joined;
    a synopsis line continued by indentation (starting with `[` or `(`) is joined to its command too.
    The prose is everything else, for inline code spans."""
    lines: list[tuple[str, bool]] = []
    prose: list[str] = []
    fenced = python = indented = False
    previous_blank, pending = True, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            fenced, python, indented = not fenced, raw.strip() == "```python", False
            continue
        indented = raw.startswith("    ") and (indented or previous_blank) if raw.strip() else indented
        previous_blank = not raw.strip()
        if not (fenced or indented):
            prose.append(raw)
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line:
            continue
        if lines and line.startswith(("[", "(")) and "[" in lines[-1][0]:
            lines[-1] = (lines[-1][0] + " " + line, lines[-1][1])
        else:
            lines.append((line, fenced and python))
    return lines, "\n".join(prose)


def code_lines(text: str) -> list[tuple[str, bool]]:
    """(line, is_python) of the page's code blocks."""
    return split_markdown(text)[0]


def inline_spans(text: str) -> list[str]:
    """Inline code spans of the prose (a span may run over a line break)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", split_markdown(text)[1])]


def is_synopsis(line: str) -> bool:
    """A usage synopsis ([optional], {choices}, a|b) or a line abbreviated with `...`."""
    return " ... " in f" {line} " or bool(re.search(r"[\[{|]", line))


def parse_segment(document: str, line: str, segment: str, scripts: dict[str, str], targets: dict[str, str | None],
                  inline: bool) -> Command | None:
    """The command one shell segment runs, or None when it runs no desam command."""
    words = segment.split()
    for variable, value in SAMPLE_VALUES.items():
        segment = segment.replace(variable, value)
    complete = not inline and not is_synopsis(segment)
    try:
        tokens = shlex.split(segment)
    except ValueError:
        tokens, complete = segment.split(), False
    if "torchrun" in words:
        tokens = tokens[tokens.index("torchrun"):]
        if "-m" in tokens:
            at = tokens.index("-m")
            return Command(document, line, tokens[at + 1], tokens[at + 2:], complete, dash_m=True)
        at = next((i for i, token in enumerate(tokens) if token in scripts), None)
        return None if at is None else Command(document, line, scripts[tokens[at]], tokens[at + 1:], complete)
    starts = [i for i, token in enumerate(tokens) if token in scripts or token == "make"
              or (token.endswith("python") and tokens[i + 1:i + 2] == ["-m"])]
    if not starts:
        return None
    at = starts[0]
    if tokens[at] in scripts:
        return Command(document, line, scripts[tokens[at]], tokens[at + 1:], complete)
    if tokens[at] == "make":
        target = next((token for token in tokens[at + 1:] if "=" not in token), None)
        if target is None:
            return None  # the tool itself, named in the text
        assert target in targets, f"{document}: `make {target}` is not a Makefile target: {line}"
        args = [token.split("=", 1)[1] for token in tokens[at + 1:] if token.startswith("ARGS=")]
        if not args:
            return None
        assert targets[target], f"{document}: `make {target}` takes no ARGS: {line}"
        return Command(document, line, targets[target], shlex.split(args[0]), complete, dash_m=True)
    module = tokens[at + 2]
    if not module.startswith(TOP_FOLDERS):
        return None
    return Command(document, line, module, tokens[at + 3:], complete, dash_m=True)


def commands(text: str, scripts: dict[str, str], document: str = "README.md",
             targets: dict[str, str | None] | None = None) -> list[Command]:
    """Every desam invocation of one page: code-block lines first, then inline code spans."""
    targets = make_targets() if targets is None else targets
    found = []
    sources = [(line, False) for line, python in code_lines(text) if not python and not line.startswith("#")]
    sources += [(span, True) for span in inline_spans(text)]
    for line, inline in sources:
        line = re.sub(r"\$\([^)]*\)", "HOST", line)
        for segment in re.split(r";|&&|\bdo\b", line.split(" #")[0]):
            if command := parse_segment(document, line, segment, scripts, targets, inline):
                command.inline = inline
                found.append(command)
    return found


def parser_of(module: str) -> argparse.ArgumentParser | None:
    """The module's argument parser: its build_parser(), else the one its main() builds (caught before it
    parses anything); None for a module whose main takes no arguments."""
    loaded = importlib.import_module(module)
    if hasattr(loaded, "build_parser"):
        return loaded.build_parser()
    if "ArgumentParser(" not in inspect.getsource(loaded):
        return None

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        loaded.main(*([[]] if inspect.signature(loaded.main).parameters else []))
    except Caught as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module}.main() never parsed its arguments")


def synopsis_problems(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Options the parser does not know, and values it would reject for an option with choices: a value
    written out, each of a listed set ({a,b}) and each alternative (a|b). Placeholders (NAME, K, ...) pass."""
    options = {option: action for action in parser._actions for option in action.option_strings}
    tokens = re.findall(r"[^\s\[\]()]+|[\[\]()]", " ".join(argv))
    problems = []
    for at, token in enumerate(tokens):
        if not OPTION.fullmatch(token):
            continue
        if token not in options:
            problems.append(f"unknown option {token}")
            continue
        action = options[token]
        if action.choices is None:
            continue
        values = []
        for value in tokens[at + 1:]:
            if OPTION.fullmatch(value) or value in ("[", "]", "(", ")", "|"):
                break
            if values and action.nargs in (None, "?"):
                break
            values.append(value)
        for value in values:
            listed = value.strip("{}").replace("|", ",").split(",")
            problems += [f"{token} has no choice {item!r}" for item in listed
                         if not re.fullmatch(r"[A-Z][A-Z0-9_]*|\.\.\.", item)
                         and item not in [str(choice) for choice in action.choices]]
    return problems


def check(command: Command) -> str | None:
    """The problems of one command, or None. Options must be spelt out in full (argparse would take a
    unique prefix); a complete line must also parse."""
    parser = parser_of(command.module)
    if parser is None:
        return f"{command.module} takes no arguments" if command.argv else None
    problems = synopsis_problems(parser, command.argv)
    if command.complete:
        try:
            parser.parse_args(command.argv)
        except SystemExit:
            problems.append("does not parse")
    return "; ".join(problems) if problems else None


@pytest.fixture(scope="module")
def documented() -> list[Command]:
    scripts, targets = console_scripts(), make_targets()
    return [command for path in DOCUMENTS
            for command in commands(path.read_text(encoding="utf-8"), scripts, str(path.relative_to(ROOT)), targets)]


def test_the_pages_exist():
    assert all(path.is_file() for path in DOCUMENTS)
    assert len(DOCUMENTS) >= 8


def test_every_documented_command_parses(documented):
    assert sum(command.complete for command in documented) >= 20
    assert sum(not command.complete for command in documented) >= 20
    failures = [f"{command.document}: {problem}: {command.line}"
                for command in documented if (problem := check(command))]
    assert not failures, "\n".join(failures)


def test_the_readme_shows_the_main_workflow_and_lists_every_command():
    scripts = console_scripts()
    text = README.read_text(encoding="utf-8")
    modules = {command.module for command in commands(text, scripts) if command.complete}
    for name in MAIN_WORKFLOW:
        assert scripts[name] in modules, f"{name} is not shown in README.md"
    table = {row.split("|")[1].strip().strip("`") for row in text.splitlines() if row.startswith("| `desam_")}
    assert set(scripts) <= table, f"missing from README.md's command table: {sorted(set(scripts) - table)}"


def test_every_console_command_has_a_reference_entry():
    scripts = console_scripts()
    page = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    documented = {command.module for command in commands(page, scripts, "docs/commands.md") if not command.inline}
    missing = sorted(name for name, module in scripts.items() if module not in documented)
    assert not missing, f"not shown in docs/commands.md: {missing}"


def test_every_module_run_with_dash_m_is_runnable(documented):
    modules = {command.module for command in documented if command.dash_m}
    assert "desam_pipeline.training.train" in modules and "evaluation.demo" in modules
    for module in sorted(modules):
        assert 'if __name__ == "__main__"' in inspect.getsource(importlib.import_module(module)), module


def test_python_examples_import():
    for path in DOCUMENTS:
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
        for block in blocks:
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{path.name}: {node.module} has no {alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)


def tracked_paths() -> set[str]:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, encoding="utf-8", check=True).stdout.split()
    folders = {str(Path(f).parents[i]) for f in files for i in range(len(Path(f).parts) - 1)}
    return set(files) | folders


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and (match := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-"))
    return anchors


def path_problems(path: Path, paths: set[str]) -> list[str]:
    """Links to missing files or headings, code paths and modules that are not in the tree."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            problems.append(f"link to a missing file: {target}")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            problems.append(f"link to a missing heading: {target}")
    for span in inline_spans(text):
        for word in span.split():
            word = word.strip(",;:()")
            if word.startswith(tuple(f"{top}/" for top in TOP_FOLDERS)):
                if word.rstrip("/") not in paths:
                    problems.append(f"no such path: {word}")
            elif word.endswith(".py") and word not in REFERENCE_CODE_FILES:
                if not any(p == word or p.endswith("/" + word) for p in paths):
                    problems.append(f"no such file: {word}")
            elif (re.fullmatch(r"(desam_pipeline|plans|evaluation|dataset_conversion|benchmarks)(\.\w+)+", word)
                  and not re.search(r"\.(json|csv|md|png|pth|npy|npz|gz|txt)$", word)):
                module, _, attribute = word.rpartition(".")
                try:
                    importlib.import_module(word)
                except ImportError:
                    try:
                        if not hasattr(importlib.import_module(module), attribute):
                            problems.append(f"no such module or name: {word}")
                    except ImportError:
                        problems.append(f"no such module: {word}")
    return problems


def test_every_link_path_and_module_in_the_pages_exists():
    paths = tracked_paths()
    problems = [f"{path.relative_to(ROOT)}: {problem}" for path in DOCUMENTS for problem in path_problems(path, paths)]
    assert not problems, "\n".join(problems)


def test_the_extraction_catches_a_wrong_flag():
    scripts = console_scripts()
    text = "```\nfor f in 0 1; do desam_train 1 $f --sources RUNMC; done\n```\n"
    [command] = commands(text, scripts)
    assert command.module == "desam_pipeline.training.train" and command.argv == ["1", "0", "--sources", "RUNMC"]
    assert command.complete and check(command) == "unknown option --sources; does not parse"


@pytest.mark.parametrize("text, problem", [
    ("```\ndesam_train DATASET FOLD [--sources SITE ...]\n```\n", "unknown option --sources"),
    ("```\ndesam_train DATASET FOLD [--mode {grid,boxes}]\n```\n", "--mode has no choice 'boxes'"),
    ("```\ndesam_predict -i IN -o OUT [--grid 9]\n    [--grid-rule reference|best]\n```\n",
     "--grid-rule has no choice 'best'"),
    ("```\ndesam_plan_and_embed ... --num-part 4\n```\n", "unknown option --num-part"),
    ("Run `desam_report -d 1 --modes grid` then.\n", "unknown option --modes"),
    ("Run `torchrun --no-python desam_train 1 0\n--sourc RUNMC` then.\n", "unknown option --sourc"),
    ("Run `desam_evaluate ... --protocol full papers -f 0` then.\n", "--protocol has no choice 'papers'"),
    ("```\npython -m benchmarks.embed [--encoder vit_x] [--slices N]\n```\n", "--encoder has no choice 'vit_x'"),
])
def test_the_synopsis_check_catches_a_wrong_flag_or_choice(text, problem):
    [command] = commands(text, console_scripts())
    assert not command.complete and check(command) == problem


@pytest.mark.parametrize("text, module, problem", [
    ("```\npython -m benchmarks.grid_iou --thread 1\n```\n", "benchmarks.grid_iou", "unknown option --thread"),
    ("```\nmake demo ARGS=\"--checkpiont F\"\n```\n", "evaluation.demo",
     "unknown option --checkpiont; does not parse"),
    ("```\ntorchrun --nproc-per-node 2 -m plans.plan_and_embed --encoder tiny\n```\n",  # -d is required
     "plans.plan_and_embed", "does not parse"),
    ("```\nsrun -N 2 torchrun --nnodes 2 --rdzv-endpoint $(hostname | head -n1):29500 \\\n"
     "    -m desam_pipeline.training.train 1 0 --epoch 5\n```\n", "desam_pipeline.training.train",
     "unknown option --epoch"),
])
def test_a_module_run_with_dash_m_or_make_is_parsed(text, module, problem):
    """Abbreviated options parse (argparse takes a unique prefix) but are still reported."""
    [command] = commands(text, console_scripts())
    assert command.module == module and command.dash_m and command.complete and check(command) == problem


def test_the_checks_catch_a_missing_target_path_and_heading(tmp_path):
    with pytest.raises(AssertionError, match="not a Makefile target"):
        commands("```\nmake benchmark\n```\n", console_scripts())
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee `desam_pipeline/trainer.py`, `desam_pipeline.inference.predict_slices`,"
                    " [this](#title), [that](#nothing) and [there](missing.md).\n", encoding="utf-8")
    assert path_problems(page, tracked_paths()) == [
        "link to a missing heading: #nothing", "link to a missing file: missing.md",
        "no such path: desam_pipeline/trainer.py", "no such module or name: desam_pipeline.inference.predict_slices"]
