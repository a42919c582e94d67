"""Every command in the README exists, with every option it is shown with.

The README's shell blocks are the user's first contact with the tool; a renamed command or option must
fail here, not in a new user's terminal. The two set-up commands (`make demo`, `make test`) are run for real
by `.ci/run` and `tests/test_demo.py`; the long-running commands (training on the real data) are checked
against their `--help` here and run for real in the slow tests of their stages.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bloodcell.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
# Words after `bloodcell` that name a command (a group such as `data` takes one more word).
GROUPS = {"data"}


def readme_commands() -> list[list[str]]:
    """The `bloodcell ...` invocations in the README's shell code blocks, as argument lists."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip().lstrip("$ ").strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            names = [Path(word).name for word in words]  # `.venv/bin/bloodcell` counts too
            if "bloodcell" in names:
                commands.append(words[names.index("bloodcell") + 1 :])
    return commands


def command_path(args: list[str]) -> list[str]:
    if args and args[0] in GROUPS:
        return args[:2]
    return args[:1]


def test_readme_shows_bloodcell_commands() -> None:
    commands = readme_commands()
    assert len(commands) >= 10, "the README should show the main commands"
    shown = {tuple(command_path(c)) for c in commands}
    for expected in [("demo",), ("train",), ("evaluate",), ("predict",), ("serve",), ("export",)]:
        assert expected in shown, f"README does not show `bloodcell {expected[0]}`"


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_and_options_exist(args: list[str]) -> None:
    path = command_path(args)
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=240, env={"COLUMNS": "240"})
    assert result.exit_code == 0, f"`bloodcell {' '.join(path)}` is not a command:\n{result.output}"
    # The whole line as shown, with --help: the parser must accept every option and its value (a renamed
    # option exits 2 with "No such option"); --help then stops it before any work or any file is read.
    shown = CliRunner().invoke(app, [*args, "--help"], terminal_width=240, env={"COLUMNS": "240"})
    assert shown.exit_code == 0, f"`bloodcell {' '.join(args)}` is refused by the parser:\n{shown.output}"


def test_readme_names_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci, ".ci/run must run the README's test command"


def config_keys(model: type, prefix: str = "") -> list[str]:
    """Every key of a config model, dotted (``data.root``), its sections walked into."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_training_doc_lists_every_config_key() -> None:
    """docs/TRAINING.md's key tables are the config reference: a new key must be documented there."""
    from bloodcell.config import RunConfig

    text = (README.parent / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    # The names in the first cell of every table row: augment's by their bare names, the others dotted.
    first_cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([\w.]+)`", cell)}
    keys = config_keys(RunConfig)
    assert len(keys) > 50 and "data.root" in keys and "augment.hue" in keys
    missing = [key for key in keys if key.removeprefix("augment.") not in documented]
    assert missing == []
