"""``bloodcell train``: parse options, call :func:`bloodcell.train.train_run`, build the report, print a summary."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bloodcell.cli import app
from bloodcell.cli.messages import warning_line
from bloodcell.config import RunConfig, named_configs

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


@app.command("train")
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
    from bloodcell.errors import UserError
    from bloodcell.train import train_run
    from bloodcell.train.checkpoint import completed_epochs, is_complete
    from bloodcell.train.run import training_lock

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
        find_dataset(data, run_config.data.variant, run_config.data.class_names)
        if run_config.model.weights and not Path(run_config.model.weights).exists():  # before any folder is made
            raise UserError(f"initial weights not found: {run_config.model.weights} (--weights, model.weights)")
        run_dir = out if out is not None else Path("runs") / run_config.name
    if devices is not None:
        _say_where_devices_run(run_config)

    # The folder's lock before its checkpoints are even looked at (another process may be writing them; the
    # look completes an interrupted checkpoint swap), held until the report is built from them.
    with training_lock(run_dir):
        if resume is not None:
            done = completed_epochs(run_dir)
            complete = is_complete(run_dir, run_config.train.epochs)
            if done is not None and complete:  # (done is known then; said for the type checker)
                warning_line(f"{run_dir} is already complete ({done[0]} of {run_config.train.epochs} epochs"
                             + (f", stopped by {done[1].replace('_', ' ')}" if done[1] else "")
                             + "): nothing is trained again" + ("; its report is rebuilt" if report else ""))  # fmt: skip
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
    def took(seconds: float) -> str:  # this command's seconds: none were spent training a complete run
        return "trained before" if complete else f"{seconds:.0f} s"

    if result.holdout:
        typer.echo(
            f"holdout (train only): val balanced accuracy {summary['last_val_balanced_accuracy']:.4f} at the last "
            f"epoch, best {validated.best_val_balanced_accuracy:.4f} at epoch {validated.best_epoch} "
            f"({took(result.holdout.seconds)})"
        )
        typer.echo(f"refit on train + val: {len(result.history)} epochs ({took(result.seconds)})")
    else:
        typer.echo(
            f"best val balanced accuracy {result.best_val_balanced_accuracy:.4f} at epoch {result.best_epoch} "
            f"({len(result.history)} epochs, {result.stopped}, {took(result.seconds)})"
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
    from bloodcell.train.run import _is_first_process
    from bloodcell.train.setup import launch_topology

    if not _is_first_process():
        return
    per_node, nodes = launch_topology(run_config.train)  # torchrun's or srun's processes, else the config's
    by_launcher = (per_node, nodes) != (run_config.train.devices, 1)
    launched = (per_node if isinstance(per_node, int) else 1) * nodes
    command = f"bloodcell train --resume {run_dir}" + (f" --devices {devices}" if devices is not None else "")
    how = f" (launched as this run was, in {launched} processes)" if by_launcher and launched > 1 else ""
    from bloodcell.cli import say_interrupted

    say_interrupted(f"continue with: {command}{how}")


def _say_where_devices_run(run_config: RunConfig) -> None:
    """``--devices N`` reads as N GPUs; on a machine without one it means N CPU processes: say so, and say
    when they are more than the cores (each then waits for the others at every step)."""
    import torch

    from bloodcell.machine import available_cores
    from bloodcell.train.run import _is_first_process
    from bloodcell.train.setup import launch_topology, resolve_accelerator

    if resolve_accelerator(run_config.train) != "cpu" or not _is_first_process():  # said once
        return
    processes, _ = launch_topology(run_config.train)
    count = 1 if processes == "auto" else int(processes)  # Lightning's "auto" on the CPU: one process
    cores = available_cores()
    more = f", more than this machine's {cores} cores: they will wait for each other" if count > cores else ""
    where = "on the CPU (train.accelerator=cpu)" if torch.cuda.is_available() else "no GPU here"
    warning_line(f"{where}: --devices {run_config.train.devices} trains as {count} CPU process(es){more}")


def _build_report(run_dir: Path, progress: bool) -> Path | None:
    """Build the HTML report; training never fails because of it (the model is already on disk)."""
    from bloodcell.report import build_report

    try:
        return build_report(run_dir, progress=progress)
    except Exception as error:  # noqa: BLE001 - the trained model is safe on disk; say what failed
        # A run whose only held-out part it trained on has a report only of its holdout stage (the error says so).
        target = run_dir / "holdout" if "holdout stage" in str(error) and (run_dir / "holdout").is_dir() else run_dir
        warning_line(f"report failed ({type(error).__name__}: {error}); the run is complete. Retry with: bloodcell report {target}")
        return None
