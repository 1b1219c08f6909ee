"""Every `python <script>.py --flags` or `... -m <package> --flags` line of scripts/**/*.sh parses with that
script's own parser (a package's is its `__main__.py`'s `build_parser`)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = sorted((REPO / "scripts").rglob("*.sh"))


def _commands(script: Path) -> list[tuple[str, list[str]]]:
    """(script, flags) of every stage call: `python x.py ...`, `accelerate launch ... x.py ...`,
    `"${LAUNCH[@]}" x.py ...` (a launcher kept in a bash array), or a module run as `python -m pkg ...`,
    `torchrun ... -m pkg ...`, `accelerate launch ... -m pkg ...` (mapped to pkg/__main__.py or pkg.py)."""
    text = script.read_text().replace("\\\n", " ")  # join continuation lines
    text = re.sub(r"\$\{\w+\[@\]\}", "python", text)  # "${LAUNCH[@]}" -> the plain launcher
    # Shell variables take the value the recipe gives them (`X=${X:-default}`, `X=value`, the first
    # item of `for X in a b c`); others become "1", a value most flag types accept.
    values = {}
    for name, default in re.findall(r"^(\w+)=\$\{\w+:-\"?([^}\"]*)\"?\}", text, flags=re.M):
        values[name] = default.split()[0] if default.split() else ""  # empty: the word disappears
    for name, value in re.findall(r"^(\w+)=([^\s$]+)\s*$", text, flags=re.M):
        values.setdefault(name, value.strip("\"'"))
    for name, items in re.findall(r"for (\w+) in ([^;]+); do", text):
        first = shlex.split(items)[0]
        looked_up = re.fullmatch(r"\$\{?(\w+)\}?", first)  # `for X in $LIST`: the list's first item
        values.setdefault(name, (values.get(looked_up[1]) or "1").split()[0] if looked_up else first)
    text = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], "1"), text)
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        # A redirection ("> /dev/null", "2>&1") or "&" (a stage started in the background) ends the command's own
        # words; leading environment assignments ("OMP_NUM_THREADS=1 python ...") are not part of them.
        words = words[: next((i for i, w in enumerate(words) if re.fullmatch(r"\d?>>?(&\d)?|<|&", w)), len(words))]
        words = words[next((i for i, w in enumerate(words) if not re.fullmatch(r"\w+=\S*", w)), len(words)) :]
        if not words or words[0] not in ("python", "python3", "accelerate", "torchrun"):
            continue
        module = next((i + 1 for i, w in enumerate(words[:-1]) if w in ("-m", "--module")), None)
        if module is not None:
            package = words[module].replace(".", "/")
            target = f"{package}/__main__.py" if (REPO / package).is_dir() else f"{package}.py"
            found.append((target, words[module + 1 :]))
            continue
        stage = next((i for i, w in enumerate(words) if re.fullmatch(r"[\w./-]+\.py", w)), None)
        if stage is not None:
            found.append((words[stage], words[stage + 1 :]))
    return found


def _load_parser(relative: str):
    path = REPO / relative
    assert path.is_file(), f"recipe calls {relative}, which does not exist"
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_scripts_exist():
    assert REPO / "scripts" / "demo.sh" in SHELL_SCRIPTS


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_flags_parse(script):
    commands = _commands(script)
    assert commands, f"{script} runs no python stage"
    for target, flags in commands:
        _load_parser(target).parse_args(flags)  # SystemExit(2) on an unknown or malformed flag


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_is_strict_bash(script):
    assert "set -euo pipefail" in script.read_text()
