"""What the torch and the ONNX Runtime predictors share: results, temperature, file batching.

This module must not import torch (the ONNX Runtime predictor builds on it). A predictor only has to
provide :meth:`BasePredictor.logits` on a uint8 NHWC batch; everything else (temperature, test-time
augmentation, decoding files in a thread pool ahead of the network, per-file errors) is implemented once,
here.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

from bloodcell import (
    CARD_FORMAT,
    CARD_INPUT_SIZES,
    card_bytes,
    card_classes_problem,
    card_format_problem,
    card_temperature_problem,
)
from bloodcell.data.decode import IMAGE_SUFFIXES, Decoded, decode_or_reason
from bloodcell.errors import ModelFileError
from bloodcell.io import printable_path, sha256_file
from bloodcell.machine import available_cores
from bloodcell.notices import warn_once
from bloodcell.probabilities import softmax_with_temperature

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
#: Default number of images a predictor runs through the network at once.
DEFAULT_BATCH = 64
#: Batches decoded ahead of the network in ``predict_files`` (bounds memory: 2 x 64 images).
PREFETCH_BATCHES = 2
#: Largest batch sent through the network at once, whatever batch a caller asks for, so a huge ``predict``
#: call cannot exhaust memory (the network's activations grow with the batch; ONNX Runtime's too).
MAX_FORWARD_BATCH = 256


@dataclass
class PredictionResult:
    """The prediction for one input: class name and per-class probabilities, or the reason it failed.
    ``size`` is the file's ``(width, height)`` before it was resized to the model's square input (None for
    a failed input, or one given as pixels): ``predict`` names the images that resizing squashed."""

    source: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    size: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def predicted_label(self) -> str:
        """The predicted class; raises ValueError for a failed input (see ``ok``)."""
        if self.label is None:
            raise ValueError(f"{self.source}: no prediction ({self.error})")
        return self.label

    @property
    def confidence(self) -> float | None:
        """Probability of the predicted class (None for a failed input)."""
        return self.probabilities.get(self.label) if self.label is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``file``, ``class``, ``confidence``, ``probabilities``, ``error``."""
        return {
            "file": self.source,
            "class": self.label,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            "error": self.error,
        }


def read_card_json(directory: str | Path) -> dict[str, Any]:
    """Read ``card.json`` from ``directory`` as a plain dict (no torch, no pydantic model needed).

    Raises FileNotFoundError when it is missing and :class:`~bloodcell.errors.ModelFileError` (a ValueError)
    when it is not JSON or lacks what a predictor needs.
    """
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model card beside the model (expected {CARD_FILE})")
    try:
        card = json.loads(card_bytes(path))
    # A RecursionError: arrays nested 100,000 deep, which no card holds.
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path}: not a valid model card ({' '.join(str(error).split())[:200]})") from None
    problem = _card_problem(card)
    if problem:
        raise ModelFileError(f"{path}: {problem}")
    return card  # a dict: _card_problem checked


def _card_problem(card: Any) -> str | None:
    """What in a parsed ``card.json`` a predictor cannot use (None when nothing): the same rules as the
    PyTorch reader's :class:`~bloodcell.models.card.ModelCard` for the fields both read, so that a model
    loads with both backends or with neither, and a hand-edited card is one line of error, not a traceback."""
    if not isinstance(card, dict):
        return f"not a valid model card (expected a JSON object, got a {type(card).__name__})"
    if problem := card_format_problem(card.get("format", CARD_FORMAT)):
        return f"format {problem}"
    missing = [key for key in ("classes", "input_size") if key not in card]
    if missing:
        return f"model card lacks {', '.join(missing)}"
    size = card["input_size"]
    if not (isinstance(size, int) and not isinstance(size, bool) and size in CARD_INPUT_SIZES):
        return (f"input_size must be a whole number of pixels from {CARD_INPUT_SIZES.start} to "
                f"{CARD_INPUT_SIZES.stop - 1}, got {size!r}")  # fmt: skip
    for field_name, problem in (("classes", card_classes_problem(card["classes"])),
                                ("temperature", card_temperature_problem(card.get("temperature", 1.0)))):  # fmt: skip
        if problem:
            return f"{field_name} {problem}"
    return _onnx_section_problem(card.get("onnx", {}))


def _onnx_section_problem(section: Any) -> str | None:
    """What is wrong with a card's ``onnx`` section (what ``bloodcell export`` records of the graph), if any:
    the predictor compares its graph version and digests."""
    if not isinstance(section, dict):
        return f"onnx must be an object (what bloodcell export records), got {str(section)[:80]!r}"
    version = section.get("graph_version", 1)
    if not (isinstance(version, int) and not isinstance(version, bool)):
        return f"onnx.graph_version must be a whole number, got {str(version)[:80]!r}"
    return None


class BasePredictor:
    """Shared predictor logic. Subclasses set the card fields and implement :meth:`logits`.

    Attributes: ``card`` (dict), ``classes`` (list of names), ``input_size`` (pixels), ``temperature``,
    ``tta`` (None for no test-time augmentation, else a view set name of
    :mod:`bloodcell.evaluate.tta`: ``"d4"`` or ``"flips"``), ``backend`` (``torch`` or ``onnx``).
    """

    backend = "base"

    def __init__(self, card: dict[str, Any], tta: bool | str | None = None) -> None:
        self.card = card
        self.classes: list[str] = list(card["classes"])
        self.input_size = int(card["input_size"])
        self.temperature = float(card.get("temperature", 1.0))
        self.tta = _tta_views_name(tta)

    @property
    def model_info(self) -> dict[str, str]:
        """``{"name", "version", "architecture"}`` of the served model."""
        return {
            "name": str(self.card.get("name", "bloodcell-model")),
            "version": str(self.card.get("version", "0")),
            "architecture": str(self.card.get("architecture", "")),
        }

    # -- to implement ---------------------------------------------------------------------------------
    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, K)`` of a uint8 ``(N, input_size, input_size, 3)`` RGB batch of at most
        :data:`MAX_FORWARD_BATCH` images (:meth:`predict_logits` splits larger ones)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------
    def check_batch(self, images: np.ndarray) -> np.ndarray:
        """Validate a batch's shape and type; returns it as a contiguous uint8 array."""
        images = np.asarray(images)
        expected = (self.input_size, self.input_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected a uint8 batch of shape (N, {', '.join(map(str, expected))}), got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels in 0..255, got {images.dtype}")
        return np.ascontiguousarray(images)

    def predict_logits(self, images: np.ndarray, tta: bool | str | None = None) -> np.ndarray:
        """Logits of a batch, averaged over the test-time-augmentation views when TTA is on."""
        images = self.check_batch(images)
        views = self.tta if tta is None else _tta_views_name(tta)
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        if views is None:
            return self._logits_in_chunks(images)
        from bloodcell.evaluate.tta import tta_logits  # numpy only, like this module

        return tta_logits(self._logits_in_chunks, images, views)

    def _logits_in_chunks(self, images: np.ndarray) -> np.ndarray:
        """:meth:`logits` of any batch, run :data:`MAX_FORWARD_BATCH` images at a time (each image's logits
        do not depend on the others in its batch)."""
        if len(images) <= MAX_FORWARD_BATCH:
            return self.logits(images)
        return np.concatenate([self.logits(images[start : start + MAX_FORWARD_BATCH])
                               for start in range(0, len(images), MAX_FORWARD_BATCH)])  # fmt: skip

    def predict(self, images: np.ndarray, tta: bool | str | None = None) -> np.ndarray:
        """Class probabilities ``(N, K)`` float32 of a uint8 NHWC batch, with the card's temperature.

        Parameters
        ----------
        images: uint8 ``(N, input_size, input_size, 3)`` RGB (see :func:`bloodcell.data.decode.decode_image`).
        tta: override the predictor's TTA setting for this call (True = ``d4``, a view set name, or False).
        """
        return softmax_with_temperature(self.predict_logits(images, tta), self.temperature).astype(np.float32)

    def result(self, source: str, probs: np.ndarray) -> PredictionResult:
        """A :class:`PredictionResult` from one row of probabilities."""
        index = int(np.argmax(probs))
        return PredictionResult(
            source=source,
            label=self.classes[index],
            probabilities={name: float(p) for name, p in zip(self.classes, probs)},
        )

    def predict_files(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        batch: int = DEFAULT_BATCH,
        tta: bool | str | None = None,
        on_batch: Callable[[int], None] | None = None,
        decode_workers: int | None = None,
    ) -> list[PredictionResult]:
        """Predict image files in batches; a file that cannot be used gets a row with its error reason.

        Files are decoded by a small thread pool up to two batches ahead of the network, so decoding and
        inference overlap and every core stays busy (PIL releases the GIL while it decodes and resizes).

        Parameters
        ----------
        paths: image files, in the order the results should come back (one path alone is one file).
        batch: images per network call.
        tta: override the predictor's TTA setting.
        on_batch: called with the number of files done after every batch (progress bars).
        decode_workers: decoding threads (None: one per available core).

        Returns one :class:`PredictionResult` per path, in order.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if isinstance(paths, str | os.PathLike):  # one file, not the characters of its name
            paths = [paths]
        names = [str(p) for p in paths]
        chunks = [names[i : i + batch] for i in range(0, len(names), batch)]
        results: list[PredictionResult] = []
        with ThreadPoolExecutor(max_workers=decode_workers or available_cores(), thread_name_prefix="bloodcell-decode") as pool:
            pending: deque[list[Future]] = deque()
            for k in range(min(PREFETCH_BATCHES, len(chunks))):
                pending.append([pool.submit(self._decode_one, name) for name in chunks[k]])
            for k, chunk in enumerate(chunks):
                decoded = [future.result() for future in pending.popleft()]
                if k + PREFETCH_BATCHES < len(chunks):
                    pending.append([pool.submit(self._decode_one, name) for name in chunks[k + PREFETCH_BATCHES]])
                results.extend(self._predict_chunk(chunk, decoded, tta))
                if on_batch is not None:
                    on_batch(len(results))
        return results

    def _decode_one(self, name: str) -> Decoded | str:
        """The decoded model input of one file, or the reason it cannot be used."""
        return decode_or_reason(name, self.input_size)

    def _predict_chunk(self, names: list[str], decoded: list[Decoded | str], tta: bool | str | None) -> list[PredictionResult]:
        good = [d for d in decoded if not isinstance(d, str)]
        probs = iter(self.predict(np.stack([d.pixels for d in good]), tta) if good else [])
        return [
            PredictionResult(source=printable_path(name), error=d) if isinstance(d, str)
            else replace(self.result(printable_path(name), next(probs)), size=(d.width, d.height))
            for name, d in zip(names, decoded)
        ]


def _tta_views_name(tta: bool | str | None) -> str | None:
    """Normalise a TTA setting: False/None -> None, True -> ``d4``, a name -> itself (validated)."""
    if tta is None or tta is False:
        return None
    if tta is True:
        return "d4"
    from bloodcell.evaluate.tta import VIEW_SETS

    if tta not in VIEW_SETS:
        raise ValueError(f"unknown TTA view set {tta!r}; choose one of {', '.join(VIEW_SETS)}")
    return str(tta)


def missing_input_reason(text: str) -> str:
    """Why an input (file, folder or glob) that :func:`expand_inputs` found nothing in names no image file."""
    if Path(text).is_dir():
        return f"a folder with no image files in it (looked for {' '.join(sorted(IMAGE_SUFFIXES))}, in sub-folders too)"
    if glob.has_magic(text):
        return "a pattern that matches no image file" + _bracket_hint(Path(text).parts)
    return "no such file or folder"


def _bracket_hint(parts: tuple[str, ...]) -> str:
    """How to write a folder named with brackets, for the first folder part of a pattern whose brackets,
    taken as written, make the pattern match (a wildcard before it kept :func:`_glob`'s own retry from
    trying so); else "" (a class meant as one, or a folder that is not there either way)."""
    for k, part in enumerate(parts[:-1]):
        opening = part.find("[")
        closing = part.find("]", opening + 1)
        if opening < 0 or closing < 0:
            continue
        escaped = str(Path(*parts[:k], part.replace("[", "[[]"), *parts[k + 1 :]))  # its wildcards stay
        try:
            found = _glob(escaped) if glob.has_magic(escaped) else [Path(escaped)] if Path(escaped).exists() else []
        except (OSError, ValueError):
            found = []
        if found:
            bracket = part[opening : closing + 1]
            return (f" ('[' and ']' enclose a glob class: for a folder named {part!r}, write "
                    f"{'[[]' + bracket[1:]!r} for {bracket!r})")  # fmt: skip
    return ""


Row = TypeVar("Row")


class InputFiles(NamedTuple):
    """What :func:`expand_inputs` found: the image files, the inputs that matched nothing, and the files
    inside the given folders that were passed over because their suffix is not an image suffix."""

    files: list[Path]
    missing: list[str]
    skipped: list[Path]
    missing_at: list[int]  # for each of ``missing``, how many of ``files`` the inputs before it found

    def in_input_order(self, rows: Sequence[Row], missing_row: Callable[[str], Row]) -> list[Row]:
        """``rows`` (one for each of ``files``, in order) with ``missing_row(input)`` for each input that matched
        nothing, at its place among the inputs: results read in the order they were asked for."""
        ordered = list(rows)
        for inserted, (text, at) in enumerate(zip(self.missing, self.missing_at, strict=True)):
            ordered.insert(at + inserted, missing_row(text))
        return ordered


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> InputFiles:
    """Turn files, folders and glob patterns into a list of image files.

    Folders are searched recursively for files with an image suffix (:data:`IMAGE_SUFFIXES`; hidden files
    and folders are left out); a file named explicitly is kept whatever its suffix (the decoder then says
    whether it is an image); glob patterns (``*``, ``?``, ``[``, ``**``) are expanded. Duplicates are
    dropped, order is kept. A pattern that matches nothing is tried again with its leading parts that name
    existing folders taken as written (a folder named ``Cancer [ALL]``). The other files found in folders
    are returned as ``skipped``, so a caller can say that they were not classified instead of dropping them
    silently; :meth:`InputFiles.in_input_order` puts a row for each input that matched nothing in its place.
    """
    files: list[Path] = []
    missing: list[str] = []
    missing_at: list[int] = []
    skipped: dict[str, Path] = {}  # by absolute path: a folder given twice is reported once
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)  # a file named twice is one; two links to one file are two names, both kept
        if key not in seen:
            seen.add(key)
            files.append(path)

    def search(folder: Path) -> list[Path]:
        images, others = _files_in_folder(folder)
        for other in others:
            skipped.setdefault(os.path.abspath(other), other)
        return images

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = search(path)
        elif path.exists():
            found = [path]
        elif glob.has_magic(text):
            found = []
            for match_path in _glob(text):
                if match_path.is_dir():
                    found.extend(search(match_path))
                elif match_path.is_file() or match_path.is_symlink():  # a link to nothing: tried, reported
                    found.append(match_path)
                else:  # a pipe or device: reading it would block or never end
                    skipped.setdefault(os.path.abspath(match_path), match_path)
        else:
            found = []
        if not found:
            missing.append(text)
            missing_at.append(len(files))
        for file in found:
            add(file)
    tried = {os.path.abspath(file) for file in files}
    skipped_files = [path for key, path in skipped.items() if key not in tried]  # named: tried
    return InputFiles(files, missing, skipped_files, missing_at)


def _glob(pattern: str) -> list[Path]:
    """The matches of a glob pattern, sorted, as ``glob.glob(pattern, recursive=True)`` gives them, but
    ``**`` descends into neither linked nor hidden folders.

    Written by hand because neither library does both: ``glob.glob``'s ``**`` follows links (round a link
    to a parent folder it repeats every file, with two such links without end), and pathlib's walks every
    hidden folder (a home's ``.cache``) before leaving it out. Hidden names match only a pattern part that
    starts with a dot; a pattern that ends with a separator matches folders only.
    """
    parts = Path(pattern).parts
    first = next(k for k, part in enumerate(parts) if glob.has_magic(part))
    folders_only = pattern.endswith(("/", os.sep))
    matches = _matches_below(parts, first, folders_only)
    if not matches:
        # A folder named with brackets ("Blood cell Cancer [ALL]") reads as a character class: when leading
        # parts of the pattern name existing folders as written, take those literally.
        literal = _existing_folder_parts(parts)
        if literal > first:
            matches = _matches_below(parts, literal, folders_only)
    return matches


def _matches_below(parts: tuple[str, ...], first: int, folders_only: bool) -> list[Path]:
    """The sorted matches of the pattern ``parts`` whose first ``first`` parts are taken literally (folders
    only, for a pattern that ends with a separator)."""
    base = Path(*parts[:first]) if first else Path()
    rest = tuple(part if part == "**" else re.sub(r"\*\*+", "*", part) for part in parts[first:])  # a**b: a*b
    matches = sorted(_expand(base, rest)) if base.is_dir() else []
    return [match for match in matches if match.is_dir()] if folders_only else matches


def _existing_folder_parts(parts: tuple[str, ...]) -> int:
    """How many leading ``parts`` (short of the last) name an existing folder as written."""
    count = 0
    while count < len(parts) - 1 and Path(*parts[: count + 1]).is_dir():
        count += 1
    return count


def _expand(folder: Path, parts: tuple[str, ...]) -> Iterator[Path]:
    """The paths under ``folder`` that match the pattern ``parts``, one part a level (see :func:`_glob`)."""
    head, rest = parts[0], parts[1:]
    if head == "**":
        for below in _folders_below(folder):
            yield from _expand(below, rest) if rest else [below]
        return
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError:  # unreadable, or gone meanwhile: nothing matches there
        return
    for name in names:
        if (name.startswith(".") and not head.startswith(".")) or not fnmatch.fnmatch(name, head):
            continue
        path = folder / name
        if not rest:
            yield path
        elif path.is_dir():
            yield from _expand(path, rest)


def _folders_below(folder: Path) -> Iterator[Path]:
    """``folder`` and every folder below it, neither through a link nor into a hidden one."""
    yield folder
    try:
        below = sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except OSError:
        return
    for name in below:
        yield from _folders_below(folder / name)


def _files_in_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(images, others)``: the files under ``folder`` (recursive, hidden ones left out), sorted by path,
    split by whether their suffix is an image suffix."""
    # Regular files, and broken links (reported as unreadable rather than dropped); pipes and devices are
    # never opened (a pipe would block the read) but named among the others, as a glob's are.
    entries = sorted(
        p for p in folder.rglob("*")
        if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip
    readable = [p.is_file() or (p.is_symlink() and not p.exists()) for p in entries]
    is_image = [ok and p.suffix.lower() in IMAGE_SUFFIXES for p, ok in zip(entries, readable)]
    return [p for p, yes in zip(entries, is_image) if yes], [p for p, yes in zip(entries, is_image) if not yes]


def load_predictor(
    model_path: str | Path | None,
    backend: Literal["torch", "onnx"] = "torch",
    tta: bool = False,
    threads: int | None = None,
) -> tuple[BasePredictor, str | Path | None | Literal[False]]:
    """Build the predictor for ``backend``; also returns where Grad-CAM's PyTorch weights come from
    (``False`` when there are none: a bare ``.onnx`` file)."""
    if backend == "torch":
        from bloodcell.serve.predictor import TorchPredictor

        return TorchPredictor(model_path, tta=tta, threads=threads), model_path
    if backend != "onnx":
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    from bloodcell.serve.onnx_predictor import OnnxPredictor

    if model_path is not None and names_onnx_file(model_path):
        predictor = OnnxPredictor(model_path, threads=threads, tta=tta)
        source = torch_weights_beside(Path(model_path))
        if source:
            _take_the_model_s_temperature(predictor, source, Path(model_path))
        return predictor, source
    from bloodcell.serve.export import ensure_onnx

    return OnnxPredictor(ensure_onnx(model_path), threads=threads, tta=tta), model_path


def _take_the_model_s_temperature(predictor: BasePredictor, model_dir: Path, onnx_path: Path) -> None:
    """An export beside its model (``<model dir>/onnx/``) answers with the model card's present temperature.

    ``bloodcell evaluate`` refits the temperature in the model's card; the export's card keeps the one of
    its day, and the graph itself (logits) does not depend on it. So the model's is used, and said.
    """
    current = float(read_card_json(model_dir).get("temperature", 1.0))
    if current != predictor.temperature:
        warn_once(log, "%s was exported with temperature %.4g; the model's card (%s) now holds %.4g, which is "
                  "used (export the model again to update the file)", onnx_path, predictor.temperature,
                  model_dir / "card.json", current)  # fmt: skip
        predictor.temperature = current
        predictor.card = {**predictor.card, "temperature": current}


def names_onnx_file(model: str | Path) -> bool:
    """True when ``model`` names an exported ONNX file: a path ending in ``.onnx`` that is not a folder (a
    model folder may be named ``x.onnx``). The file need not exist: a missing one is reported when opened."""
    return str(model).lower().endswith(".onnx") and not Path(model).is_dir()


def torch_weights_beside(onnx_path: Path) -> Path | Literal[False]:
    """The model directory an ONNX file was exported from, when it sits in ``<model dir>/onnx/`` and the
    weights there are the ones it was exported from (the hash in its card matches)."""
    onnx_path = onnx_path.resolve()  # a link to the export: its card and model folder lie beside the target
    candidate = onnx_path.parent.parent
    weights = candidate / "model.safetensors"
    if not ((candidate / "card.json").is_file() and weights.is_file()):
        return False
    try:
        recorded = read_card_json(onnx_path.parent).get("onnx", {}).get("weights_sha256")
    except (OSError, ValueError):
        return False
    return candidate if recorded == sha256_file(weights) else False
