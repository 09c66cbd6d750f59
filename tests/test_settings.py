"""Every setting has one home: each command's flags default to its settings dataclass, the library's calls
default to the same dataclass, and no other module writes a setting's default as a literal of its own
(the check that would have caught `--grid-rule` defaulting to `reference` while the library used `top1`)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from desam_pipeline.inference import predict
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.training import train
from desam_pipeline.training.settings import TrainingSettings
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import DeviceSettings
from desam_pipeline.utilities.setting_flags import add_setting_flags, setting, settings_from_args
from evaluation import evaluate
from evaluation.settings import EvaluationSettings
from plans import plan_and_embed

REPO = Path(__file__).resolve().parents[1]
SETTINGS_CLASSES = (TrainingSettings, PredictionSettings, EvaluationSettings, DeviceSettings)
SETTINGS_MODULES = {"desam_pipeline/training/settings.py", "desam_pipeline/inference/settings.py",
                    "evaluation/settings.py", "desam_pipeline/utilities/runtime.py"}
SCANNED = ("desam_pipeline", "evaluation", "plans")
# A parameter that shares a setting's name but is another quantity, and why.
SAME_NAME_OTHER_MEANING = {
    ("desam_pipeline/inference/slice_prediction.py", "predict_slices", "precision"):
        "the resolved autocast precision of a call without a plan, not the --precision choice (auto)",
    ("desam_pipeline/network/prim.py", "train", "mode"): "torch's nn.Module.train(mode)",
}
# (command parser, the settings classes its flags come from; the first argv it accepts)
COMMANDS = {
    "desam_train": (train.build_parser, (TrainingSettings,), ["1", "0"]),
    "desam_predict": (predict.build_parser, (PredictionSettings,), ["-i", "in", "-o", "out", "-m", "model"]),
    "desam_evaluate": (evaluate.build_parser, (PredictionSettings, EvaluationSettings),
                       ["-d", "1", "--source", "RUNMC", "--mode", "grid"]),
    "desam_plan_and_embed": (plan_and_embed.build_parser, (DeviceSettings,), ["-d", "1"]),
}


def field_defaults(settings_class: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(settings_class) if f.default is not dataclasses.MISSING}


def flag_defaults(parser: argparse.ArgumentParser) -> dict:
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_flag_defaults_to_its_settings_field(command):
    build_parser, classes, _ = COMMANDS[command]
    flags = flag_defaults(build_parser())
    checked = 0
    for settings_class in classes:
        for name, default in field_defaults(settings_class).items():
            if name in flags:
                assert flags[name] == default, f"{command} --{name}: {flags[name]!r} != {default!r}"
                checked += 1
    assert checked >= 1 and "device" in flags


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_parsing_no_setting_flag_gives_the_library_defaults(command):
    build_parser, classes, argv = COMMANDS[command]
    args = build_parser().parse_args(argv)
    for settings_class in classes:
        assert settings_from_args(settings_class, args) == settings_class()


def test_evaluate_model_and_desam_evaluate_predict_with_the_same_settings():
    """The drift of issue #21: the library's default call and the command's must give the same masks."""
    args = evaluate.build_parser().parse_args(COMMANDS["desam_evaluate"][2])
    library = inspect.signature(evaluate.evaluate_model).parameters["settings"].default
    assert evaluate.settings_of(args) == library == EvaluationSettings()
    assert library.prediction.grid_rule == "reference"


def test_plan_and_embed_takes_the_flag_defaults():
    flags = flag_defaults(plan_and_embed.build_parser())
    parameters = inspect.signature(plan_and_embed.plan_and_embed).parameters
    shared = [name for name, parameter in parameters.items()
              if name in flags and parameter.default is not inspect.Parameter.empty]
    assert {"device", "encoder", "slices", "batch_size"} <= set(shared)
    for name in shared:
        assert parameters[name].default == flags[name], name


def test_a_setting_field_becomes_a_flag_and_back():
    @dataclasses.dataclass(frozen=True)
    class Example:
        size: int = setting(3, type=int, help="size (default: %(default)s)")
        names: tuple[str, ...] = setting(("a",), flags=("-n", "--names"), nargs="+")
        quiet: bool = setting(True, flags=("--loud",), action="store_false")
        hidden: float = 0.5

    parser = argparse.ArgumentParser()
    add_setting_flags(parser, Example)
    assert "size (default: 3)" in parser.format_help() and "--hidden" not in parser.format_help()
    assert settings_from_args(Example, parser.parse_args([])) == Example()
    given = settings_from_args(Example, parser.parse_args(["--size", "5", "-n", "x", "y", "--loud"]), hidden=1.0)
    assert given == Example(size=5, names=("x", "y"), quiet=False, hidden=1.0)
    with pytest.raises(ValueError, match="no flag field"):
        add_setting_flags(parser, Example, names=["hidden"])


@pytest.mark.parametrize("settings, message", [
    (PredictionSettings(grid=0), "--grid must be at least 1"),
    (PredictionSettings(iou_threshold=float("nan")), "--iou-threshold must be a finite number or calibrated"),
    (PredictionSettings(iou_threshold="high"), "--iou-threshold must be a finite number or calibrated, got 'high'"),
    (PredictionSettings(grid_rule="vote"), "unknown --grid-rule 'vote'"),
    (PredictionSettings(batch_size=0), "--batch-size must be at least 1"),
    (PredictionSettings(checkpoint_name="last"), "unknown checkpoint name 'last'"),
    (EvaluationSettings(nsd_tolerance=-1.0), "--nsd-tolerance must be >= 0"),
    (EvaluationSettings(protocols=("pixel",)), "unknown protocol"),
    (EvaluationSettings(prediction=PredictionSettings(postprocess="blur")), "unknown --postprocess 'blur'"),
])
def test_out_of_range_settings_are_one_line_errors(settings, message):
    with pytest.raises(DesamError, match=message):
        settings.validate()


# ---------------------------------------------------------------- no second home
def setting_names() -> set[str]:
    return {f.name for settings_class in SETTINGS_CLASSES for f in dataclasses.fields(settings_class)}


def is_literal(node: ast.AST) -> bool:
    """A default written out (a number, string, bool or a tuple/list of them), not a name or None."""
    if isinstance(node, ast.Constant):
        return node.value is not None
    if isinstance(node, ast.UnaryOp):
        return is_literal(node.operand)
    return isinstance(node, (ast.Tuple, ast.List)) and bool(node.elts) and all(map(is_literal, node.elts))


def is_torch_device(annotation: ast.AST | None) -> bool:
    """A `device: torch.device` parameter places tensors; the user's --device choice is a string."""
    return annotation is not None and "torch.device" in ast.unparse(annotation)


def flag_dest(call: ast.Call) -> str | None:
    keywords = {k.arg: k.value for k in call.keywords}
    if "dest" in keywords:
        return keywords["dest"].value if isinstance(keywords["dest"], ast.Constant) else None
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return max(flags, key=len).lstrip("-").replace("-", "_") if flags else None


def literal_defaults(source: str) -> list[tuple[int, str, str, str]]:
    """(line, owner, name, default) of every literal default in `source`: function parameters, class fields,
    `add_argument(..., default=)` flags and `mapping.get(key, default)` fall-backs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
            pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
            found += [(node.lineno, node.name, a.arg, ast.unparse(d)) for a, d in pairs
                      if is_literal(d) and not (a.arg == "device" and is_torch_device(a.annotation))]
        elif isinstance(node, ast.ClassDef):
            found += [(s.lineno, node.name, s.target.id, ast.unparse(s.value)) for s in node.body
                      if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None
                      and is_literal(s.value)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            keywords = {k.arg: k.value for k in node.keywords}
            if node.func.attr == "add_argument" and "default" in keywords and is_literal(keywords["default"]):
                found.append((node.lineno, "add_argument", flag_dest(node) or "", ast.unparse(keywords["default"])))
            elif node.func.attr == "get" and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) \
                    and is_literal(node.args[1]):
                found.append((node.lineno, ".get", str(node.args[0].value), ast.unparse(node.args[1])))
    return found


def test_no_setting_default_is_written_outside_its_settings_module():
    names = setting_names()
    violations = []
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative in SETTINGS_MODULES:
                continue
            violations += [f"{relative}:{line}: {owner}({name}={default})"
                           for line, owner, name, default in literal_defaults(path.read_text(encoding="utf-8"))
                           if name in names and (relative, owner, name) not in SAME_NAME_OTHER_MEANING]
    assert not violations, "defaults with a second home:\n" + "\n".join(violations)


def test_the_check_sees_the_drift_it_is_for():
    """Today's-bug shapes: a library default, a flag default and a fall-back, each a literal of its own."""
    drift = '''
def predict_slices(net, grid_rule: str = "top1", grid=9): ...

@dataclass
class Settings:
    iou_threshold: float = 0.5

parser.add_argument("--grid-rule", choices=GRID_RULES, default="reference")
rule = record.get("grid_rule", "top1")
fine = predict(grid_rule=DEFAULT_GRID_RULE, device=None)
def place(x, device: torch.device = "cpu"): ...
'''
    found = {(owner, name) for _, owner, name, _ in literal_defaults(drift) if name in setting_names()}
    assert found == {("predict_slices", "grid_rule"), ("predict_slices", "grid"), ("Settings", "iou_threshold"),
                     ("add_argument", "grid_rule"), (".get", "grid_rule")}
