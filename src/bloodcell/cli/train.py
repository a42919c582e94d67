"""``bloodcell train``: parse options, call :func:`bloodcell.train.train_run`, build the report, print a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from bloodcell.cli import app
from bloodcell.cli.messages import warning_line
from bloodcell.config import RunConfig, named_configs
from bloodcell.errors import UserError


class DataByOption(TyperCommand):
    """A command that takes its dataset as ``--data DATA`` only: ``bloodcell train DATA`` (as index, split and
    audit take it) is answered with how to give it, not with Click's bare "unexpected extra argument"."""

    # ctx is click's Context, which typer >= 0.2x keeps in a private copy of click (typer._click): Any, not
    # an import of either, for every typer this project allows.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # Looked at before Click checks the options: a required --data would be said missing first.
        _, positional, _ = self.make_parser(ctx).parse_args(args=list(args))
        if positional:
            given = " ".join(positional)
            raise UserError(f"unexpected argument {given!r}: pass the dataset as --data {given}")
        return super().parse_args(ctx, args)


DATA_OPTION = typer.Option(
    None, "--data", help="Dataset folder (Aria layout, the Kaggle 4-class copy, or one folder per class). "
    "Needed for a new run unless the config sets data.root; --resume takes it from the run's config.", show_default=False
)  # fmt: skip
CONFIG_OPTION = typer.Option(
    "default", "--config", "-c", help=f"A shipped config name ({', '.join(named_configs())}) or a YAML file."
)
SET_OPTION = typer.Option(
    [], "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.epochs=5 (repeatable)."
)
OUT_OPTION = typer.Option(
    None, "--out", "-o", help="Run directory (default runs/NAME, NAME the config's name: key).", show_default=False
)
RESUME_OPTION = typer.Option(
    None, "--resume", help="Continue the run in this directory from its last checkpoint (after Ctrl-C or a kill), "
    "with its own config.yaml (not with --config or --out).",
    show_default=False,
)  # fmt: skip
DEVICES_OPTION = typer.Option(
    None, "--devices", help="Devices (GPUs, or CPU processes) for data-parallel training: a number or 'auto'. "
    "Under torchrun or SLURM the launcher's process count is used.", show_default=False
)  # fmt: skip
PRETRAINED_OPTION = typer.Option(False, "--pretrained", help="Start a timm/NAME model from timm's published weights.")
WEIGHTS_OPTION = typer.Option(
    None, "--weights", help="Initialise the network from a safetensors (or weights-only .pth) file, or a bloodcell "
    "model directory.", show_default=False
)
REPORT_OPTION = typer.Option(
    True, "--report/--no-report", help="Evaluate the run and build its HTML report at the end (--no-report skips both)."
)
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress", help="Draw the progress bar on stderr.")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object (the run's summary) instead of text.")


@app.command("train", cls=DataByOption)
def train_command(
    data: Path | None = DATA_OPTION,
    config: str = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
    resume: Path | None = RESUME_OPTION,
    devices: str | None = DEVICES_OPTION,
    pretrained: bool = PRETRAINED_OPTION,
    weights: Path | None = WEIGHTS_OPTION,
    report: bool = REPORT_OPTION,
    progress: bool = PROGRESS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a model: writes config.yaml, history.csv, checkpoints/best and last, train.log (and the report).

    With data.train_on=train+val (the default config) the recipe is first trained on train alone in
    RUN/holdout (validation scores, temperature), then refit on train + val: that model is the run's.
    """
    from bloodcell.config import load_config, override
    from bloodcell.data.layouts import find_dataset
    from bloodcell.train import train_run
    from bloodcell.train.checkpoint import completed_epochs, is_complete
    from bloodcell.train.loop import resumed_config
    from bloodcell.train.run import HOLDOUT_DIR, training_lock
    from bloodcell.train.setup import launch_topology

    extra = list(overrides)
    if data is not None:
        extra.append(override("data.root", data.resolve()))
    if devices is not None:
        extra.append(f"train.devices={devices}")
    if pretrained:
        extra.append("model.pretrained=true")
    if weights is not None:
        extra.append(override("model.weights", weights.resolve()))

    complete = False  # a resumed run with nothing left to train
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise UserError(f"--out {out} with --resume {resume}: a resumed run continues in its own folder")
        if config != CONFIG_OPTION.default:
            raise UserError(f"--config {config} with --resume: a resumed run keeps the config.yaml it started with")
        if not (resume / "config.yaml").is_file():
            raise UserError(f"{resume}: not a run directory (no config.yaml); give the folder train wrote")
        run_config = load_config(str(resume / "config.yaml"), extra)
        recorded = run_config.data.root
        if data is None and recorded is not None and not Path(recorded).exists():
            raise UserError(f"the run's training data are no longer at {recorded} (the folder its config.yaml "
                            "records): pass --data DATA where they are now")  # fmt: skip
        run_dir = resume
    else:
        run_config = load_config(config, extra)
        if data is None and run_config.data.root is not None:  # the config's dataset, relative to here
            data = Path(run_config.data.root)
            run_config = load_config(config, [*extra, override("data.root", data.resolve())])
        if data is None:
            raise UserError("pass --data DATA (the dataset folder), set data.root in the config, or --resume RUN")
        # Before a run folder is made or anything is announced: missing, not a folder, empty, no class folders.
        classes = find_dataset(data, run_config.data.variant, run_config.data.class_names).classes
        if run_config.model.weights and not Path(run_config.model.weights).exists():  # before any folder is made
            raise UserError(f"initial weights not found: {run_config.model.weights} (--weights, model.weights)")
        run_dir = out if out is not None else Path("runs") / run_config.name
        _refuse_nested(run_dir, data)
        _say_classes(classes, data)
    if devices is not None:
        _say_where_devices_run(run_config)
    launch_topology(run_config.train)  # a SLURM job script run without srun is refused before any work

    # The folder's lock before its checkpoints are even looked at (another process may be writing them; the
    # look completes an interrupted checkpoint swap), held until the report is built from them.
    holdout_complete = False  # the same for a resumed run's holdout stage
    with training_lock(run_dir):
        if resume is not None:
            resumed_config(run_dir, run_config)  # a changed config is refused before anything is said of the run
            done = completed_epochs(run_dir)
            complete = is_complete(run_dir, run_config.train.epochs)
            holdout_complete = complete or is_complete(run_dir / HOLDOUT_DIR, run_config.train.epochs)
            if done is not None and complete:  # (done is known then; said for the type checker)
                warning_line(f"{run_dir} is already complete ({done[0]} of {run_config.train.epochs} epochs"
                             + (f", stopped by {done[1].replace('_', ' ')}" if done[1] else "")
                             + "): nothing is trained again" + ("; its report is rebuilt" if report else ""))  # fmt: skip
            else:
                _warn_of_other_threads(run_dir, run_config)
                if run_config.data.root is not None:
                    data_root = Path(run_config.data.root)
                    _say_classes(find_dataset(data_root, run_config.data.variant, run_config.data.class_names).classes,
                                 data_root)  # fmt: skip
        try:
            result = train_run(run_config, run_dir, resume=resume is not None, progress=progress and not as_json)
        except KeyboardInterrupt:
            _say_how_to_resume(run_dir, run_config, devices)
            raise
        if not result.is_main_process:
            return
        report_path = _build_report(result.run_dir, progress and not as_json) if report else None
    validated = result.holdout or result  # a refit has no validation part of its own
    summary = {
        "run_dir": str(result.run_dir),
        "trained_on": run_config.data.train_on,
        "best_val_balanced_accuracy": validated.best_val_balanced_accuracy,
        "best_epoch": validated.best_epoch,
        "last_val_balanced_accuracy": validated.history[-1].get("val_balanced_accuracy") if validated.history else None,
        "epochs": len(result.history),
        "stopped": result.stopped,
        "seconds": round(result.seconds + (result.holdout.seconds if result.holdout else 0.0), 1),
        "holdout_seconds": round(result.holdout.seconds, 1) if result.holdout else None,
        "report": str(report_path) if report_path else None,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    def took(seconds: float, trained_before: bool) -> str:  # this command's seconds: none for a stage done before
        return "trained before" if trained_before else f"{seconds:.0f} s"

    if result.holdout:
        typer.echo(
            f"holdout (train only): val balanced accuracy {summary['last_val_balanced_accuracy']:.4f} at the last "
            f"epoch, best {validated.best_val_balanced_accuracy:.4f} at epoch {validated.best_epoch} "
            f"({took(result.holdout.seconds, holdout_complete)})"
        )
        typer.echo(f"refit on train + val: {len(result.history)} epochs ({took(result.seconds, complete)})")
    else:
        typer.echo(
            f"best val balanced accuracy {result.best_val_balanced_accuracy:.4f} at epoch {result.best_epoch} "
            f"({len(result.history)} epochs, {result.stopped}, {took(result.seconds, complete)})"
        )
    typer.echo(f"run: {result.run_dir}  (best model: {result.run_dir / 'checkpoints' / 'best'})")
    evaluated = result.run_dir / "metrics.json"  # the report's evaluation of the held-out part
    if report_path and evaluated.is_file():
        metrics = json.loads(evaluated.read_text())
        low, high = metrics["balanced_accuracy_ci"]
        typer.echo(f"{metrics['evaluation']['split']} part: balanced accuracy {metrics['balanced_accuracy']:.3f} "
                   f"(95 % CI {low:.3f}-{high:.3f}), {metrics['n_images']} images")  # fmt: skip
    if report_path:
        typer.echo(f"report: {report_path}")


def _say_how_to_resume(run_dir: Path, run_config: RunConfig, devices: str | None) -> None:
    """The command that continues an interrupted run, said once (by the first process): with the processes it
    ran in, since a resume in another number of them is refused."""
    from bloodcell.train.run import is_first_process
    from bloodcell.train.setup import launch_topology

    if not is_first_process():
        return
    per_node, nodes = launch_topology(run_config.train)  # torchrun's or srun's processes, else the config's
    by_launcher = (per_node, nodes) != (run_config.train.devices, 1)
    launched = (per_node if isinstance(per_node, int) else 1) * nodes
    command = f"bloodcell train --resume {run_dir}" + (f" --devices {devices}" if devices is not None else "")
    how = f" (launched as this run was, in {launched} processes)" if by_launcher and launched > 1 else ""
    from bloodcell.cli import say_interrupted

    say_interrupted(f"continue with: {command}{how}")


def _refuse_nested(run_dir: Path, data: Path) -> None:
    """Refuse a run folder inside the dataset (its report's images would become a class of the next run on
    it, and its files images of the dataset), or a dataset inside the run folder."""
    run, dataset = run_dir.expanduser().resolve(), data.expanduser().resolve()
    if run.is_relative_to(dataset):
        raise UserError(f"--out {run_dir} lies inside the dataset folder {data}: its files would join the dataset; "
                        "give a run folder outside it")  # fmt: skip
    if dataset.is_relative_to(run):
        raise UserError(f"--out {run_dir} holds the dataset folder {data}; give a run folder outside it")


def _say_classes(classes: tuple[str, ...], data: Path) -> None:
    """Name the classes the run trains on, once (by the first process): a class folder lost in a failed
    copy shows here, not only in train.log's count."""
    from bloodcell.io import terminal_text
    from bloodcell.train.run import is_first_process

    if is_first_process():  # names as text a terminal shows, never acts on
        typer.echo(f"{len(classes)} classes in {terminal_text(data)}: {', '.join(map(terminal_text, classes))}", err=True)


def _warn_of_other_threads(run_dir: Path, run_config: RunConfig) -> None:
    """A resume may take another thread count (a runtime choice, never refused), but the floating-point sums,
    and so the weights, then differ from the uninterrupted run's: say so. The count that trained is the one
    recorded in the ``last`` checkpoint of the stage that continues (the refit's, else the holdout's)."""
    from bloodcell.machine import available_cores
    from bloodcell.train.loop import recorded_threads
    from bloodcell.train.run import HOLDOUT_DIR, is_first_process

    requested = run_config.train.num_threads
    trained = recorded_threads(run_dir, 0) or recorded_threads(run_dir / HOLDOUT_DIR, 0)
    if not requested or not trained or not is_first_process():  # automatic: the recorded count is taken again
        return
    threads = min(requested, available_cores())  # what set_threads will take
    if threads != trained:
        warning_line(f"{run_dir} trained with {trained} thread(s); resumed with {threads} (train.num_threads), its "
                     "weights will differ from an uninterrupted run's (config.yaml keeps the count it started with)")  # fmt: skip


def _say_where_devices_run(run_config: RunConfig) -> None:
    """``--devices N`` reads as N GPUs; on a machine without one it means N CPU processes: say so, and say
    when they are more than the cores (each then waits for the others at every step)."""
    import torch

    from bloodcell.machine import available_cores
    from bloodcell.train.run import is_first_process
    from bloodcell.train.setup import launch_topology, resolve_accelerator

    if resolve_accelerator(run_config.train) != "cpu" or not is_first_process():  # said once
        return
    processes, _ = launch_topology(run_config.train)
    count = 1 if processes == "auto" else int(processes)  # Lightning's "auto" on the CPU: one process
    cores = available_cores()
    more = f", more than this machine's {cores} cores: they will wait for each other" if count > cores else ""
    where = "on the CPU (train.accelerator=cpu)" if torch.cuda.is_available() else "no GPU here"
    warning_line(f"{where}: --devices {run_config.train.devices} trains as {count} CPU process(es){more}")


def _build_report(run_dir: Path, progress: bool) -> Path | None:
    """Build the HTML report; training never fails because of it (the model is already on disk), and an
    interrupt says how to build it later."""
    from bloodcell.report import build_report

    try:
        return build_report(run_dir, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: only the report is missing
        from bloodcell.cli import say_interrupted

        say_interrupted(f"the model is complete ({run_dir / 'checkpoints' / 'best'}); build its report with: "
                        f"bloodcell report {run_dir}")  # fmt: skip
        raise
    except Exception as error:  # noqa: BLE001 - the trained model is safe on disk; say what failed
        # A run whose only held-out part it trained on has a report only of its holdout stage (the error says so).
        target = run_dir / "holdout" if "holdout stage" in str(error) and (run_dir / "holdout").is_dir() else run_dir
        warning_line(f"report failed ({type(error).__name__}: {error}); the run is complete. Retry with: bloodcell report {target}")
        return None
