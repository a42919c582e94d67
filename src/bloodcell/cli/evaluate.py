"""``bloodcell evaluate``, ``bloodcell explain`` and ``bloodcell report``: parse options, call the API, print.

A model is named as everywhere else: a run directory (its ``checkpoints/best``), a model directory, a
``card.json``, or nothing for the default model bundled with the package. ``--json`` prints exactly one
JSON object on stdout (the ``metrics.json`` of ``evaluate``); progress bars go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from bloodcell.cli import app
from bloodcell.cli.messages import markup_text, plural, warning_line
from bloodcell.errors import UserError
from bloodcell.io import terminal_text

_console = Console()

MODEL_HELP = "A run directory, a model directory or a card.json. Default: the model bundled with the package."
EXPLAIN_PATHS_HELP = "Image files, folders of images or glob patterns (quoted), after an optional model (as for evaluate, or an .onnx file in the model directory it was exported from)."
# Spelt out rather than joined from gradcam.METHODS: importing it would load torch for every --help.
CAM_METHODS = "gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, eigengradcam or scorecam"
TARGET_LAYER_HELP = ("Dotted module name inside the network (default: its last convolutional stage; an earlier "
                     "stage such as stages.2 gives a finer map).")  # fmt: skip


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, str):  # already in words ("4 of 10")
        return value
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: Any) -> str:
    return "" if not interval or interval[0] is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _confident_row(metrics: dict[str, Any], tta: dict[str, Any] | None) -> list[tuple[str, Any, str, str | None]]:
    """The row of errors made with high confidence (absent from a metrics.json written before it)."""
    confident = metrics.get("confident_errors")
    if not confident:
        return []
    name = f"errors at >= {100 * confident['threshold']:.0f} % confidence"
    return [(name, f"{confident['count']} of {confident['errors']}", "after temperature", "" if tta else None)]


def _shortcut_row(
    metrics: dict[str, Any], tta: dict[str, Any] | None
) -> list[tuple[str, Any, str, str | None]]:
    """The border-colour shortcut baseline's row, named by the part it was scored on where that is not the
    evaluated one: with ``--split all`` it scores the test part only, and its number beside the model's would
    read as a score of the same images."""
    shortcut = metrics.get("shortcut_baseline")
    if not shortcut or shortcut.get("balanced_accuracy") is None:
        return []
    name, scored_on = "border-colour shortcut", shortcut.get("scored_on", metrics["evaluation"]["split"])
    if scored_on != metrics["evaluation"]["split"]:
        count = f", {shortcut['n_test']} images" if shortcut.get("n_test") is not None else ""
        name += f" ({scored_on} part{count})"
    return [(name, shortcut["balanced_accuracy"], shortcut["verdict"], "" if tta else None)]


def _head_title(metrics: dict[str, Any]) -> str:
    """What was evaluated on which images, in words (names of folders and classes as they are, not markup)."""
    from bloodcell.evaluate.runner import evaluated_scope

    where = evaluated_scope(metrics, Path(metrics["data"]["root"]).name)
    blocks = metrics["data"].get("n_blocks")  # None where the images have no session blocks
    counts = plural(metrics["n_images"], "image") + ("" if blocks is None else f", {plural(blocks, 'block')}")
    return f"{metrics['model']['architecture']} on {where} ({counts})"


def summary_tables(metrics: dict[str, Any]) -> list[Table]:
    """The rich tables ``bloodcell evaluate`` prints: headline (with TTA), per class, robustness.

    Names from the data (classes, folders, the target layer) are escaped: rich reads "[/x]" as markup.
    """
    tta = metrics.get("tta")
    head = Table(title=markup_text(_head_title(metrics)), title_justify="left")
    head.add_column("metric")
    head.add_column("value", justify="right")
    head.add_column("95% CI", justify="right")
    if tta:
        head.add_column(f"TTA ({tta['views']} views)", justify="right")
    rows = [
        ("balanced accuracy", metrics["balanced_accuracy"], _ci(metrics["balanced_accuracy_ci"]),
         f"{_f(tta['balanced_accuracy'])} {_ci(tta['balanced_accuracy_ci'])}" if tta else None),
        ("accuracy", metrics["accuracy"], "", _f(tta["accuracy"]) if tta else None),
        ("macro-F1", metrics["macro_f1"], "", _f(tta["macro_f1"]) if tta else None),
        ("ROC AUC (macro)", metrics["roc_auc_macro"], "", "" if tta else None),
        ("ECE, raw", metrics["ece"], "", "" if tta else None),
        ("ECE, temperature-scaled", metrics["ece_after_temperature"], "", _f(tta["ece"]) if tta else None),
        *_confident_row(metrics, tta),
        ("temperature", metrics["temperature"],
         ("fitted on val" if metrics["data"].get("same_as_training", True) else "fitted on the model's val part")
         if metrics["temperature_source"].startswith("fitted on the validation part")
         else metrics["temperature_source"], "" if tta else None),
    ]  # fmt: skip
    rows += _shortcut_row(metrics, tta)
    explained = metrics.get("explain") or {}
    if explained.get("energy_to_area_ratio") is not None:  # where the Grad-CAM maps look, against chance (1)
        verdict = _cell_focus_words(explained)
        sanity = "sanity check passed" if explained.get("passed") else "sanity check FAILED"
        rows.append((f"Grad-CAM energy on stained cells / their area (layer {explained['target_layer']})",
                     explained["energy_to_area_ratio"], f"{verdict}; {sanity}", "" if tta else None))  # fmt: skip
    for name, value, extra, tta_value in rows:
        head.add_row(markup_text(name), _f(value), markup_text(extra), *([tta_value] if tta else []))

    per_class = Table(title="Classification report", title_justify="left")
    for column in ("class", "precision", "recall", "F1", "support", "ROC AUC"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, row in metrics["per_class"].items():
        per_class.add_row(markup_text(name), _f(row["precision"]), _f(row["recall"]), _f(row["f1"]),
                          str(row["support"]), _f(metrics["roc_auc"].get(name)))  # fmt: skip
    tables = [head, per_class]

    robustness = metrics.get("robustness")
    if robustness:
        shifts = Table(title=f"Balanced accuracy under acquisition shifts (clean {_f(robustness['clean']['balanced_accuracy'])})",
                       title_justify="left")  # fmt: skip
        for column in ("shift", "low", "medium", "high"):
            shifts.add_column(column, justify="left" if column == "shift" else "right")
        for name, values in robustness["shifts"].items():
            shifts.add_row(markup_text(name), *(_f(values[s]["balanced_accuracy"]) for s in (1, 2, 3)))
        worst = robustness["worst"]
        worst_cells = (f"[bold]{_f(worst[s]['balanced_accuracy'])}[/bold] {markup_text(worst[s]['shift'])}"
                       for s in ("1", "2", "3"))  # fmt: skip
        shifts.add_row("[bold]worst[/bold]", *worst_cells)
        tables.append(shifts)
    occlusion = metrics.get("corner_occlusion")
    if occlusion:
        corners = Table(title=f"With one corner masked (a drawn scale bar or label; clean {_f(occlusion['clean_balanced_accuracy'])})",
                        title_justify="left")  # fmt: skip
        for column in ("corner", "balanced accuracy", "predictions changed"):
            corners.add_column(column, justify="left" if column == "corner" else "right")
        for name, row in occlusion["corners"].items():
            corners.add_row(markup_text(name), _f(row["balanced_accuracy"]),
                            f"{row['changed_predictions']} of {occlusion['n_images']}")  # fmt: skip
        tables.append(corners)
    return tables


def _warn_of_stale_reports(folder: Path) -> None:
    """Say so when the folder just evaluated into holds reports: their text describes the previous evaluation
    while the plots they link are the new ones. Not rebuilt here: a report may evaluate a baseline run too."""
    from bloodcell.report.html import REPORT_HTML, REPORT_MD

    stale = [name for name in (REPORT_HTML, REPORT_MD) if (folder / name).is_file()]
    if stale:
        name = terminal_text(folder)
        verb, them = ("describes", "it") if len(stale) == 1 else ("describe", "them")
        warning_line(f"{' and '.join(stale)} in {name} {verb} the previous evaluation; rebuild {them} with: "
                     f"bloodcell report {name}")  # fmt: skip


@app.command("evaluate")
def evaluate_command(
    model: Path | None = typer.Argument(None, help=MODEL_HELP, show_default=False, metavar="RUN_OR_MODEL"),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset folder (default: the one the model was trained on). Another copy of the "
        "dataset, or any folder in a known layout, works the same way.", show_default=False
    ),
    split: Literal["test", "val", "all"] = typer.Option("test", "--split", help="test or val (that part of the model's split protocol), or all (every image the model did not train on, as far as it records them)."),
    tta: bool = typer.Option(False, "--tta", help="Also evaluate with test-time augmentation (8 flips / rotations)."),
    robustness: bool = typer.Option(True, "--robustness/--no-robustness", help="Evaluate under the acquisition-shift suite (7 shifts x 3 severities) and with each corner masked."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Grad-CAM grid and sanity check."),
    cam_method: str = typer.Option("gradcam", "--cam-method", help=f"CAM method of the grid and sanity check: {CAM_METHODS}."),
    target_layer: str | None = typer.Option(None, "--target-layer", help=TARGET_LAYER_HELP, show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: the run directory for its own test part, else RUN/evaluations/DATA-HASH-SPLIT, HASH 8 hex digits of the data folder's path; for a model outside a run, under ./evaluations/).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json on stdout instead of the summary."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw progress bars on stderr."),
) -> None:
    """Evaluate a model: metrics with block-bootstrap intervals, calibration, robustness, Grad-CAM, plots.

    Writes metrics.json (keys in docs/EVALUATION.md), predictions.csv and plots/. The temperature: a model
    that did not train on its validation part gets one fitted there, stored in its card; a model refit on
    train + val (the default) keeps its holdout stage's; the bundled model's card is never written.
    """
    from bloodcell.evaluate.runner import evaluate_model

    metrics = evaluate_model(model, data, split=split, tta=tta, robustness=robustness, out_dir=out, explain=explain,
                             cam_method=cam_method, target_layer=target_layer, progress=progress and not as_json)  # fmt: skip
    _warn_of_stale_reports(Path(metrics["out_dir"]))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "out_dir"}, indent=2))
        return
    for table in summary_tables(metrics):
        _console.print(table)
    written = Path(metrics["out_dir"]) / "metrics.json"
    _console.print(f"written: {terminal_text(written)}, predictions.csv, plots/", markup=False)  # data, not markup


def _explain_inputs(model: Path | None, paths: list[Path], out: Path, method: str,
                    target_layer: str | None) -> tuple[list[dict], list[Path]]:  # fmt: skip
    """Explain the images that ``paths`` name (folders searched, hidden files left out, globs expanded, as
    ``predict`` does); an input that names nothing gets a row with its reason, as a bad image does.
    Also returns the other files found in the folders (not images by their suffix), to be named."""
    from bloodcell.explain.gradcam import explain_files, explain_row
    from bloodcell.serve.common import expand_inputs, missing_input_reason

    found = expand_inputs(paths)
    rows = explain_files(model, found.files, out, method=method, target_layer=target_layer) if found.files else []
    return found.in_input_order(rows, lambda name: explain_row(name, missing_input_reason(name))), list(found.skipped)


def _pytorch_model_of(model: Path | None) -> Path | None:
    """Grad-CAM needs the PyTorch weights: for an exported ``.onnx`` file, the model directory it came from."""
    from bloodcell.serve.common import names_onnx_file, torch_weights_beside

    if model is None or not names_onnx_file(model):
        return model
    source = torch_weights_beside(model)
    if source is False:
        raise UserError(f"{model}: Grad-CAM needs the PyTorch weights, which an ONNX file does not hold: name the "
                        "model directory it was exported from")  # fmt: skip
    return source


@app.command("explain")
def explain_command(
    paths: list[Path] = typer.Argument(..., help=EXPLAIN_PATHS_HELP, show_default=False, metavar="INPUTS"),
    method: str = typer.Option("gradcam", "--method", "--cam-method", help=f"{CAM_METHODS}."),
    target_layer: str | None = typer.Option(None, "--target-layer", help=TARGET_LAYER_HELP, show_default=False),
    out: Path = typer.Option(Path("explanations"), "--out", "-o", help="Folder for the overlay PNGs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Write Grad-CAM overlays (image | heat map) for images, with the model's prediction.

    A file that cannot be read is reported with its reason and the others are still explained; overlays an
    earlier run wrote into --out (explaining into the images' own folder again) are skipped, not failed.
    Exit code: 0 when every image was explained, 1 when any failed, 2 on a usage error.
    """
    from bloodcell.cli.messages import skipped_note, warn_of_squashed
    from bloodcell.cli.serve import split_model_and_inputs

    model, names = split_model_and_inputs(None, [str(path) for path in paths], "explain")
    model_path, images = (Path(model) if model else None), [Path(name) for name in names]
    rows, skipped = _explain_inputs(_pytorch_model_of(model_path), images, out, method, target_layer)
    failed = sum(row["error"] is not None for row in rows)
    earlier = sum(row["skipped"] is not None for row in rows)  # earlier overlays: left out, not failed
    if as_json:
        typer.echo(json.dumps({"method": method, "out": str(out), "n_failed": failed, "images": rows,
                               "skipped": [str(path) for path in skipped]}, indent=2))  # fmt: skip
    else:
        layer = next((row["target_layer"] for row in rows if row["error"] is None), None)
        table = Table(title=markup_text(f"{method} on layer '{layer}'" if layer else method), title_justify="left")
        for column in ("image", "predicted", "p", "overlay"):  # paths wrap rather than lose their ends
            table.add_column(column, justify="right" if column == "p" else "left", overflow="fold")
        for row in rows:  # names are data, not markup
            if row["skipped"] is not None:
                table.add_row(markup_text(row["image"]), f"skipped: {markup_text(row['skipped'])}", "", "")
            elif row["error"] is not None:
                table.add_row(markup_text(row["image"]), f"[red]error: {markup_text(row['error'])}[/red]", "", "")
            else:
                table.add_row(markup_text(row["image"]), markup_text(row["predicted"]), f"{row['probability']:.3f}",
                              markup_text(row["overlay"]))  # fmt: skip
        _console.print(table)
        written = len(rows) - failed - earlier
        typer.echo(f"{written} overlay(s) written to {out}/" + (f"; {failed} image(s) failed" if failed else "")
                   + (f"; {earlier} earlier overlay(s) skipped" if earlier else ""))  # fmt: skip
        if skipped:
            typer.echo(skipped_note(skipped), err=True)
    warn_of_squashed((row["image"], row["size"]) for row in rows)
    if failed:
        raise typer.Exit(code=1)


@app.command("report")
def report_command(
    run: Path = typer.Argument(..., help="A run directory (or a folder holding an evaluation's metrics.json).", show_default=False),
    baseline: Path | None = typer.Option(None, "--baseline", help="A run to compare against (default: a sibling run trained with the seed-replica config).", show_default=False),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Evaluate the run first if it has no metrics.json."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw progress bars on stderr."),
) -> None:
    """Build the run's self-contained report.html (images embedded, opens offline) and report.md."""
    from bloodcell.report import build_report

    path = build_report(run, baseline=baseline, evaluate=evaluate, progress=progress)
    typer.echo(f"report: {path}")
    typer.echo(f"summary: {path.with_name('report.md')}")


def _cell_focus_words(explained: dict[str, Any]) -> str:
    """The Grad-CAM verdict on the cells in words, with its interval (older metrics have only a bool)."""
    verdict = explained.get("cell_focus_verdict") or ("favours" if explained.get("favours_cell") else "does not favour")
    interval = explained.get("cell_focus_ci")
    where = f" (x{explained['cell_focus']:.2f}, 95 % CI {interval[0]:.2f}-{interval[1]:.2f})" if interval else ""
    return f"{verdict} the cells{where}" if verdict != "inconclusive" else f"inconclusive on the cells{where}"
