"""The demo: the default model on the sample images shipped with the package, in one call.

``run_demo(out_dir)`` predicts every sample image, writes ``predictions.csv`` / ``predictions.json``, one
Grad-CAM overlay PNG per image under ``overlays/`` and a self-contained ``report.html`` (images embedded,
no scripts, opens offline). It only strings together the serving and explanation stages
(:class:`~bloodcell.serve.predictor.TorchPredictor`, :func:`~bloodcell.explain.gradcam.explain_images`,
:func:`~bloodcell.serve.predictor.overlay_png`), so the demo shows exactly what ``bloodcell predict`` and
the web page do.

The sample images (``bloodcell/assets/samples/<class folder>/``, see ``CITATION.md`` there) were chosen by
:func:`select_sample_images` from the *test* part of the default config's session split (seed 0), so the
bundled default model, trained on train + val, never saw them.

Heavy modules (torch, pytorch-grad-cam, pandas) are imported inside the functions that need them: the demo
is a new user's first command and ``bloodcell --help`` must stay fast.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloodcell.data.decode import ImageError, open_rgb
from bloodcell.errors import UserError
from bloodcell.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    probability_columns,
    spreadsheet_safe,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from bloodcell.serve.common import PredictionResult
    from bloodcell.serve.predictor import TorchPredictor

#: At most this many images may be shipped (the dataset's terms for the team: a handful, with the citation).
MAX_SAMPLES = 12
#: Sample images per class chosen by :func:`select_sample_images`.
SAMPLES_PER_CLASS = 3
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
REPORT_HTML = "report.html"
OVERLAY_DIR = "overlays"
#: The longest side of a sample as the report shows it (the overlays are the model's input size).
REPORT_PICTURE_SIDE = 512

#: The paper that published the dataset (the dataset itself is cited by ``bloodcell.report.html.CITATION``).
PAPER_CITATION = (
    "Ghaderzadeh M, Aria M, Hosseini A, Asadi F, Bashash D, Abolghasemi H. A fast and efficient CNN model for "
    "B-ALL diagnosis and its subtypes classification using peripheral blood smear images. Int J Intell Syst. "
    "2022;37:5113-5133. doi:10.1002/int.22753"
)


@dataclass
class DemoImage:
    """One sample image: its file, the class its folder names, the prediction and its Grad-CAM overlay."""

    path: Path
    true_class: str
    result: PredictionResult
    overlay: Path | None = None
    judged: bool = True  # its folder's class is one of the model's (else no verdict: None)

    @property
    def correct(self) -> bool | None:
        """Whether the model named its folder's class; None for a folder of no class the model knows (the
        shipped samples' classes shown to a model of another lab's classes) and for a file that could not be
        read (no prediction to judge: counting it wrong would blame the model for a broken file)."""
        return self.result.label == self.true_class if self.judged and self.result.ok else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the predictor's fields (``file``, ``class``, ...) plus ``true_class``, ``correct``, ``overlay``."""
        return {
            **self.result.to_dict(),
            "true_class": self.true_class,
            "correct": self.correct,
            "overlay": None if self.overlay is None else str(self.overlay),
        }


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote and found."""

    out_dir: Path
    model_dir: Path
    bundled_model: bool
    model_info: dict[str, str]
    classes: list[str]
    temperature: float
    images: list[DemoImage]
    predictions_csv: Path
    predictions_json: Path
    report: Path
    seconds: float
    card: dict[str, Any] = field(default_factory=dict)
    bundled_samples: bool = True  # the shipped sample images (Aria et al.'s), not a folder given by --samples
    #: How many samples are images the model was trained on (see :func:`count_training_images`); None: the
    #: model keeps no record of its training images, so it cannot be checked.
    n_trained_on: int | None = None
    #: Whether that count knows re-encoded copies too (the record holds perceptual hashes), not only bytes.
    trained_on_by_picture: bool = False

    @property
    def n_correct(self) -> int:
        return sum(image.correct is True for image in self.images)

    @property
    def n_judged(self) -> int:
        """The images a verdict is given for: read, and in a folder of a class the model knows."""
        return sum(image.correct is not None for image in self.images)

    @property
    def n_unreadable(self) -> int:
        """The images that could not be read (no prediction, no verdict)."""
        return sum(not image.result.ok for image in self.images)

    @property
    def n_unknown_class(self) -> int:
        """The images read but in a folder of no class the model knows (no verdict)."""
        return sum(image.result.ok and not image.judged for image in self.images)

    @property
    def training_note(self) -> str:
        """One sentence on whether the samples are images the model learned from: a verdict on those says
        nothing of how it does on new images."""
        if self.bundled_model and self.bundled_samples and self.n_trained_on == 0:
            return ("The samples come from the held-out test part of the session split (seed 0); the bundled "
                    "model was trained without them.")  # fmt: skip
        if self.n_trained_on is None:
            return ("Whether the samples are images the model was trained on cannot be checked: it keeps no "
                    "record of its training images (trained-on.sha256).")  # fmt: skip
        how = "" if self.trained_on_by_picture else " (by their bytes only: it recorded no perceptual hashes)"
        return f"{self.n_trained_on} of {len(self.images)} samples are images the model was trained on{how}."

    @property
    def serve_command(self) -> str:
        """The command that serves this model on the web page, quoted for a POSIX shell."""
        if self.bundled_model:
            return "bloodcell serve"
        return f"bloodcell serve {shlex.quote(str(self.model_dir))}"


def samples_dir() -> Path:
    """The folder of sample images shipped inside the package (``bloodcell/assets/samples``)."""
    return Path(str(resources.files("bloodcell") / "assets" / "samples"))


def sample_images(folder: str | Path | None = None) -> list[tuple[Path, str]]:
    """The sample images and their true classes: ``(file, canonical class)`` pairs in class order.

    Parameters
    ----------
    folder: a folder with one sub-folder per class (any alias :mod:`bloodcell.data.layouts` knows, e.g.
        Aria's ``Benign/Early/Pre/Pro``); None uses the samples shipped with the package.

    Raises :class:`UserError` when the folder is missing or holds no class folders with images.
    """
    from bloodcell.data.layouts import find_dataset, is_image_name

    dataset = find_dataset(samples_dir() if folder is None else folder)
    files = [(dataset.root / path, name) for path, name in dataset.files if is_image_name(path)]
    if not files:
        raise UserError(f"{dataset.root}: no sample images found")
    return files


# The size images are judged at when choosing samples: fixed, so the choice does not follow the training
# resolution of whatever config defines the split (it was made, and is documented, at 128 px).
SELECTION_SIZE = 128


def select_sample_images(
    data_root: str | Path, per_class: int = SAMPLES_PER_CLASS, config: str = "default", min_capture_gap: int = 10,
    max_typicality: float = 2.0,
) -> pd.DataFrame:
    """Choose sample images from the test part of ``config``'s split: typical, distinct, spread over sessions.

    This is how the shipped samples were chosen (run once by hand; the result is recorded in the samples'
    ``CITATION.md``). No model is involved, so the choice cannot favour images the model gets right.

    Rules, per class: only rows of the ``test`` part of the config's split (protocol, seed and fractions of
    its ``data`` section); no member of a duplicate group and no ``(1)``-style copy; in focus (the sharper
    half of the class's test images by :func:`sharpness`); "typical" = closest
    to the class's median colour statistics (per-channel mean and standard deviation, in units of their
    spread over the class's test images), so an odd exposure or an off-centre crop is not picked; and
    spread over the test part's session blocks among the typical ones (typicality at most
    ``max_typicality``: the best image of each block first, then the second-best ...) and at least
    ``min_capture_gap`` capture numbers apart.

    Parameters
    ----------
    data_root: the dataset folder (Aria layout: the folder holding ``Original``).
    per_class: images chosen per class.
    config: a config name or YAML path whose ``data`` section defines the split.
    min_capture_gap: smallest distance in capture numbers between two images of a class.
    max_typicality: largest distance to the class median that still counts as typical (less typical images
        are taken only when too few typical ones remain).

    Returns the chosen split rows (``path`` relative to the variant root, ``class``, ``block``,
    ``capture``, ``typicality`` = distance to the median, lower is more typical), in class order.
    """
    import numpy as np
    import pandas as pd

    from bloodcell.config import load_config
    from bloodcell.data.audit import colour_statistics_features
    from bloodcell.data.decode import decode_image
    from bloodcell.data.index import build_index
    from bloodcell.data.splits import make_split

    data = load_config(config).data
    indexed = build_index(data_root, data.variant, data.class_names, progress=False)
    split = make_split(
        indexed.manifest, data.protocol, data.split_seed, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, block_size=data.block_size, embargo=data.embargo,
        folds=data.folds, fold=data.fold,
    )  # fmt: skip
    group_sizes = split["dup_group"].map(split["dup_group"].value_counts())
    test = split[(split["split"] == "test") & (group_sizes == 1) & (split["copy"] == 0)].copy()
    if test.empty:
        raise UserError(f"{data_root}: the {data.protocol} split (seed {data.split_seed}) has no test images to choose from")
    images = np.stack([decode_image(indexed.dataset.root / path, SELECTION_SIZE) for path in test["path"]])
    features = colour_statistics_features(images)
    chosen = []
    focus = sharpness(images)
    for _, rows in test.groupby("label", sort=True):
        position = test.index.get_indexer(rows.index)
        # Out-of-focus captures exist in every class: only the sharper half of the class is a candidate.
        sharp = focus[position] >= np.median(focus[position])
        rows, own = rows[sharp], features[position][sharp]
        spread = np.percentile(own, 75, axis=0) - np.percentile(own, 25, axis=0)
        distance = np.sqrt((((own - np.median(own, axis=0)) / np.where(spread > 0, spread, 1.0)) ** 2).sum(axis=1))
        rows = rows.assign(typicality=distance)
        # Spread over sessions only among typical images: a block whose colours are far from the class
        # median would otherwise contribute its least-odd image anyway.
        rows["atypical"] = rows["typicality"] > max_typicality
        rows["rank_in_block"] = rows.groupby(["atypical", "block"])["typicality"].rank(method="first")
        picked: list[int] = []
        for index, row in rows.sort_values(["atypical", "rank_in_block", "typicality"]).iterrows():
            # Neighbouring captures are often the same smear: keep the picks apart in capture order.
            if all(abs(row["capture"] - rows.at[other, "capture"]) >= min_capture_gap for other in picked):
                picked.append(index)
            if len(picked) == per_class:
                break
        chosen.append(rows.loc[picked])
    columns = ["path", "class", "block", "capture", "typicality"]
    return pd.concat(chosen)[columns].reset_index(drop=True)


def sharpness(images: np.ndarray) -> np.ndarray:
    """Focus measure per image: variance of the Laplacian of the grey image (higher is sharper), ``(N,)``.

    Parameters
    ----------
    images: uint8 ``(N, H, W, 3)`` RGB images of one size.
    """
    import numpy as np

    grey = images.astype(np.float32).mean(axis=3)
    laplacian = (
        4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    )
    return laplacian.reshape(len(images), -1).var(axis=1)


def demo_model_dir(model: str | Path | None) -> tuple[Path, bool]:
    """The model directory the demo runs, and whether it is the bundled default.

    Raises :class:`UserError` with one line saying what to do when no model is named and none is bundled,
    or when the named one does not exist.
    """
    from bloodcell.models.card import bundled_model_dir, resolve_model_dir

    if model is None:
        try:
            return resolve_model_dir(None), True
        except FileNotFoundError:
            raise UserError(
                f"no bundled default model is installed yet ({bundled_model_dir()} has no card.json): "
                "run the demo with --model RUN_OR_MODEL_DIR, e.g. a run from `bloodcell train`"
            ) from None
    try:
        return resolve_model_dir(model), False
    except FileNotFoundError as error:
        raise UserError(str(error)) from None


def run_demo(
    out_dir: str | Path = "demo-output",
    model: str | Path | None = None,
    samples: str | Path | None = None,
) -> DemoResult:
    """Predict the sample images, explain each prediction with Grad-CAM and write the files and the report.

    Parameters
    ----------
    out_dir: folder for ``predictions.csv``, ``predictions.json``, ``overlays/*.png`` and ``report.html``
        (created; files of the same name from an earlier run are replaced).
    model: a run directory, model directory or ``card.json``; None uses the bundled default model.
    samples: a folder of images in class folders (see :func:`sample_images`); None uses the shipped samples.

    Returns a :class:`DemoResult`. Raises :class:`UserError` when there is no model or no sample image.
    """
    start = time.perf_counter()
    model_dir, bundled = demo_model_dir(model)
    files = sample_images(samples)
    from bloodcell.serve.predictor import TorchPredictor  # torch: only once we know there is work to do

    predictor = TorchPredictor(model_dir)
    results = predictor.predict_files([path for path, _ in files])
    out = Path(out_dir)
    earlier = earlier_overlays(out / PREDICTIONS_JSON)
    overlays = write_overlays(predictor, [path for path, _ in files], results, out / OVERLAY_DIR, earlier)
    matched = [model_class([path.parent.name, true_class], predictor.classes) for path, true_class in files]
    images = [
        DemoImage(path, known or true_class, result, overlay, judged=known is not None)
        for (path, true_class), known, result, overlay in zip(files, matched, results, overlays, strict=True)
    ]
    n_trained_on, by_picture = count_training_images(model_dir, [path for path, _ in files])
    demo = DemoResult(
        out_dir=out, model_dir=model_dir, bundled_model=bundled, model_info=predictor.model_info,
        classes=list(predictor.classes), temperature=predictor.temperature, images=images,
        predictions_csv=out / PREDICTIONS_CSV, predictions_json=out / PREDICTIONS_JSON, report=out / REPORT_HTML,
        seconds=0.0, card=predictor.card, n_trained_on=n_trained_on,
        # the shipped samples, by default or named by their folder: the same images say the same things
        bundled_samples=samples is None or Path(samples).resolve() == samples_dir().resolve(),
        trained_on_by_picture=by_picture,
    )  # fmt: skip
    write_predictions(demo)
    demo.seconds = time.perf_counter() - start
    write_report(demo)
    return demo


def count_training_images(model_dir: Path, paths: Sequence[Path]) -> tuple[int | None, bool]:
    """How many of ``paths`` are images the model in ``model_dir`` was trained on, told by content as
    ``bloodcell evaluate`` tells them: the same bytes (its ``trained-on.sha256``) or, where the record holds
    perceptual hashes (``trained-on.phash``), a re-encoded or resized copy (within
    :data:`~bloodcell.data.index.NEAR_DUPLICATE_MAX_DISTANCE` bits). Returns the count (None when neither the
    model's folder nor its run keeps a record) and whether perceptual hashes were compared."""
    from bloodcell.data.index import inspect_file
    from bloodcell.evaluate.runner import run_dir_of
    from bloodcell.models.card import load_trained_on

    run_dir = run_dir_of(model_dir)
    record = load_trained_on([model_dir, *([run_dir] if run_dir is not None else [])])
    if record is None:
        return None, False
    facts = [inspect_file(path) for path in paths]
    seen = record.holds([fact["sha256"] for fact in facts], [fact["phash"] for fact in facts])
    return int(seen.sum()), bool(record.phash)


def model_class(names: Sequence[str], classes: Sequence[str]) -> str | None:
    """The model's class that a sample's ``names`` (its folder's name, then the class it stands for) name,
    matched loosely as ``--classes`` matches folders: the same name first (``normal`` for ``Normal``, a
    model's ``Hematogone`` for a ``Hematogone/`` folder), else the one class whose alias it shares
    (``early`` for ``Early Pre-B``); None when none or several do."""
    from bloodcell.data.layouts import canonical_class, normalise_name

    for name in names:
        same = [model for model in classes if normalise_name(model) == normalise_name(name)]
        if same:
            return same[0]
    aliases = {canonical_class(name) for name in names} - {None}
    shared = [model for model in classes if canonical_class(model) in aliases]
    return shared[0] if len(shared) == 1 else None


def earlier_overlays(predictions_json: Path) -> set[str]:
    """The overlay file names an earlier demo recorded in its ``predictions.json`` (none if there is none)."""
    try:
        results = json.loads(predictions_json.read_text(encoding="utf-8"))["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    overlays = [result.get("overlay") for result in results if isinstance(result, dict)] if isinstance(results, list) else []
    # Names only, and only of overlays: a hand-edited file cannot reach outside the folder or another file.
    return {Path(path).name for path in overlays if isinstance(path, str) and Path(path).name.endswith(".gradcam.png")}


def write_overlays(
    predictor: TorchPredictor, paths: list[Path], results: list[PredictionResult], folder: Path,
    earlier: Iterable[str] = (),
) -> list[Path | None]:
    """Grad-CAM of each predicted class over the full-resolution image, as ``<folder>/<stem>.gradcam.png``.

    The ``earlier`` overlays (an earlier demo's, by name) that this run does not write again are removed, so
    the folder matches its predictions; any other file there (``bloodcell explain``'s overlays, named
    alike) is left alone. Returns the overlay of every path (None where the prediction failed), in order.
    """
    overlays: list[Path | None] = [None] * len(paths)
    done = [i for i, result in enumerate(results) if result.ok]
    if done:
        _write_overlay_files(predictor, paths, results, folder, done, overlays)
    for name in set(earlier) - {overlay.name for overlay in overlays if overlay is not None}:
        (folder / name).unlink(missing_ok=True)
    return overlays


def _write_overlay_files(predictor: TorchPredictor, paths: list[Path], results: list[PredictionResult], folder: Path,
                         done: list[int], overlays: list[Path | None]) -> None:  # fmt: skip
    """:func:`write_overlays`' CAMs of the images ``done``, written and entered in ``overlays``."""
    import numpy as np

    from bloodcell.data.decode import resize_rgb
    from bloodcell.explain.gradcam import explain_images, overlay_stems
    from bloodcell.serve.predictor import overlay_png

    pictures = {i: open_rgb(paths[i]) for i in done}
    # resize_rgb(open_rgb(...)) is decode_image: the CAM sees exactly the input the prediction saw.
    batch = np.stack([resize_rgb(pictures[i], predictor.input_size) for i in done])
    targets = np.asarray([predictor.classes.index(results[i].predicted_label) for i in done])
    # One batched pass instead of TorchPredictor.explain per image (a private model copy and a probe pass
    # each time): on a busy 2-core CPU that is the difference between one second and ten. The demo runs
    # nothing else on the predictor's model meanwhile, so the CAM hooks cannot disturb a prediction.
    cams = explain_images(predictor.model, batch, targets=targets).cams
    stems = overlay_stems([path.stem for path in paths])  # cell.jpg in two class folders: two overlays
    for cam, i in zip(cams, done):
        png = overlay_png(np.asarray(pictures[i], dtype=np.uint8), cam)
        overlays[i] = atomic_write_bytes(folder / f"{stems[i]}.gradcam.png", png)


def write_predictions(demo: DemoResult) -> None:
    """Write ``predictions.json`` (model, classes, one object per image) and ``predictions.csv`` atomically."""
    atomic_write_json(
        demo.predictions_json,
        {
            "model": {**demo.model_info, "directory": str(demo.model_dir), "bundled": demo.bundled_model},
            "classes": demo.classes,
            "temperature": demo.temperature,
            "n_images": len(demo.images),
            "n_correct": demo.n_correct,
            "n_judged": demo.n_judged,
            "n_unreadable": demo.n_unreadable,
            "n_trained_on": demo.n_trained_on,  # null: the model keeps no record of its training images
            "training_note": demo.training_note,
            "results": [image.to_dict() for image in demo.images],
        },
    )
    buffer = io.StringIO()
    columns = probability_columns(demo.classes)
    fields = ["file", "true_class", "predicted_class", "correct", "confidence", *columns, "overlay", "error"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for image in demo.images:
        result = image.result
        writer.writerow(
            {
                "file": spreadsheet_safe(str(image.path)), "true_class": spreadsheet_safe(image.true_class),
                "predicted_class": spreadsheet_safe(result.label or ""),
                "correct": "" if image.correct is None else image.correct, "confidence": _decimal(result.confidence),
                **{column: _decimal(result.probabilities.get(name)) for name, column in zip(demo.classes, columns)},
                "overlay": "" if image.overlay is None else spreadsheet_safe(str(image.overlay)),
                "error": spreadsheet_safe(result.error or ""),
            }
        )  # fmt: skip
    atomic_write_text(demo.predictions_csv, buffer.getvalue())


def _decimal(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _data_uri(path: Path) -> str:
    """A PNG file (an overlay this demo wrote) as a base64 data URI, so the report is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _picture_uri(path: Path, side: int = REPORT_PICTURE_SIDE) -> str | None:
    """The picture the model saw (decoded, camera orientation applied), at most ``side`` px, as a JPEG data
    URI; None where it cannot be read. Not the file's own bytes: a browser shows no TIFF, and a sample may be
    any size."""
    try:
        with open_rgb(path) as image:
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
    except ImageError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def headline_metric(card: dict[str, Any]) -> dict[str, Any] | None:
    """``{"value", "ci"}`` of the balanced accuracy a model card records (test part), or None if it has none.

    ``bloodcell evaluate`` records the test part's numbers under ``metrics["test"]``; a card that holds
    them at the top of ``metrics`` is read too. Training-time cards record only validation numbers
    (``val_balanced_accuracy``); those are not shown, as the demo's page would present them as the model's
    performance.
    """
    metrics = card.get("metrics") or {}
    test = metrics.get("test")
    if isinstance(test, dict) and "balanced_accuracy" in test:
        metrics = test
    value = metrics.get("balanced_accuracy")
    if not isinstance(value, (int, float)):
        return None
    interval = metrics.get("balanced_accuracy_ci")
    ci = None
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval):
        ci = [float(v) for v in interval]
    return {"value": float(value), "ci": ci}


def _limitations(demo: DemoResult) -> tuple[str, ...]:
    """The model card's limitations for the demo's model: the bundled one's, or another model's (--model)
    own: its classes, and the data it learned from."""
    from bloodcell.report.html import limitations, trained_on_aria, training_folder

    if demo.bundled_model:
        return limitations(demo.classes, True, _shown_its_own_data(demo, aria=True))
    aria = trained_on_aria(demo.card, {"data": {}})
    root = training_folder(demo.card)
    other = f"the images of {root}" if root else "images its model card does not name"
    return limitations(demo.classes, aria, _shown_its_own_data(demo, aria), other)


def _shown_its_own_data(demo: DemoResult, aria: bool) -> bool | None:
    """Whether the samples are of the data the model learned from: some are images it trained on; or they
    are the shipped ones (Aria et al.'s) and so was its data (the bundled model's held-out test images).
    None where the model keeps no record of its training images, whatever the samples: that cannot be
    checked either way."""
    if demo.n_trained_on is None:
        return None
    if demo.n_trained_on:
        return True
    return aria if demo.bundled_samples else False


def write_report(demo: DemoResult) -> Path:
    """Render ``report.html`` (the report stage's template ``demo.html.j2``; images embedded) atomically."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    from bloodcell import __version__
    from bloodcell.report.html import CITATION

    env = Environment(loader=PackageLoader("bloodcell", "report/templates"), autoescape=True, undefined=StrictUndefined)
    rows = [
        {
            "name": image.path.name, "true_class": image.true_class, "predicted": image.result.label,
            "correct": image.correct, "error": image.result.error, "confidence": image.result.confidence,
            "probabilities": [(name, image.result.probabilities.get(name, 0.0)) for name in demo.classes],
            "image": _picture_uri(image.path), "overlay": None if image.overlay is None else _data_uri(image.overlay),
        }
        for image in demo.images
    ]  # fmt: skip
    html = env.get_template("demo.html.j2").render(
        demo=demo, rows=rows, headline=headline_metric(demo.card), version=__version__, citation=CITATION,
        paper_citation=PAPER_CITATION, limitations=_limitations(demo), seconds=f"{demo.seconds:.1f}",
    )  # fmt: skip
    return atomic_write_text(demo.report, html)
