"""``build_report(run_dir)``: one self-contained ``report.html`` (and ``report.md``) for a training run.

The report only presents what the pipeline already wrote: ``config.yaml``, ``history.csv``, the model card
and ``metrics.json`` (evaluated now if missing). Images are embedded as base64 data URIs and the page has
no scripts or external resources, so it opens offline in any browser and can be mailed as one file.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from bloodcell import __version__
from bloodcell.errors import UserError
from bloodcell.io import atomic_write_text, markdown_code, markdown_text
from bloodcell.notices import quieted

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
#: Config name of the baseline run the report compares against when one sits beside the run.
BASELINE_CONFIG = "seed-replica"

#: Layouts of Aria et al.'s dataset, the Taleqani Hospital images: its own, and its Kaggle 4-class copy's.
ARIA_LAYOUTS = ("aria", "kaggle")
#: Where Aria et al.'s images come from, as the limitations say it.
ARIA_SOURCE = ("images from one hospital laboratory (Taleqani Hospital, Tehran), one camera and one staining "
               "protocol")

CITATION = (
    "Aria M, Ghaderzadeh M, Bashash D, Abolghasemi H, Asadi F, Hosseini A. Acute Lymphoblastic Leukemia (ALL) "
    "image dataset. Kaggle (2021). DOI 10.34740/KAGGLE/DSV/2175623"
)


def limitations(
    classes: Sequence[str], aria: bool, evaluated_on_training_data: bool | None,
    other: str = "the images of one folder (the data source above)",
) -> tuple[str, ...]:
    """The model card's limitations for a model of ``classes``, trained on Aria et al.'s dataset (``aria``) or
    on ``other`` images, and scored on its own training data, on other data, or (None) on images that may be
    either: the model keeps no record of its training images to check them against."""
    source = ARIA_SOURCE if aria else other
    trained = (f"Trained on {source}; whether the images shown here include its training images cannot be checked "
               "(it keeps no record of them)" if evaluated_on_training_data is None
               else f"Trained and evaluated on {source}" if evaluated_on_training_data
               else f"Trained on {source}, and evaluated here on other data")  # fmt: skip
    # Aria's classes were imaged in sessions of their own; of other data nothing is known
    sessions = ("Classes were imaged in their own sessions: colour, background and cell density differ"
                if aria else "Where classes were imaged in their own sessions, colour, background and cell "
                "density differ")  # fmt: skip
    return (
        f"{trained}; performance on other microscopes, stains or populations is unknown.",
        ("The images carry no patient ids: session blocks" if aria else "Unless each patient's images lie in a "
         "sub-folder of their class folder (kept whole in one part), session blocks") + " from capture order are "
        "a proxy for patients, so some patient overlap between training and test parts cannot be ruled out.",
        f"{sessions} between classes (see the shortcut baseline), so accuracy alone does not prove the model "
        "looks at cell morphology.",
        "Input is one microscope field centred on a white blood cell: the model does not find cells in a "
        f"whole slide and says nothing about cell types outside its {len(classes)} classes "
        f"({', '.join(classes)}; it will still name one of them).",
        "Probabilities are calibrated by temperature on the validation part; under acquisition shift they "
        "are less reliable.",
    )


def trained_on_aria(card: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """Whether a model learned from Aria et al.'s dataset, as far as its card tells: the bundled model or one
    trained on the same data (the card's manifest hash), or one whose training folder was in that dataset's
    layout (as its card records, or, for a card from before that record, as the evaluation found it on the
    model's own data, or as the folder is now)."""
    from bloodcell.data.layouts import find_dataset
    from bloodcell.models.card import CARD_FILE, bundled_model_dir

    manifest = card.get("manifest_sha256")
    if manifest and manifest == (_read_json(bundled_model_dir() / CARD_FILE) or {}).get("manifest_sha256"):
        return True
    if card.get("data_layout"):  # recorded at training: cards written before it say nothing, and are looked into
        return card["data_layout"] in ARIA_LAYOUTS
    audit = metrics.get("data_audit") or {}
    if metrics["data"].get("same_as_training") and audit.get("layout") in ARIA_LAYOUTS:
        return True
    root = training_folder(card)
    if not root or not Path(root).is_dir():  # moved, or never recorded: not known to be
        return False
    variant = ((card.get("config") or {}).get("data") or {}).get("variant") or "Original"
    try:  # only looked at: what find_dataset says of the folders beside the classes is for the commands
        with quieted(logging.getLogger("bloodcell.data.layouts")):
            return find_dataset(root, variant).layout in ARIA_LAYOUTS
    except (UserError, OSError):
        return False


def data_source(card: dict[str, Any], aria: bool) -> str:
    """The model card's data source: the dataset's citation when the model learned from Aria et al.'s dataset,
    else the folder its card records (no published dataset to cite)."""
    if aria:
        return CITATION
    root = training_folder(card)
    return f"the images of {root} (no published dataset recorded)" if root else "not recorded in the card"


def training_folder(card: dict[str, Any]) -> str | None:
    """The dataset folder a model card's training config names, or None."""
    return ((card.get("config") or {}).get("data") or {}).get("root")


def _report_name(run_dir: Path, card: dict[str, Any], metrics: dict[str, Any]) -> str:
    """What the report is called: its run's folder (``lab/holdout`` for a refit's holdout stage), and for an
    evaluation folder of a run (``RUN/evaluations/<data>-<hash>-<split>``) whose model it scored that run's
    too; else the model's name. Every run of the default config is named ``default``: the run's folder tells
    two of them apart."""
    def named(run: Path) -> str:
        return f"{run.parent.name}/{run.name}" if run.name == "holdout" else run.name

    if (run_dir / "config.yaml").is_file():
        return named(run_dir)
    run, model = run_dir.parent.parent, Path(str((metrics.get("model") or {}).get("path") or ""))
    if run_dir.parent.name == "evaluations" and (run / "config.yaml").is_file() and model.is_relative_to(run.resolve()):
        return f"{named(run)} ({run_dir.name})"
    return f"{card.get('name') or metrics['model']['architecture']} ({run_dir.name})"


def card_temperature(source: str) -> str:
    """``temperature_source`` said after "the model card's", without "model card" twice: `` (never fitted:
    T = 1)`` for ``model card (never fitted: T = 1)``, nothing for ``model card``."""
    detail = source.removeprefix("model card").lstrip(", ")
    if detail.startswith("(") and detail.endswith(")"):
        detail = detail[1:-1]
    return f" ({detail})" if detail else ""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _pct(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * float(value):.{digits}f} %"


def _ci(interval: Any, digits: int = 3) -> str:
    if not interval or interval[0] is None:
        return "n/a"
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("bloodcell", "report/templates"),
        # HTML templates escape every value; the Markdown one must not (it would print &amp; and &lt; in its
        # prose): it escapes the names and paths it shows with its own filters, md and, in code spans, code (io).
        autoescape=lambda name: name is None or name.endswith(".html.j2"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update({"fmt": _fmt, "pct": _pct, "ci": _ci, "card_temperature": card_temperature,
                        "md": markdown_text, "code": markdown_code})  # fmt: skip
    return env


def image_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI, for a page without external files."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _is_run_png(run_dir: Path, relative: str) -> bool:
    """Whether ``relative`` names a PNG inside the run folder: a report, which travels as one file, must
    never embed another file (``../../etc/passwd``, an absolute path) that a metrics.json names."""
    path = (run_dir / relative).resolve()
    if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _is_evaluation(metrics: dict[str, Any] | None) -> bool:
    from bloodcell.evaluate.runner import METRICS_FORMAT

    return metrics is not None and metrics.get("format") == METRICS_FORMAT


def ensure_metrics(run_dir: Path, evaluate: bool = True, progress: bool = False) -> dict[str, Any]:
    """The run's evaluation (``metrics.json``), running :func:`~bloodcell.evaluate.runner.evaluate_model`
    first when there is none (or only training-time numbers, or one of an older format): on its test part,
    or for a ``kfold`` split, which has none, on its held-out fold (the ``val`` part)."""
    metrics = _read_json(run_dir / "metrics.json") or {}
    if _is_evaluation(metrics):
        return metrics
    found = metrics.get("format")
    # A folder that `bloodcell evaluate --out` wrote (no run of its own): evaluate again what it evaluated.
    again = _evaluated_before(metrics) if found and not (run_dir / "config.yaml").is_file() else None
    if not evaluate:
        state = f"its metrics.json is of an older format ({found})" if found else "no evaluation yet"
        command = (f"bloodcell evaluate {again[0]} --data {again[1]} --split {again[2]} --out {run_dir}" if again
                   else f"bloodcell evaluate {run_dir}")  # fmt: skip
        raise UserError(f"{run_dir}: {state}; run `{command}` first")
    from bloodcell.evaluate.runner import evaluate_model

    if again is not None:
        model, data_root, split = again
        return evaluate_model(model, data_root, split=split, out_dir=run_dir, progress=progress,
                              **_options_of(metrics))  # fmt: skip
    data = (_read_yaml(run_dir / "config.yaml") or {}).get("data") or {}
    if data.get("protocol") == "kfold" and data.get("train_on") == "train+val":
        # The refit learned from the held-out fold too: no image is left that it has not trained on.
        raise UserError(
            f"{run_dir}: a kfold run refit on train + val has no held-out images to report on; report its "
            f"holdout stage (bloodcell report {run_dir / 'holdout'}), or train with --set data.train_on=train"
        )
    split = "val" if data.get("protocol") == "kfold" else "test"
    return evaluate_model(run_dir, split=split, out_dir=run_dir, progress=progress)


def refuse_another_models_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Refuse a training run whose ``metrics.json`` scored a model other than the run's ``checkpoints/best``
    (``evaluate --out`` into it, before that was refused): its report would describe one model with another's
    scores. Warn when it cannot be told (an older evaluation, of no weights hash, whose model folder is gone)."""
    from bloodcell.evaluate.runner import is_same_model
    from bloodcell.models.card import WEIGHTS_FILE

    best = run_dir / "checkpoints" / "best"
    if not (run_dir / "config.yaml").is_file() or not (best / WEIGHTS_FILE).is_file():
        return  # an evaluation folder, not a run: the model it records is the one it describes
    scored = is_same_model(metrics.get("model") or {}, best)
    scored_path = (metrics.get("model") or {}).get("path")
    if scored is False:
        raise UserError(f"{run_dir / 'metrics.json'} scored another model ({scored_path}), not this run's {best}: "
                        f"evaluate this run again (bloodcell evaluate {run_dir}), then build its report")  # fmt: skip
    if scored is None:
        log.warning("%s: cannot tell whether it scored this run's model %s (it records %s, which is gone); if not, "
                    "evaluate this run again: bloodcell evaluate %s", run_dir / "metrics.json", best, scored_path, run_dir)  # fmt: skip


def _evaluated_before(metrics: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(model, data, split)`` that an earlier ``metrics.json`` records, when it records all three."""
    try:
        found = (metrics["model"]["path"], metrics["data"]["root"], metrics["evaluation"]["split"])
    except (KeyError, TypeError):
        return None
    return found if all(isinstance(v, str) and v for v in found) else None


def _options_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The options an earlier evaluation ran with, as far as its ``metrics.json`` shows them (a section it
    has, it computed): so evaluating it again computes the same sections."""
    explained = metrics.get("explain") or {}
    options: dict[str, Any] = {"tta": metrics.get("tta") is not None, "robustness": metrics.get("robustness") is not None,
                               "explain": bool(explained)}  # fmt: skip
    if explained.get("method"):
        options["cam_method"] = explained["method"]
    if explained.get("target_layer"):
        options["target_layer"] = explained["target_layer"]
    return options


def find_baseline_run(run_dir: Path) -> Path | None:
    """The newest sibling run whose config is named ``seed-replica`` and that has an evaluation, or None."""
    if not run_dir.parent.is_dir():
        return None
    candidates = []
    for sibling in run_dir.parent.iterdir():
        if sibling.resolve() == run_dir.resolve() or not (sibling / "config.yaml").is_file():
            continue
        if _read_yaml(sibling / "config.yaml").get("name") == BASELINE_CONFIG and (sibling / "metrics.json").is_file():
            candidates.append(sibling)
    return max(candidates, key=lambda p: (p / "metrics.json").stat().st_mtime) if candidates else None


def _training_plot(run_dir: Path) -> Path | None:
    """The training-curves PNG, drawn now from ``history.csv`` if the evaluation did not draw it."""
    import pandas as pd

    from bloodcell.evaluate.runner import training_history
    from bloodcell.report.plots import plot_training_curves

    target = run_dir / "plots" / "training_curves.png"
    history, note = training_history(run_dir)
    if history.is_file():
        frame = pd.read_csv(history)
        if len(frame) and (not target.is_file() or target.stat().st_mtime < history.stat().st_mtime):
            plot_training_curves(frame, target, note)
    return target if _is_run_png(run_dir, "plots/training_curves.png") else None


def _same_images(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two evaluations scored the same images: by the digest of their contents, or for older
    ``metrics.json`` without one, by part, data and count."""
    digests = a["data"].get("scored_images_sha256"), b["data"].get("scored_images_sha256")
    if all(digests):
        return digests[0] == digests[1]
    keys = [(m["evaluation"]["split"], m["data"]["manifest_sha256"], m["n_images"]) for m in (a, b)]
    return keys[0] == keys[1]


def _comparable_baseline(baseline_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The baseline's evaluation if it scored the same images as ``metrics``; else None, with a warning."""
    baseline = _read_json(baseline_dir / "metrics.json")
    if baseline is None or not _is_evaluation(baseline):
        log.warning("baseline %s has no evaluation of this bloodcell's format; comparison left out", baseline_dir)
        return None
    if not _same_images(baseline, metrics):
        # Scores of different images are not comparable: a test score beside a validation one says nothing.
        log.warning("baseline %s was evaluated on other images (its %s part, %d images) than this run (its %s "
                    "part, %d images); comparison left out", baseline_dir, baseline["evaluation"]["split"],
                    baseline["n_images"], metrics["evaluation"]["split"], metrics["n_images"])  # fmt: skip
        return None
    return baseline


def _comparison(run_dir: Path, metrics: dict[str, Any], baseline_dir: Path | None) -> dict[str, Any]:
    """Side-by-side numbers of this run, the seed-replica baseline and the border-colour shortcut."""
    from bloodcell.report.plots import plot_model_comparison

    columns: list[dict[str, Any]] = [{"name": f"this model ({metrics['model']['architecture']})", "metrics": metrics}]
    baseline = None
    if baseline_dir is not None:
        baseline = _comparable_baseline(baseline_dir, metrics)
        if baseline is not None:
            # Named by its own config (the seed replica's is "seed-replica"), not assumed to be the seed replica.
            label = baseline["model"].get("config_name") or "baseline"
            name = f"{label} ({baseline['model']['architecture']}, {baseline_dir.name})"
            columns.append({"name": name, "metrics": baseline})
    rows = [
        {"name": c["name"], "balanced_accuracy": c["metrics"]["balanced_accuracy"],
         "balanced_accuracy_ci": c["metrics"]["balanced_accuracy_ci"]} for c in columns
    ]  # fmt: skip
    shortcut = metrics.get("shortcut_baseline")
    # Beside the model only when scored on its images (with --split all, the baseline scores the test part).
    if shortcut and shortcut.get("balanced_accuracy") is not None and shortcut.get("scored_on",
            metrics["evaluation"]["split"]) == metrics["evaluation"]["split"]:  # fmt: skip
        rows.append({"name": "border colour only (shortcut)", "balanced_accuracy": shortcut["balanced_accuracy"]})
    plot = plot_model_comparison(rows, run_dir / "plots" / "comparison.png")
    return {"columns": columns, "baseline_dir": str(baseline_dir) if baseline is not None else None, "plot": plot,
            "rows": rows}  # fmt: skip


def caveats(metrics: dict[str, Any]) -> list[str]:
    """What limits the headline numbers, in words both report formats show as warnings."""
    data, split = metrics["data"], metrics["evaluation"]["split"]
    said = []
    if data.get("protocol") == "random":
        said.append("This model was split with the random (image-level) protocol. Image-level random splits leak: "
                    "neighbouring images of one patient and session fall on both sides, so these numbers overstate "
                    "what the model does on new patients. Use the session protocol for honest numbers.")  # fmt: skip
    if data.get("training_images_left_out", 0) is None:
        said.append("These are not the data the model was trained on, and the model has no record of its training "
                    "images (trained-on.sha256): these numbers may include images it trained on, which would "
                    "flatter them.")  # fmt: skip
    trained_on = data.get("trained_on", [])
    if split == "val" and "val" in trained_on:
        said.append("The model learned from these validation images: these are not held-out scores.")
    elif split == "val" and data.get("same_as_training") and Path(metrics["model"]["path"]).parts[-2:] == (
            "checkpoints", "best"):  # fmt: skip
        said.append(f"The model is the epoch ({metrics['model'].get('epoch')}) that scored best on these same "
                    "validation images, chosen on them: this score is the best of several on the same images, "
                    "so it is optimistic; the held-out test part, or the run's last epoch, is the fair measure.")  # fmt: skip
    return said


def report_context(run_dir: Path, metrics: dict[str, Any], baseline_dir: Path | None) -> dict[str, Any]:
    """Everything the templates show, gathered from the run's files (plots as paths)."""
    from bloodcell.evaluate.shifts import SEVERITY_NAMES, shift_table

    model_dir = Path(metrics["model"]["path"])
    if not (model_dir / "card.json").is_file():  # a relative path that an older evaluation wrote elsewhere
        model_dir = run_dir / "checkpoints" / "best"
    card = _read_json(model_dir / "card.json") or {}
    config = _read_yaml(run_dir / "config.yaml") or card.get("config", {})
    plots = {name: run_dir / rel for name, rel in metrics.get("plots", {}).items() if _is_run_png(run_dir, rel)}
    training = _training_plot(run_dir)
    if training is not None:
        plots["training_curves"] = training
    comparison = _comparison(run_dir, metrics, baseline_dir)
    plots["comparison"] = comparison["plot"]
    if _is_run_png(run_dir, "plots/gradcam_grid.png"):  # not a link to a file outside the run
        plots["gradcam_grid"] = run_dir / "plots" / "gradcam_grid.png"
    from bloodcell.evaluate.runner import training_history

    history_rows, (history, history_note) = [], training_history(run_dir)
    if history.is_file():
        import pandas as pd

        history_rows = pd.read_csv(history).to_dict("records")
    from bloodcell.evaluate.runner import evaluated_scope
    from bloodcell.explain.gradcam import CELL_FOCUS_MARGIN

    aria = trained_on_aria(card, metrics)

    return {
        # A run is named by its folder; an evaluation folder elsewhere (e.g. of the bundled model) by its model.
        "run_name": _report_name(run_dir, card, metrics),
        "run_dir": str(run_dir),
        "scope": evaluated_scope(metrics, metrics["data"]["root"]),
        "caveats": caveats(metrics),
        "cell_focus_margin": CELL_FOCUS_MARGIN,
        "version": __version__,
        "metrics": metrics,
        "card": card,
        "config": config,
        "config_yaml": yaml.safe_dump(config, sort_keys=False) if config else "",
        "history": history_rows,
        "history_note": history_note,
        "plots": plots,
        "comparison": comparison,
        "shift_table": shift_table(),
        # Standardising each image undoes the brightness_contrast shift (but for 8-bit rounding): the report says so.
        "per_image_standardised": bool(((card.get("config") or {}).get("normalize") or {}).get("per_image")),
        "severity_names": SEVERITY_NAMES,
        "limitations": limitations(card.get("classes") or metrics["classes"], aria,
                                   bool(metrics["data"].get("same_as_training"))),
        "citation": data_source(card, aria),
    }


def build_report(
    run_dir: str | Path, baseline: str | Path | None = None, evaluate: bool = True, progress: bool = False
) -> Path:
    """Write ``report.html`` (self-contained) and ``report.md`` into a run directory.

    Parameters
    ----------
    run_dir: a training run (``config.yaml``, ``history.csv``, ``checkpoints/best``) or any folder holding
        a ``metrics.json`` written by ``bloodcell evaluate``.
    baseline: a run to compare against; None looks for a sibling run whose config is ``seed-replica``.
    evaluate: evaluate the run's test part first when it has no ``metrics.json``.
    progress: progress bars on stderr while evaluating.

    Returns the path of ``report.html``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    metrics = ensure_metrics(run_dir, evaluate, progress)
    refuse_another_models_metrics(run_dir, metrics)
    baseline_dir = Path(baseline) if baseline is not None else find_baseline_run(run_dir)
    if baseline_dir is not None and not _is_evaluation(_read_json(baseline_dir / "metrics.json")):
        try:  # none yet, or of an older format: evaluated now, as this run's own
            ensure_metrics(baseline_dir, evaluate, progress)
        except (UserError, FileNotFoundError) as error:  # no model left there, or nothing to evaluate
            if baseline is not None:  # asked for by name: its failure is the user's to see
                raise
            log.warning("baseline %s left out: %s", baseline_dir, error)  # found by itself: the report goes on
            baseline_dir = None
    context = report_context(run_dir, metrics, baseline_dir)
    env = _environment()
    html_images = {name: image_data_uri(path) for name, path in context["plots"].items()}
    md_images = {name: Path(path).relative_to(run_dir).as_posix() if Path(path).is_relative_to(run_dir) else str(path)
                 for name, path in context["plots"].items()}  # fmt: skip
    html = env.get_template("report.html.j2").render(**context, images=html_images)
    markdown = env.get_template("report.md.j2").render(**context, images=md_images)
    atomic_write_text(run_dir / REPORT_MD, markdown)
    return atomic_write_text(run_dir / REPORT_HTML, html)
