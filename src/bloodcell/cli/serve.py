"""``bloodcell predict``, ``bloodcell export`` and ``bloodcell serve``: parse options, call the serving API, print.

Model naming is the same everywhere: a run directory (its ``checkpoints/best``), a model directory, a
``card.json``, an exported ``.onnx`` file (ONNX backend), or nothing for the default model bundled with
the package.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import json
import os
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from bloodcell.cli import app
from bloodcell.cli.messages import error_line, markup_text, skipped_note, warn_of_squashed
from bloodcell.errors import ParityError, UserError


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


class ExportFormat(str, Enum):
    onnx = "onnx"


MODEL_HELP = (
    "Model: a run directory, a model directory, a card.json, or an exported .onnx file (ONNX backend). "
    "Default: the model bundled with the package."
)
#: export reads the PyTorch model (an .onnx file is what it writes).
EXPORT_MODEL_HELP = "Model: a run directory, a model directory or a card.json. Default: the model bundled with the package."


def looks_like_model(text: str) -> bool:
    """True when ``text`` names a model rather than images (checked on disk, without importing torch)."""
    path = Path(text)
    if path.is_file():
        return path.suffix.lower() == ".onnx" or path.name in {"card.json", "model.safetensors"}
    if not path.is_dir():
        return False
    # Any part of a model, not only a whole one: a model folder that lost its card.json was searched for images
    # and the bundled model answered; taken for a model, it gets resolve_model_dir's "no model found".
    if (path / "checkpoints").is_dir() or _holds_an_onnx_file(path):
        return True
    return any((folder / name).is_file() for folder in (path, path / "checkpoints" / "best", path / "model")
               for name in ("card.json", "model.safetensors"))  # fmt: skip


def _holds_an_onnx_file(folder: Path) -> bool:
    """Whether ``folder`` itself (not a sub-folder) holds a ``.onnx`` file; False when it cannot be listed."""
    try:
        return any(child.suffix.lower() == ".onnx" and child.is_file() for child in folder.iterdir())
    except OSError:
        return False


def split_model_and_inputs(
    model: str | None, inputs: list[str], command: str = "predict"
) -> tuple[str | None, list[str]]:
    """Apply the documented rule: with no ``--model``, a first INPUT that is a model is the model.

    A first INPUT that names nothing on disk, with no image suffix and no wildcard, before other inputs, is
    refused: it is most likely a mistyped or unfinished run, and the bundled model would silently answer
    in its place.
    """
    from bloodcell.data.decode import IMAGE_SUFFIXES

    if model is not None or not inputs:
        return model, inputs
    first = inputs[0]
    if looks_like_model(first):
        if len(inputs) == 1:
            raise UserError(f"{first} is a model, but no images were given: bloodcell {command} {first} IMAGES...")
        return first, inputs[1:]
    named_nothing = not Path(first).exists() and not glob.has_magic(first)
    if len(inputs) > 1 and named_nothing and Path(first).suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{first}: no such model, run, image or folder (a model given first takes the bundled "
                        "model's place: is it trained, and spelled right?)")  # fmt: skip
    return None, inputs


def make_predictor(model: str | None, backend: Backend | None, tta: bool) -> Any:
    """Build the predictor for ``backend``; the ONNX backend exports (once, cached) when given a model dir."""
    from bloodcell.serve.common import load_predictor

    backend = choose_backend(model, backend)
    try:
        return load_predictor(model, backend.value, tta)[0]
    except FileNotFoundError as error:
        if model is None:
            raise UserError("no model given and no bundled default model is installed: pass --model RUN_OR_MODEL_DIR") from None
        raise UserError(str(error)) from None
    except ParityError as error:  # the export made for --backend onnx: not a usage error, exit 1 as export does
        error_line(f"error: {error} (--backend torch runs the model itself)")
        raise typer.Exit(code=1) from None


def choose_backend(model: str | None, backend: Backend | None) -> Backend:
    """The backend asked for, or, when none was, the one the model needs: ONNX Runtime for an ``.onnx`` file."""
    from bloodcell.serve.common import names_onnx_file

    is_onnx_file = model is not None and names_onnx_file(model)
    if backend is None:
        return Backend.onnx if is_onnx_file else Backend.torch
    if backend is Backend.torch and is_onnx_file:
        raise UserError(f"{model} is an ONNX file: PyTorch needs the model directory (or drop --backend torch)")
    return backend


def results_table_rows(results: list[Any], classes: list[str]) -> list[dict[str, Any]]:
    """Flat rows for CSV: file, predicted class, confidence, ``p_<class>`` for each class, error."""
    from bloodcell.io import probability_columns

    rows = []
    for result in results:
        row: dict[str, Any] = {"file": result.source, "predicted_class": result.label or "", "confidence": result.confidence}
        row.update({column: result.probabilities.get(name) for name, column in zip(classes, probability_columns(classes))})
        row["error"] = result.error or ""
        rows.append(row)
    return rows


def write_results(path: Path, payload: dict[str, Any], results: list[Any], classes: list[str]) -> None:
    """Write the results as CSV or JSON (by the file's suffix), atomically."""
    from bloodcell.io import atomic_write_json, atomic_write_text, probability_columns, spreadsheet_safe

    def cell(value: Any) -> str:
        return f"{value:.6f}" if isinstance(value, float) else ("" if value is None else spreadsheet_safe(str(value)))

    suffix = path.suffix.lower()
    if suffix == ".json":
        atomic_write_json(path, payload)
    elif suffix == ".csv":
        buffer = io.StringIO()
        columns = ["file", "predicted_class", "confidence", *probability_columns(classes), "error"]
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in results_table_rows(results, classes):
            writer.writerow({k: cell(v) for k, v in row.items()})
        atomic_write_text(path, buffer.getvalue())
    else:
        raise UserError(f"--out {path}: use a .csv or .json file name")


def check_results_path(path: Path) -> None:
    """Refuse an ``--out`` that cannot be written before any image is classified."""
    if path.suffix.lower() not in {".csv", ".json"}:
        raise UserError(f"--out {path}: use a .csv or .json file name")
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; give a file name ending in .csv or .json")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise UserError(f"--out {path}: {existing} is a file, not a folder")
    _refuse_a_folder_that_cannot_be_written(path, existing)


def _refuse_a_folder_that_cannot_be_written(path: Path, folder: Path) -> None:
    """Create and remove a temporary file in ``folder`` (where the results, or their missing folders, go).

    Trying is the one test that holds: ``os.access`` answers yes to root on a read-only mount or in
    ``/proc``. The file is named as :func:`bloodcell.io.atomic_path` names its own (``.NAME.RANDOM.csv``).
    """
    start = os.fsdecode(os.fsencode(path.name)[:64])  # as atomic_path: the whole name stays under 255 bytes
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{start}.", suffix=path.suffix, dir=folder)
    except OSError as error:
        raise UserError(f"--out {path}: cannot write in {folder} ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)


def print_table(results: list[Any], classes: list[str], limit: int, written_to: Path | None = None) -> None:
    """A rich table of the first ``limit`` results (failed files are always shown); ``written_to``: the file
    that holds them all, if ``--out`` gave one."""
    from rich.console import Console
    from rich.table import Table

    # File names, class names and error texts are data, not markup: "[/bold]x.jpg" must print as itself.
    table = Table(show_lines=False, header_style="bold")
    table.add_column("file", overflow="fold")
    table.add_column("predicted class")
    for name in classes:
        table.add_column(markup_text(name), justify="right")
    shown = [r for i, r in enumerate(results) if i < limit or not r.ok]
    for result in shown:
        if not result.ok:
            table.add_row(markup_text(result.source), f"[red]error: {markup_text(result.error)}[/red]", *[""] * len(classes))
            continue
        cells = [
            f"[bold]{result.probabilities[name]:.3f}[/bold]" if name == result.label else f"{result.probabilities[name]:.3f}"
            for name in classes
        ]
        table.add_row(markup_text(result.source), f"[bold]{markup_text(result.label)}[/bold]", *cells)
    console = Console()
    console.print(table)
    if len(shown) < len(results):
        where = f"all of them in {written_to}" if written_to is not None else "write them all with --out FILE.csv"
        console.print(f"... {len(results) - len(shown)} more rows ({markup_text(where)})")


@app.command("predict")
def predict_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) and glob patterns such as 'slides/**/*.jpg'. Without "
            "--model, a first INPUT that is a model (run or model directory, card.json, .onnx) is the model.",
            show_default=False,
            metavar="INPUTS",
        ),
    ],
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write every result to FILE.csv or FILE.json.", show_default=False)
    ] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average over the 8 flips and quarter turns.")] = False,
    backend: Annotated[
        Backend | None,
        typer.Option(
            "--backend", help="torch (PyTorch eager) or onnx (ONNX Runtime; exports once if given a model directory). "
            "Default: onnx for an .onnx model, torch otherwise.", show_default=False,
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per network call.")] = 64,
    show: Annotated[int, typer.Option("--show", min=0, help="Rows of the table to print (failed files are always shown).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with every result instead of the table.")] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Draw a progress bar on stderr for large inputs.")
    ] = True,
) -> None:
    """Classify images with a saved model: prints a table (file, predicted class, probability of each class).

    Examples:

    ```
    bloodcell predict cell.jpg                       (the bundled default model)
    bloodcell predict -m runs/default slides/ '*.png' --out results.csv
    bloodcell predict runs/default slides/           (a first INPUT that is a model is the model)
    bloodcell predict -m model.onnx slides/ --json        (ONNX Runtime)
    ```

    A file that cannot be read is reported with its reason and the others still run.
    Files in a folder given that are not images by their suffix, or no regular files (pipes, devices), are
    named ("skipped" with --json).
    Exit code: 0 when every file was classified, 1 when any failed, 2 on a usage error.
    """
    from bloodcell.io import printable_path
    from bloodcell.serve.common import PredictionResult, expand_inputs, missing_input_reason

    model, inputs = split_model_and_inputs(model, inputs)
    if out is not None:
        check_results_path(out)
    found = expand_inputs(inputs)
    files, skipped = found.files, found.skipped
    predictor = make_predictor(model, backend, tta)
    start = time.perf_counter()
    results = _run_with_progress(predictor, files, batch, progress and len(files) > batch and not as_json)
    seconds = time.perf_counter() - start
    results = found.in_input_order(
        results, lambda text: PredictionResult(source=printable_path(text), error=missing_input_reason(text))
    )
    failed = sum(1 for r in results if not r.ok)
    payload = {
        "model": {**predictor.model_info, "backend": predictor.backend},
        "classes": predictor.classes,
        "temperature": predictor.temperature,
        "tta": predictor.tta,
        "n_files": len(results),
        "n_failed": failed,
        "skipped": [printable_path(path) for path in skipped],  # files in the folders given that were not read
        "seconds": round(seconds, 3),
        "results": [r.to_dict() for r in results],
    }
    written_to, write_error = out, None
    if out is not None:
        try:
            write_results(out, payload, results, predictor.classes)
        except OSError as error:  # e.g. the folder became read-only while the images were classified
            written_to, write_error = None, f"--out {out}: cannot write the results ({error})"
    # Printed even when --out failed: what was computed is shown before the error, not lost with it.
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        print_table(results, predictor.classes, show, written_to)
        if skipped:
            typer.echo(skipped_note(skipped), err=True)
    warn_of_squashed((r.source, r.size) for r in results)
    if not as_json:
        rate = f" ({len(files) / seconds:.0f} images/s)" if seconds > 0 and files else ""
        typer.echo(
            f"{len(results) - failed} of {len(results)} classified in {seconds:.2f} s{rate}"
            + (f"; {failed} failed" if failed else "")
            + (f"; written to {written_to}" if written_to else ""),
            err=True,
        )
    if write_error is not None:
        raise UserError(write_error)
    if failed:
        raise typer.Exit(code=1)


def _run_with_progress(predictor: Any, files: list[Path], batch: int, show_progress: bool) -> list[Any]:
    if not show_progress:
        return predictor.predict_files(files, batch=batch)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("predict", total=len(files))
        return predictor.predict_files(files, batch=batch, on_batch=lambda done: bar.update(task, completed=done))


@app.command("export")
def export_command(
    model: Annotated[str | None, typer.Argument(help=EXPORT_MODEL_HELP, show_default=False, metavar="MODEL")] = None,
    format: Annotated[ExportFormat, typer.Option("--format", help="Export format (ONNX).")] = ExportFormat.onnx,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="The .onnx file (or a folder for model.onnx) to write; card.json goes beside it. "
            "Default: MODEL-DIR/onnx/model.onnx ($BLOODCELL_HOME/onnx/WEIGHTS-HASH/model.onnx for the bundled model, "
            "where serve finds it).", show_default=False,
        ),
    ] = None,
    images: Annotated[
        list[str] | None,
        typer.Option(
            "--images", help="Real images (files, folders, globs) for the parity check; default: the bundled samples. "
            "Repeatable.", show_default=False,
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="Largest allowed difference of probabilities, PyTorch vs ONNX Runtime.")
    ] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Export a model to one self-contained ONNX file (dynamic batch) and check it against PyTorch.

    The export fails, and writes no model file (only its folder may be made), if ONNX Runtime's probabilities differ from PyTorch's by more
    than --tolerance on the parity images.
    """
    from bloodcell.serve.common import read_card_json
    from bloodcell.serve.export import export_onnx

    del format  # ONNX is the only format; the option keeps the command line explicit and extensible
    try:
        path = export_onnx(model, out, images=images or None, tolerance=tolerance)
    except FileNotFoundError as error:
        raise UserError(str(error) if model else "no model given and no bundled default model is installed") from None
    except OSError as error:  # a folder where the file should go, a file where a folder should, no permission
        raise UserError(f"cannot write the export ({error}); choose another place with --out") from None
    except ParityError as error:  # not a usage error: exit 1, as predict does for files it could not classify
        error_line(f"error: {error}")
        raise typer.Exit(code=1) from None
    info = read_card_json(path.parent)["onnx"]
    summary = {"onnx": str(path), "card": str(path.parent / "card.json"), "bytes": path.stat().st_size, **info["parity"]}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"wrote {path} ({summary['bytes'] / 1e6:.1f} MB) and its card {summary['card']}; "
                   f"{parity_summary(info['parity'])}")  # fmt: skip


def parity_summary(parity: dict[str, Any]) -> str:
    """The export's parity check in words: the largest difference of probabilities on the real images and
    on the synthetic ones (held to their logits), each named with its own figure."""
    synthetic = parity["synthetic"]
    on_synthetic = (f"{synthetic['max_abs_diff_probabilities']:.1e} on {synthetic['n_images']} synthetic "
                    f"(logits within {synthetic['max_abs_diff_logits']:.1e})")  # fmt: skip
    if not parity.get("n_real_images"):  # no real images given: the synthetic ones were the whole check
        return f"parity vs PyTorch, max |dp| = {on_synthetic} (no real images given)"
    on_real = f"{parity['max_abs_diff_probabilities']:.1e} on {parity['n_real_images']} real images"
    return f"parity vs PyTorch, max |dp| = {on_real}, {on_synthetic}"


#: How long SIGTERM or Ctrl-C waits for requests in progress before the server cancels them and exits.
#: Without a limit uvicorn waits for every open connection, so a client that stops partway through an
#: upload (headers and a part of the body sent) kept the server running for as long as it stayed connected.
GRACEFUL_SHUTDOWN_SECONDS = 10

MAX_SIDE_HELP = (
    "Largest accepted image width or height, in pixels (and at most 64 megapixels, or the square of this when "
    "that is more)."
)


def _refuse_a_port_in_use(host: str, port: int) -> None:
    """Refuse a port something else listens on before the model loads: uvicorn would find out only after
    "serving on" was printed, and exit 3 with its own error line."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                advice = "pick another port with --port N, or stop what uses it"
            else:  # an address this machine does not have, or no address at all (999.1.1.1)
                advice = "give --host an address of this machine (127.0.0.1, 0.0.0.0 for every interface, ::1)"
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}): {advice}") from None


@app.command("serve")
def serve_command(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP, show_default=False, metavar="MODEL")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 exposes it to the network). On a loopback address (127.0.0.1, any of 127.0.0.0/8, ::1, localhost) only requests addressed to this machine are answered.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    backend: Annotated[
        Backend | None,
        typer.Option(
            "--backend", help="torch or onnx (ONNX Runtime; Grad-CAM still uses PyTorch). Default: onnx for an "
            ".onnx model, torch otherwise.", show_default=False,
        ),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.01, max=1024.0, help="Largest accepted upload, in MiB (2**20 bytes).")] = 10.0,
    max_side: Annotated[int, typer.Option("--max-side", min=8, help=MAX_SIDE_HELP)] = 4096,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation by default (requests may override).")] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads", min=0, help="Threads per inference; with 1, one inference per core runs at once (best for many "
            "single-image requests). 0: the backend's default (all cores), one inference at a time.",
        ),
    ] = 1,
    log_level: Annotated[
        Literal["critical", "error", "warning", "info", "debug"],
        typer.Option("--log-level", case_sensitive=False, help="uvicorn log level: critical, error, warning, info, debug."),
    ] = "info",
) -> None:
    """Serve the model over HTTP: a web page at /, the JSON API under /v1, docs at /docs.

    Research use only: not a medical device.
    """
    import uvicorn

    from bloodcell.serve.app import MAX_CONNECTIONS, create_app

    backend = choose_backend(model, backend)
    host = host.strip("[]")  # [::1], as in a URL: uvicorn and the socket take the bare address
    _refuse_a_port_in_use(host, port)
    try:
        web_app = create_app(
            model, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_side=max_side,
            backend=backend.value, tta=tta, warm_up=True, inference_threads=threads or None,
            listen_host=host,
        )
    except FileNotFoundError as error:
        raise UserError(str(error) if model else "no model given and no bundled default model is installed") from None
    except ParityError as error:  # the export made for --backend onnx, as in predict
        error_line(f"error: {error} (--backend torch runs the model itself)")
        raise typer.Exit(code=1) from None
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address is bracketed in a URL
    typer.echo(f"bloodcell serving on http://{shown}:{port}/  (research use only; Ctrl-C stops)", err=True)
    uvicorn.run(web_app, host=host, port=port, log_level=log_level.lower(), workers=1, limit_concurrency=MAX_CONNECTIONS,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)  # fmt: skip
