"""``bloodcell lr-find`` and ``bloodcell tune``: parse options, call :mod:`bloodcell.tune`, print."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Literal

import typer

from bloodcell.cli import app
from bloodcell.cli.messages import warning_line
from bloodcell.cli.train import DataByOption
from bloodcell.errors import UserError

_DATA_HELP = "Dataset folder (Aria layout, the Kaggle 4-class copy, or one folder per class)."
_CONFIG_HELP = "Base config: a shipped name (default, ...) or a YAML file."
_SET_HELP = "Override a config key, e.g. --set train.epochs=5 (repeatable)."


@app.command("lr-find", cls=DataByOption)
def lr_find_command(
    data: Path = typer.Option(..., "--data", help=_DATA_HELP),
    config: str = typer.Option("default", "--config", "-c", help=_CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=_SET_HELP),
    steps: int = typer.Option(200, "--steps", min=10, help="Optimizer steps in the sweep."),
    start_lr: float = typer.Option(1e-6, "--start-lr", help="First learning rate of the sweep."),
    end_lr: float = typer.Option(1.0, "--end-lr", help="Last learning rate of the sweep."),
    method: Literal["min-loss", "steepest"] = typer.Option(
        "min-loss", "--method", help="Suggestion rule: min-loss (minimum / 10) or steepest."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the plot and table (default runs/lr-find-CONFIG-NAME)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Learning-rate range test: sweep the learning rate exponentially, plot the loss, suggest a value.

    With the default sweep (--steps, --start-lr, --end-lr, --method), the suggestion is what `bloodcell
    train --set optimizer.lr=auto` would use.
    """
    from bloodcell.config import load_config
    from bloodcell.tune.lr_find import run_lr_find

    run_config = load_config(config, list(overrides))
    result = run_lr_find(
        run_config,
        data,
        out,
        start_lr=start_lr,
        end_lr=end_lr,
        num_steps=steps,
        method=method.replace("-", "_"),
    )
    if as_json:
        typer.echo(json.dumps(result.summary()))
        return
    typer.echo(
        f"suggested learning rate: {result.suggested_lr:.3g} ({result.method.replace('_', '-')} rule; "
        f"minimum-loss lr {result.min_loss_lr:.3g}, steepest-descent lr {result.steepest_lr:.3g})"
    )
    typer.echo(
        f"swept {result.lrs[0]:.3g} .. {result.lrs[-1]:.3g} in {len(result.lrs)} steps"
        + (" (stopped early: the loss diverged)" if result.diverged else "")
    )
    if result.plot_path:
        typer.echo(f"plot: {result.plot_path}")
    wider_start = f"{result.lrs[0] / 100:.3g}"
    if result.loss_never_fell:
        warning_line(f"the loss never fell: {result.suggested_lr:.3g} is only the lowest rate swept; widen the sweep "
                     f"downwards (--start-lr {wider_start})")
    elif result.clipped_to_the_floor:
        warning_line(f"the rule's rate lies below the sweep: {result.suggested_lr:.3g} is only the lowest rate swept; "
                     f"widen the sweep downwards (--start-lr {wider_start})")
    settings = ([] if config == "default" else ["--config", config]) + [a for o in overrides for a in ("--set", o)]
    if result.loss_never_fell or result.clipped_to_the_floor:
        # The floor of the sweep is no rate to train with: offer the same sweep, widened downwards, instead.
        sweep = ["--steps", str(steps), "--end-lr", f"{end_lr:.3g}", "--method", method,
                 *(["--out", str(out)] if out else [])]  # fmt: skip
        command = ["bloodcell", "lr-find", "--data", str(data), *settings, *sweep, "--start-lr", wider_start]
        typer.echo("sweep again: " + shlex.join(command))
        return
    # The command that trains what was swept: the same config and overrides, with the suggested rate.
    command = ["bloodcell", "train", "--data", str(data), *settings, "--set", f"optimizer.lr={result.suggested_lr:.3g}"]
    typer.echo("use it: " + shlex.join(command))


@app.command("tune", cls=DataByOption)
def tune_command(
    data: Path = typer.Option(..., "--data", help=_DATA_HELP),
    trials: int = typer.Option(
        ..., "--trials", min=1, help="Size of the whole study (complete + pruned trials, all workers)."
    ),
    config: str = typer.Option("default", "--config", "-c", help=_CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=_SET_HELP),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="Optuna storage URL (default: SQLite file study.db in --out); e.g. postgresql+psycopg://user:pw@host/db (pip install -e '.[postgres]').",
    ),
    study: str | None = typer.Option(None, "--study", help="Study name (default: the config's name)."),
    timeout: float | None = typer.Option(None, "--timeout", min=0.0, help="Seconds after which no new trial starts."),
    cv: int | None = typer.Option(None, "--cv", min=2, help="Objective = mean over K folds of the kfold protocol."),
    pruner: Literal["median", "hyperband", "none"] = typer.Option("median", "--pruner", help="median, hyperband or none."),
    space: Path | None = typer.Option(
        None, "--space", help="YAML file narrowing the search space (see docs/TUNING.md)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the TPE sampler (one worker only)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Tuning folder (default runs/tune-STUDY)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Search hyperparameters with Optuna; rerun with the same storage to continue an interrupted study."""
    from bloodcell.cli import say_interrupted  # defined after the commands are registered
    from bloodcell.config import load_config
    from bloodcell.data.layouts import find_dataset
    from bloodcell.tune.search import load_space, overrides_the_search_replaces, shown_storage, tune

    run_config = load_config(config, list(overrides))
    search_space = load_space(space)
    # Before the study is created: a mistyped --data, or a folder of one class, must not leave a study
    # holding a failed trial.
    dataset = find_dataset(data, run_config.data.variant, run_config.data.class_names)
    if len(dataset.classes) < 2:
        raise UserError(f"a classifier needs at least two classes; {data} has {len(dataset.classes)}: "
                        f"{', '.join(dataset.classes)}")  # fmt: skip
    for override, name in overrides_the_search_replaces(list(overrides), search_space):
        warning_line(f"--set {override} is replaced in every trial: the search space searches {name} (give --space "
                     f"with {name}: null to keep it)")  # fmt: skip
    try:
        result = tune(run_config, data, trials, out_dir=out, storage=storage, study_name=study, timeout=timeout,
                      cv=cv, space=search_space, pruner=pruner, seed=seed)  # fmt: skip
    except KeyboardInterrupt:
        say_interrupted("run the same command again to continue the study")
        raise
    summary = {
        "study": result.study_name,
        "storage": shown_storage(result.storage),  # a database password is never printed
        "out": str(result.out_dir),
        "complete": result.n_complete,
        "pruned": result.n_pruned,
        "failed": result.n_failed,
        "best_trial": result.best_trial,
        "best_run_dir": str(result.best_run_dir) if result.best_run_dir else None,
        "best_val_balanced_accuracy": result.best_value,
        "best_params": result.best_params,
        "best_config": str(result.best_config_path) if result.best_config_path else None,
        "trials_table": str(result.trials_path),
        "report": str(result.report_path) if result.report_path else None,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"study {result.study_name!r}: {result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed"
    )
    if result.best_value is None:
        typer.echo("no trial has completed yet; rerun with the same --storage/--study to continue")
        return
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items()
    )
    # The run folder is named too: a retried trial trains in the folder of the trial it retries.
    typer.echo(f"best: trial {result.best_trial}, val balanced accuracy {result.best_value:.4f} ({params}); "
               f"run folder {result.best_run_dir}")  # fmt: skip
    typer.echo(
        f"best config: {result.best_config_path}  ->  bloodcell train --data {data} --config {result.best_config_path}"
    )
    typer.echo(f"trials: {result.trials_path}   report: {result.report_path}")
