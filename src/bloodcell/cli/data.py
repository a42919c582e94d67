"""``bloodcell index``, ``bloodcell split`` and ``bloodcell audit``: the data stages on the command line.

Each command calls the Python API in :mod:`bloodcell.data`, then prints a short human summary, or with
``--json`` exactly one JSON object on stdout (progress bars go to stderr). The JSON keys are documented in
docs/ARCHITECTURE.md and in each API function's docstring.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from bloodcell.cli import app
from bloodcell.cli.messages import error_line, markup_text, plural
from bloodcell.config import DataConfig
from bloodcell.io import terminal_text

_DEFAULTS = DataConfig()
_console = Console()

DATA_ARGUMENT = typer.Argument(
    ...,
    help="Dataset folder: the Aria layout (Original/ and Segmented/), the Kaggle 4-class folders, or "
    "one sub-folder per class.",
    show_default=False,
    metavar="DATA",
)
Variant = Literal["Original", "Segmented"]
VARIANT_OPTION = typer.Option(
    "Original", "--variant", help="Aria layout only: the Original or the Segmented images."
)
CLASSES_OPTION = typer.Option(
    None,
    "--classes",
    help="Comma-separated class names in model order, matched loosely to the class folders' names "
    "(any layout; default: the canonical classes, else the folder names).",
    show_default=False,
)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a summary.")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress", help="Draw progress bars on stderr.")
MANIFEST_OUT_OPTION = typer.Option(
    None, "--out", "-o", help="Write the manifest CSV here (default: the dataset's work folder)."
)
SPLIT_OUT_OPTION = typer.Option(
    None, "--out", "-o", help="Write the split CSV here (default: splits/ in the dataset's work folder, named by protocol, seed and rules)."
)
AUDIT_OUT_OPTION = typer.Option(
    None, "--out", "-o", help="Folder for audit.md and audit.json (default: audit/ in the dataset's work folder)."
)


def train_overrides(settings: dict[str, Any]) -> str:
    """The ``--set data.KEY=VALUE`` options that give ``train`` these split settings (those not its default).

    A value is written as YAML reads it back (a plain word bare, anything else as ``config.override`` quotes
    it) and quoted for a POSIX shell where it needs it.
    """
    import yaml

    from bloodcell.config import override

    def option(key: str, value: Any) -> str:
        plain = isinstance(value, str) and yaml.safe_load(value) == value
        return f"data.{key}={value}" if plain else override(f"data.{key}", value)

    changed = {key: value for key, value in settings.items() if value != getattr(_DEFAULTS, key)}
    return " ".join(f"--set {shlex.quote(option(key, value))}" for key, value in changed.items())


def _class_list(classes: str | None) -> list[str] | None:
    """Split the --classes option; empty means 'not given'."""
    names = [name.strip() for name in (classes or "").split(",") if name.strip()]
    return names or None


def _print_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _counts_table(title: str, header: list[str], rows: list[list[Any]]) -> Table:
    """Every text in it is data (class and folder names), not markup: "[/x]" would raise, "[b]" vanish, and
    a control character would reach the terminal."""
    table = Table(title=markup_text(title), title_justify="left")
    for k, name in enumerate(header):
        table.add_column(markup_text(name), justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*(markup_text(cell) for cell in row))
    return table


#: More classes than this are listed one a row: one column each left 30 classes' cells blank at 120 columns.
WIDE_SPLIT_TABLE = 6


def _split_table(summary: dict[str, Any], classes: list[str], title: str) -> Table:
    """A part a row and a class a column, or, for many classes, a class a row and a part a column."""
    counts, parts = summary["counts"], list(summary["counts"])
    if len(classes) <= WIDE_SPLIT_TABLE:
        rows = [[part, *[counts[part][k] for k in classes], counts[part]["total"], summary["blocks"][part]]
                for part in parts]  # fmt: skip
        return _counts_table(title, ["part", *classes, "total", "blocks"], rows)
    rows = [[name, *[counts[part][name] for part in parts]] for name in classes]
    rows += [["total", *[counts[part]["total"] for part in parts]], ["blocks", *[summary["blocks"][part] for part in parts]]]
    return _counts_table(title, ["class", *parts], rows)


@app.command("index")
def index_command(
    data: Path = DATA_ARGUMENT,
    variant: Variant = VARIANT_OPTION,
    classes: str | None = CLASSES_OPTION,
    out: Path | None = MANIFEST_OUT_OPTION,
    workers: int = typer.Option(
        1, "--workers", min=1, help="Processes for hashing the images the hash cache lacks (at most the cores "
        "this process may run on, its CPU affinity; more than 1 helps only with cores to spare).",
    ),
    as_json: bool = JSON_OPTION,
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Index a dataset: one manifest row per file with hashes, size, capture number, rejects and duplicates.

    --json keys: images, accepted, rejected [{path, reason}], classes {name: count}, exact_duplicate_groups, near_duplicate_groups, recaptured_pairs (shifted re-captures linked), manifest.
    """
    from bloodcell.data.index import build_index

    result = build_index(
        data, variant, _class_list(classes), out=out, progress=progress and not as_json, workers=workers
    )
    summary = result.summary
    if as_json:
        _print_json(summary)
        return
    dataset = result.dataset
    _console.print(
        f"Indexed {summary['images']} files under {dataset.root} (layout {dataset.layout}): "
        f"{summary['accepted']} accepted, {len(summary['rejected'])} rejected.",
        markup=False,
    )
    _console.print(
        _counts_table(
            "Images per class", ["class", "images"], [[k, v] for k, v in summary["classes"].items()]
        )
    )
    for item in summary["rejected"]:
        _console.print(f"  rejected {terminal_text(item['path'])}: {terminal_text(item['reason'])}", markup=False)
    _console.print(
        f"Duplicates: {plural(summary['exact_duplicate_groups'], 'group')} of identical files, "
        f"{plural(summary['near_duplicate_groups'], 'group')} with near duplicates or shifted re-captures "
        f"({plural(summary.get('recaptured_pairs', 0), 'pair')} of distinct files linked as re-captures)."
    )
    typer.echo(f"Manifest: {summary['manifest']}")


@app.command("split")
def split_command(
    data: Path = DATA_ARGUMENT,
    protocol: Literal["session", "random", "kfold"] = typer.Option(
        _DEFAULTS.protocol,
        "--protocol",
        help="session (capture-order blocks, leakage-safe), "
        "random (stratified, leaks sessions; for comparison) or kfold.",
    ),
    seed: int = typer.Option(
        _DEFAULTS.split_seed, "--seed", help="Split seed; the same seed gives the same split."
    ),
    val_fraction: float = typer.Option(
        _DEFAULTS.val_fraction, "--val-fraction", help="Share of each class held out for validation."
    ),
    test_fraction: float = typer.Option(
        _DEFAULTS.test_fraction, "--test-fraction", help="Share of each class held out for test."
    ),
    block_size: int = typer.Option(
        _DEFAULTS.block_size, "--block-size", min=1, help="Images per capture-order session block."
    ),
    embargo: int = typer.Option(
        _DEFAULTS.embargo,
        "--embargo",
        min=0,
        help="Images left out of training on each side of a held-out block (counted within a patient's "
        "sub-folder, or among the files directly in the class folder).",
    ),
    folds: int = typer.Option(_DEFAULTS.folds, "--folds", min=2, help="kfold: number of folds."),
    fold: int = typer.Option(_DEFAULTS.fold, "--fold", min=0, help="kfold: which fold is validation."),
    variant: Variant = VARIANT_OPTION,
    classes: str | None = CLASSES_OPTION,
    out: Path | None = SPLIT_OUT_OPTION,
    as_json: bool = JSON_OPTION,
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Split the indexed images into train / val / test (and embargo), keeping duplicate groups together.

    Sub-folders inside a class folder (one a patient or a slide: Benign/patient07/...) are kept whole in one
    part by every protocol. The "embargo" part holds what no part uses: the images beside each held-out
    block, and the members of a duplicate group outside the one part it is kept in.

    The leakage check runs on every split; if it fails the command exits with status 1.

    --json keys: protocol, seed, counts {part: {class: n, total}}, blocks {part: n}, leakage_check ("passed" or "failed"), leakage_message, capture_gaps {class: fewest capture-order steps from a training to a held-out image}, split (the CSV's path), split_rules, split_sha256 (the CSV's hash).
    """
    from bloodcell.data.index import build_index, dataset_workdir
    from bloodcell.data.splits import (
        make_split,
        save_split,
        split_file_name,
        split_summary,
        warn_of_classes_without_images,
    )

    result = build_index(data, variant, _class_list(classes), progress=progress and not as_json)
    warn_of_classes_without_images(result.manifest, result.dataset.classes)
    split = make_split(
        result.manifest,
        protocol,
        seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        block_size=block_size,
        embargo=embargo,
        folds=folds,
        fold=fold,
        check=False,
    )
    name = split_file_name(protocol, seed, fold if protocol == "kfold" else None, val_fraction=val_fraction,
                           test_fraction=test_fraction, block_size=block_size, embargo=embargo,
                           folds=folds if protocol == "kfold" else None, class_names=_class_list(classes))  # fmt: skip
    path = save_split(
        split, out or dataset_workdir(result.dataset.top, result.dataset.variant) / "splits" / name
    )
    summary = split_summary(split, protocol, seed, result.dataset.classes, path)
    if as_json:
        _print_json(summary)
    else:
        _console.print(_split_table(summary, list(result.dataset.classes), f"Split {protocol}, seed {seed}"))
        typer.echo(f"Leakage check: {summary['leakage_check']}. Split: {path}")
        gaps = summary["capture_gaps"]
        typer.echo("Fewest capture-order steps from a training to a held-out image: "
                   + ", ".join(f"{name} {'-' if gap is None else gap}" for name, gap in gaps.items())
                   + (" (1: neighbours, as in a random split)" if 1 in gaps.values() else ""))  # fmt: skip
        settings = {"protocol": protocol, "split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                    "block_size": block_size, "embargo": embargo, "folds": folds, "fold": fold, "variant": variant,
                    "class_names": _class_list(classes)}  # fmt: skip
        overrides = train_overrides(settings)
        if overrides:
            typer.echo(f"train and tune rebuild the split from their config (evaluate, from the model's): for this one, "
                       f"give them {overrides}")
    if summary["leakage_check"] != "passed":
        error_line(f"error: {summary['leakage_message']}")
        raise typer.Exit(1)


@app.command("audit")
def audit_command(
    data: Path = DATA_ARGUMENT,
    variant: Variant = VARIANT_OPTION,
    classes: str | None = CLASSES_OPTION,
    out: Path | None = AUDIT_OUT_OPTION,
    seed: int = typer.Option(
        0, "--seed", help="Seed of the session split the shortcut baselines are scored on."
    ),
    size: int = typer.Option(128, "--size", min=32, max=512, help="Image size the baselines decode at."),
    ring: int = typer.Option(
        8, "--ring", min=1, help="Border width in pixels for the border-colour baseline."
    ),
    as_json: bool = JSON_OPTION,
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Audit a dataset: counts, sizes, rejects, duplicate groups and shortcut baselines (Markdown + JSON).

    The shortcut baseline is a logistic regression on the mean colour of the image border, scored by balanced accuracy on the session split's test blocks: far above chance means the classes differ in acquisition and a model can score well for the wrong reasons.

    The corner baselines fit the same on each corner patch alone: one corner far above the others holds something drawn there (a scale bar, a label) that tells the classes apart; bloodcell evaluate then checks whether a model reads it.

    It also measures the cell masks: how much of each class's images the Segmented variant keeps (when there is one), and how much the stained-cell masks of the Grad-CAM measure cover.

    --json prints the report (audit.json); its keys are listed in docs/ARCHITECTURE.md.
    """
    from bloodcell.data.audit import run_audit

    report = run_audit(
        data, variant, _class_list(classes), out, seed, size, ring, progress=progress and not as_json
    )
    if as_json:
        _print_json(report)
        return
    _console.print(
        f"Audited {report['images']} files ({report['accepted']} usable, {len(report['rejected'])} rejected) "
        f"in {report['dataset']}.",
        markup=False,
    )
    _console.print(
        _counts_table("Images per class", ["class", "images"], [[k, v] for k, v in report["classes"].items()])
    )
    _console.print(
        f"Duplicates: {report['exact_duplicate_groups']} identical-file groups, {report['near_duplicate_groups']} "
        f"near-duplicate groups, {report['images_in_duplicate_groups']} images involved."
    )
    _console.print(report["shortcut_baseline"]["statement"], markup=False)
    if report.get("colour_statistics_baseline"):  # the stronger shortcut: each channel's mean and spread
        _console.print(report["colour_statistics_baseline"]["statement"], markup=False)
    _console.print(report["corner_baselines"]["statement"], markup=False)
    if report["segmented_coverage"] is not None:
        _console.print(report["segmented_coverage"]["statement"], markup=False)
    covered = report["stained_cell_coverage"]
    if covered:
        _console.print(
            "Stained-cell masks (Grad-CAM's energy measure) cover "
            + ", ".join(f"{100 * c['mean']:.1f} % of {name}" for name, c in covered.items())
            + " images on average.", markup=False,
        )  # fmt: skip
    typer.echo(f"Report: {report['report_markdown']} and {report['report_json']}")
