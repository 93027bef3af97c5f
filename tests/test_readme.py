"""The README's commands, as a user copies them (issue 13): each is one line under 160
characters, each experiment command names a config file and preset that exist, and each
console command of its code blocks is run by a test (tests/test_cli_subprocess.py runs them as
subprocesses; the experiments' smoke presets run the experiments)."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands() -> list[str]:
    cmds: list[str] = []
    for lang, block in re.findall(r"```([a-z]*)\n(.*?)```", README, re.S):
        if lang not in ("", "bash", "sh", "console", "text"):
            continue  # python examples are code, not commands
        cur = ""
        for line in block.splitlines():
            line = line.split("  # ")[0].rstrip()
            cur += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                if cur.strip() and not cur.strip().startswith("#"):
                    cmds.append(cur.strip())
                cur = ""
    inline = re.findall(r"`((?:python -m (?:experiments|fgloc)|fgloc )[^`]*)`", README)
    return cmds + [c for c in inline if "…" not in c]  # "python -m experiments.…": a table header


COMMANDS = _commands()
EXPERIMENTS = [c for c in COMMANDS if c.startswith("python -m experiments.")]


def test_readme_has_the_two_commands_and_ci_runs_the_second():
    setup = [c for c in COMMANDS if ".venv/bin/fgloc demo" in c]
    tests = [c for c in COMMANDS if c == "bash scripts/test.sh"]
    assert len(setup) == 1 and len(tests) == 1, COMMANDS
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_fits_on_one_line(command):
    assert len(command) < 160, command


@pytest.mark.parametrize("command", EXPERIMENTS)
def test_experiment_commands_name_existing_modules_and_presets(command):
    argv = shlex.split(command)
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, module
    if "--config" in argv:
        path, _, preset = argv[argv.index("--config") + 1].partition(":")
        assert (ROOT / path).is_file(), path
        name = pathlib.Path(path).stem
        cfg = importlib.import_module(f"experiments.configs.{name}")
        cfg.get_config(preset or None)  # raises for an unknown preset


def test_console_commands_of_the_code_blocks_are_run_by_subprocess_tests():
    """Each `fgloc …` / `python -m fgloc…` form in a README code block appears in
    tests/test_cli_subprocess.py, which runs it as a user would."""
    tests = (ROOT / "tests" / "test_cli_subprocess.py").read_text(encoding="utf-8")
    forms = {"fgloc demo": '"demo"', "fgloc localize": '"localize"', "python -m fgloc.data.cub": '"fgloc.data.cub"'}  # fmt: skip
    for command in COMMANDS:
        for form, token in forms.items():
            if form in command:
                assert token in tests, (form, command)
