"""``bloodcell demo``: the bundled model on the bundled sample images; parse options, call the API, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from bloodcell.cli import app
from bloodcell.cli.messages import markup_text, warning_line
from bloodcell.io import terminal_text

if TYPE_CHECKING:
    from bloodcell.demo import DemoResult


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Folder for predictions, Grad-CAM overlays and report.html."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="A run directory, model directory or card.json. Default: the model bundled with the package.",
        show_default=False,
    ),
    samples: Path | None = typer.Option(
        None, "--samples", help="A folder with one sub-folder per class (Benign, Early, Pre, Pro ...). Default: the bundled samples.",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the files written and every prediction) instead of the table."),
) -> None:
    """Classify the sample images shipped with bloodcell, with Grad-CAM overlays and an HTML report.

    Writes into --out: predictions.csv, predictions.json, overlays/*.gradcam.png and report.html
    (self-contained: open it in any browser). Research use only: not a medical device.
    """
    from bloodcell.cli.messages import warn_of_squashed
    from bloodcell.demo import run_demo

    demo = run_demo(out, model=model, samples=samples)
    if as_json:
        payload = json.loads(demo.predictions_json.read_text(encoding="utf-8"))
        payload.update({"out": str(demo.out_dir), "report": str(demo.report), "seconds": round(demo.seconds, 3)})
        typer.echo(json.dumps(payload))
    else:
        _print_summary(demo)
    warn_of_squashed((image.result.source, image.result.size) for image in demo.images)  # --samples: any shape


def _print_summary(demo: DemoResult) -> None:
    """The predictions as a rich table, then where the files are and how to go on."""
    from rich.console import Console
    from rich.table import Table

    from bloodcell.demo import OVERLAY_DIR

    console = Console()
    # Every class's probability when the terminal has room (they are all in predictions.csv and the report).
    classes = demo.classes if console.width >= 100 else []
    table = Table(  # the model's name is data, not markup
        title=markup_text(f"model {demo.model_info['name']}, version {demo.model_info['version']} "
                          f"({demo.model_info['architecture']}) on {len(demo.images)} sample images"),
        title_justify="left", header_style="bold",
    )  # fmt: skip
    for column in ("image", "true class", "predicted", "p", *classes, "verdict"):
        # Class names are data, not markup (escaped as predict's table does).
        table.add_column(markup_text(column), justify="right" if column == "p" or column in classes else "left",
                         overflow="fold")  # fmt: skip
    for image in demo.images:
        result = image.result
        if not result.ok:
            error = f"[red]error: {markup_text(result.error or '')}[/red]"
            table.add_row(markup_text(image.path.name), markup_text(image.true_class), error, *[""] * (len(classes) + 2))
            continue
        verdict = ("n/a" if image.correct is None else "[green]right[/green]" if image.correct
                   else "[red]wrong[/red]")  # fmt: skip
        cells = [f"{result.probabilities[name]:.3f}" for name in classes]
        table.add_row(markup_text(image.path.name), markup_text(image.true_class), f"[bold]{markup_text(result.label or '')}[/bold]",
                      f"{result.confidence:.3f}", *cells, verdict)  # fmt: skip
    console.print(table)
    unreadable = f" ({demo.n_unreadable} could not be read)" if demo.n_unreadable else ""
    few = f"{len(demo.images)} images say" if len(demo.images) != 1 else "1 image says"
    console.print(
        f"{demo.n_correct} of {demo.n_judged} predicted as their folder's class{unreadable} in "
        f"{demo.seconds:.1f} s ({few} little; see the model's evaluation report). {demo.training_note} "
        "Research use only: not a medical device."
    )
    unknown = [terminal_text(name) for name in sorted({image.true_class for image in demo.images if not image.judged})]
    if unknown:
        which = f"folders {', '.join(unknown)} are no classes" if len(unknown) > 1 else f"folder {unknown[0]} is no class"
        classes_named = ", ".join(map(terminal_text, demo.classes))
        warning_line(f"the samples' {which} of this model ({classes_named}): no verdict for them; give "
                     "--samples a folder of its classes' folders")  # fmt: skip
    console.print(f"report:      {markup_text(demo.report)}  (open it in a browser)", highlight=False, soft_wrap=True)
    console.print(f"predictions: {markup_text(demo.predictions_csv)}, {markup_text(demo.predictions_json.name)}",
                  highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"Grad-CAM:    {markup_text(demo.out_dir / OVERLAY_DIR)}/", highlight=False, soft_wrap=True)
    console.print(f"web page:    {markup_text(demo.serve_command)}   then open http://127.0.0.1:8000/",
                  highlight=False, soft_wrap=True)  # fmt: skip
