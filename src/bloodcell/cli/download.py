"""``bloodcell data download``: fetch the public dataset from Kaggle and print the folder to pass as DATA."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bloodcell.cli import app


def _data_app() -> typer.Typer:
    """The ``data`` command group, shared with any other module that adds ``data`` sub-commands."""
    for group in app.registered_groups:
        if group.name == "data" and group.typer_instance is not None:
            return group.typer_instance
    data_app = typer.Typer(help="Dataset utilities (download).", no_args_is_help=True)
    app.add_typer(data_app, name="data")
    return data_app


data_app = _data_app()


@data_app.command("download")
def download(
    dataset: str = typer.Option("mehradaria/leukemia", "--dataset", help="Kaggle dataset handle owner/name."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Download folder (default: $KAGGLEHUB_CACHE, else $BLOODCELL_HOME/kaggle)."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Download again even if a complete copy is cached; an unfinished or damaged download is removed first.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Download the Kaggle dataset with kagglehub (cached) and print the folder to pass as --data.

    Public datasets may still need a Kaggle API token: ~/.kaggle/kaggle.json, or KAGGLE_USERNAME and
    KAGGLE_KEY. Without internet, download it by hand and pass its folder as --data.
    """
    from bloodcell.data.download import download_dataset

    path = download_dataset(dataset, cache, force=force)
    if as_json:
        typer.echo(json.dumps({"dataset": dataset, "path": str(path)}))
    else:
        typer.echo(str(path))
