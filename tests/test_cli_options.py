"""One spelling for one thing across commands: the same option means the same flag everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer

from bloodcell.cli import app


# Typer 0.29 carries its own copy of click, so commands are told apart by what they have, not their class.
def commands(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def options_of(command: Any) -> list[Any]:
    return [p for p in command.params if type(p).__name__.endswith("Option")]


def test_every_out_option_also_answers_to_o() -> None:
    found = {}
    for name, command in commands(typer.main.get_command(app)):
        for option in options_of(command):
            if "--out" in option.opts:
                found[name] = option.opts
    assert len(found) >= 10, found  # train, evaluate, explain, predict, export, demo, audit, tune, lr-find, index ...
    assert {name: opts for name, opts in found.items() if "-o" not in opts} == {}


def test_the_cam_method_has_the_same_flag_in_explain_as_in_evaluate() -> None:
    cli = typer.main.get_command(app)
    named = dict(commands(cli))
    for name in ("explain", "evaluate"):
        assert any("--cam-method" in option.opts for option in options_of(named[name])), name


def test_help_gives_flags_no_value_type() -> None:
    """A flag takes no value: ``--tta <bool>`` read as if ``--tta true`` were the way to write it."""
    from typer.testing import CliRunner

    runner = CliRunner()
    names = [name for name, _ in commands(typer.main.get_command(app))]
    for name in names:
        result = runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.output)
        assert "<bool>" not in result.output, name
    predict = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    assert "<int range>" in predict and "--tta" in predict  # other types are still shown


def _rendered(tables: list[Any]) -> str:
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=200)
    for table in tables:
        console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_evaluate_names_the_part_the_shortcut_baseline_was_scored_on_when_it_is_another() -> None:
    """With --split all the border-colour baseline scores the test part only: its number stood beside the
    model's, on every image, as if of the same images."""
    from bloodcell.cli.evaluate import summary_tables

    metrics: dict[str, Any] = {
        "model": {"architecture": "bloodnet"}, "data": {"root": "/data/aria", "n_blocks": 8}, "n_images": 80,
        "evaluation": {"split": "all"}, "balanced_accuracy": 0.9, "balanced_accuracy_ci": [0.8, 1.0],
        "accuracy": 0.9, "macro_f1": 0.9, "roc_auc_macro": 0.95, "ece": 0.05, "ece_after_temperature": 0.04,
        "temperature": 1.2, "temperature_source": "model card", "per_class": {}, "roc_auc": {},
        "shortcut_baseline": {"balanced_accuracy": 0.7, "verdict": "moderate", "scored_on": "test",
                              "n_test": 23},
    }  # fmt: skip
    assert "border-colour shortcut (test part, 23 images)" in _rendered(summary_tables(metrics))
    metrics["evaluation"]["split"] = "test"
    shown = _rendered(summary_tables(metrics))
    assert "border-colour shortcut " in shown and "(test part" not in shown  # scored on the evaluated images
