"""constraints.txt pins every package setup.py asks for, inside setup.py's range, and leaves torch and
torchvision to the Makefile's pair: a fresh clone's `make install` then builds the environment the documented
figures were measured with (another numpy alone moved the demo's unseen Dice by 0.13)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def setup_requirements() -> list[Requirement]:
    """install_requires and every extra of setup.py's setup() call (read from the file, not the installed
    metadata, which an editable install leaves stale)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    found = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return [Requirement(r) for r in found["install_requires"] + sum(found["extras_require"].values(), [])]


def pinned(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and blank lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_requirement_is_pinned_once_and_within_setup_pys_range():
    constraints = pinned((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    torch_pair = dict(re.findall(r"(torch\w*)==(\S+)", re.search(r"^TORCH_PAIR := (.*)$",
                                 (ROOT / "Makefile").read_text(encoding="utf-8"), re.M).group(1)))
    assert set(torch_pair) == {"torch", "torchvision"} and not set(torch_pair) & set(constraints)
    pins = {**constraints, **torch_pair}
    requirements = setup_requirements()
    assert {"numpy", "torch", "nnunetv2", "pytest"} <= set(pins) and len(requirements) >= 20
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside setup.py's {requirement.specifier}"


def test_the_makefile_installs_with_the_constraints():
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = re.findall(r"^\t\$\(PY\) -m pip install -q (?!--upgrade pip)(.*)$", recipe, re.M)
    assert len(installs) == 2 and all(line.startswith("-c constraints.txt ") for line in installs)
    assert re.search(r"^\.venv/\.installed: .*constraints\.txt", recipe, re.M)
