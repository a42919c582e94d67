"""Model cards and weights on disk: ``model.safetensors`` + ``card.json`` in one directory.

Loading never unpickles anything: weights are safetensors, the card is JSON, and the architecture is
rebuilt from the registry by name. A model can be named by a run directory (its best checkpoint), a model
directory, a ``card.json`` path, or nothing at all (the default model bundled with the package).
"""

from __future__ import annotations

import functools
import math
import platform
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from bloodcell import (
    CARD_FORMAT,
    CARD_INPUT_SIZES,
    CARD_TEMPERATURES,
    CLASSES,
    __version__,
    card_bytes,
    card_classes_problem,
    card_format_problem,
    card_temperature_problem,
)
from bloodcell.config import NormalizeConfig
from bloodcell.errors import ModelFileError
from bloodcell.io import atomic_path, atomic_write_text

if TYPE_CHECKING:  # for annotations; at run time the classifier is imported where a model is built
    import numpy as np

    from bloodcell.models.classifier import Classifier

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
#: The SHA-256 of every image a model was trained on, sorted, one a line. With it an evaluation on other
#: or changed data leaves out, by content whatever their names are now, the images the model has seen.
TRAINED_ON_FILE = "trained-on.sha256"
#: Their perceptual hashes, sorted, one a line: the same picture re-encoded, resized or renamed has other
#: bytes but a hash within :data:`~bloodcell.data.index.NEAR_DUPLICATE_MAX_DISTANCE` bits.
TRAINED_ON_PHASH_FILE = "trained-on.phash"


@dataclass(frozen=True)
class TrainedOn:
    """What a model was trained on, by content: the images' SHA-256s and (when recorded) perceptual hashes."""

    sha256: frozenset[str]
    phash: tuple[str, ...] = ()

    def holds(self, sha256s: Sequence[str], phashes: Sequence[str]) -> np.ndarray:
        """Which images (given by their SHA-256s and perceptual hashes, ``""`` for none) the model trained on:
        the same bytes, or, where perceptual hashes are recorded, a re-encoded or resized copy (within
        :data:`~bloodcell.data.index.NEAR_DUPLICATE_MAX_DISTANCE` bits). A boolean mask."""
        import numpy as np

        from bloodcell.data.index import NEAR_DUPLICATE_MAX_DISTANCE, near_any

        seen = np.isin(np.asarray(sha256s, dtype=object), list(self.sha256))
        pictured = [i for i, h in enumerate(phashes) if h]  # an unreadable file has no perceptual hash
        if self.phash and pictured:
            seen[pictured] |= near_any([phashes[i] for i in pictured], list(self.phash), NEAR_DUPLICATE_MAX_DISTANCE)
        return seen


class ModelCard(BaseModel):
    """Everything needed to rebuild, run and judge a model, stored beside its weights."""

    model_config = ConfigDict(extra="allow")

    format: str = CARD_FORMAT
    name: str = "bloodcell-model"
    version: str = "0"
    architecture: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    # strict: the torch-free reader of the ONNX backend refuses "160" and 160.0 too; both readers agree
    input_size: int = Field(strict=True, ge=CARD_INPUT_SIZES.start, le=CARD_INPUT_SIZES.stop - 1)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    # Divide logits by this before softmax (fitted on validation data); strict, as the torch-free reader.
    temperature: float = Field(1.0, strict=True, ge=CARD_TEMPERATURES[0], le=CARD_TEMPERATURES[1])
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved training config
    command: str | None = None  # the command line that produced the model
    manifest_sha256: str | None = None  # hash of the data manifest it was trained on
    # The layout its images were found in (aria, kaggle, folders): the report cites Aria et al.'s dataset for
    # the first two, whether or not the folder is still where it was.
    data_layout: str | None = None
    split: dict[str, Any] = Field(default_factory=dict)  # protocol, seed and counts
    metrics: dict[str, Any] = Field(default_factory=dict)
    epoch: int | None = None
    runtime: dict[str, Any] = Field(default_factory=dict)  # device, processes, threads, precision of training
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    intended_use: str = "Research only. Not a medical device; not for diagnosis or treatment decisions."

    # The shared rules (bloodcell/__init__.py), so that the torch-free reader of the ONNX backend agrees.
    @field_validator("format", "classes", "temperature", mode="before")
    @classmethod
    def _shared_rules(cls, value: Any, info: ValidationInfo) -> Any:
        problem = _SHARED_RULES[str(info.field_name)](value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("arch_kwargs")
    @classmethod
    def _finite_arch_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        # JSON's NaN and Infinity load as floats: a NaN dropout passed loading and failed the first prediction.
        bad = next((key for key, number in _numbers_in(value) if not math.isfinite(number)), None)
        if bad is not None:
            raise ValueError(f"{bad} must be a finite number")
        return value

    @property
    def trained_on(self) -> list[str]:
        """The split parts the model learned from (cards written before refits existed: the train part)."""
        return list(self.split.get("trained_on", ["train"]))


_SHARED_RULES = {"format": card_format_problem, "classes": card_classes_problem, "temperature": card_temperature_problem}


def _numbers_in(value: Any, where: str = "arch_kwargs") -> Iterator[tuple[str, float]]:
    """Every float in nested dicts and lists, with where it sits (``arch_kwargs.widths[2]``)."""
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers_in(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers_in(item, f"{where}[{index}]")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model's numbers, for the card."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    # Cached: each lookup parses a package's metadata (2 ms), and training writes a card every epoch
    # (0.54-0.57 s of a 10.7-13.7 s GPU training run under cProfile).
    versions = {"bloodcell": __version__, "python": platform.python_version()}
    for package in ("torch", "timm", "numpy", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_card(card: ModelCard, directory: str | Path) -> Path:
    """Write ``card.json`` atomically into ``directory``."""
    return atomic_write_text(Path(directory) / CARD_FILE, card.model_dump_json(indent=2) + "\n")


def load_card(path: str | Path | None = None) -> tuple[ModelCard, Path]:
    """Read a card; returns it and the model directory that holds it (see :func:`resolve_model_dir`)."""
    directory = resolve_model_dir(path)
    card_path = directory / CARD_FILE
    try:
        return ModelCard.model_validate_json(card_bytes(card_path)), directory
    except ModelFileError:
        raise
    except (ValueError, OSError) as error:
        reason = " ".join(str(error).split())
        raise ModelFileError(f"{card_path}: not a valid model card ({reason})") from None


def save_trained_on(directory: str | Path, sha256s: Any, phashes: Any = ()) -> Path:
    """Write :data:`TRAINED_ON_FILE` (and :data:`TRAINED_ON_PHASH_FILE`) into ``directory``, atomically."""
    atomic_write_text(Path(directory) / TRAINED_ON_PHASH_FILE, "".join(f"{h}\n" for h in sorted(set(phashes))))
    return atomic_write_text(Path(directory) / TRAINED_ON_FILE, "".join(f"{sha}\n" for sha in sorted(set(sha256s))))


def load_trained_on(directories: list[Path]) -> TrainedOn | None:
    """The record of the first of ``directories`` that holds :data:`TRAINED_ON_FILE`, or None (a model
    saved before perceptual hashes were recorded gets an empty ``phash``)."""

    def lines(path: Path) -> list[str]:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []

    for directory in directories:
        if (Path(directory) / TRAINED_ON_FILE).is_file():
            return TrainedOn(frozenset(lines(Path(directory) / TRAINED_ON_FILE)),
                             tuple(lines(Path(directory) / TRAINED_ON_PHASH_FILE)))  # fmt: skip
    return None


def bundled_model_dir() -> Path:
    """Directory of the default model shipped inside the package."""
    return Path(str(resources.files("bloodcell") / "assets" / "default_model"))


def resolve_model_dir(path: str | Path | None) -> Path:
    """Turn what a user names into the directory holding ``card.json`` and ``model.safetensors``.

    Accepts a run directory (uses ``checkpoints/best``), a model directory, a ``card.json`` or
    ``model.safetensors`` path, or None for the bundled default model.
    """
    if path is None:
        directory = bundled_model_dir()
        if not (directory / CARD_FILE).is_file():
            raise FileNotFoundError("no model named and no bundled default model is installed")
        return directory
    candidate = Path(path)
    if candidate.is_file() and candidate.name in {CARD_FILE, WEIGHTS_FILE}:
        candidate = candidate.parent
    for directory in (candidate, candidate / "checkpoints" / "best", candidate / "model"):
        if (directory / CARD_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
            return directory
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate}: no such model, run or directory")
    if _is_a_run(candidate):  # most often one stopped before its model was saved (in the holdout stage, say)
        raise FileNotFoundError(f"{candidate}: no model found in this training run (no checkpoints/best/ yet); if "
                                f"it was interrupted, finish it with: bloodcell train --resume {candidate}")  # fmt: skip
    export = _onnx_export_in(candidate)
    if export is not None:  # an export's folder (its card beside the graph): the weights are inside the .onnx
        raise FileNotFoundError(f"{candidate}: an ONNX export, not a PyTorch model (no {WEIGHTS_FILE}): pass {export} "
                                "to run it on ONNX Runtime, or the model directory it was exported from")  # fmt: skip
    dataset = "; to evaluate on a dataset, pass it as --data" if _looks_like_a_dataset(candidate) else ""
    raise FileNotFoundError(
        f"{candidate}: no model found (expected {CARD_FILE} and {WEIGHTS_FILE} here, in checkpoints/best/ or in "
        f"model/){dataset}"
    )


def _onnx_export_in(folder: Path) -> Path | None:
    """The ``.onnx`` file beside a ``card.json`` in ``folder`` (what ``bloodcell export`` writes), if any."""
    if not (folder / CARD_FILE).is_file():
        return None
    return next((path for path in sorted(folder.iterdir()) if path.suffix.lower() == ".onnx" and path.is_file()), None)


def _is_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds a training run's ``config.yaml`` (one that loads as a run config)."""
    from bloodcell.config import ConfigError, load_config

    if not (folder / "config.yaml").is_file():
        return False
    try:
        load_config(str(folder / "config.yaml"))
    except ConfigError:  # another tool's config
        return False
    return True


def _looks_like_a_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds two or more folders of images (for Aria, in its ``Original/``): a dataset given
    where a model is asked for. Cheap: a folder's own files only, nothing indexed; a run's folders are none."""
    from bloodcell.data.layouts import is_image_name

    top = folder / "Original" if (folder / "Original").is_dir() else folder
    try:
        with_images = [sub for sub in top.iterdir() if sub.is_dir() and not sub.name.startswith(".")
                       and not (sub / "config.yaml").exists() and any(is_image_name(p) for p in sub.iterdir())]  # fmt: skip
    except OSError:  # a file, or a folder it may not read: no dataset to point at
        return False
    return len(with_images) >= 2


def save_model(model: Classifier, card: ModelCard, directory: str | Path) -> Path:
    """Save a :class:`~bloodcell.models.classifier.Classifier`'s weights and card into ``directory``.

    Weights are written first and the card last, each atomically, so a directory with a card always has
    matching weights.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        # One metadata entry: safetensors writes a dict's entries in a random order, so two entries made
        # the bytes of identical weights differ half the time (the card beside them names the architecture).
        save_file(state, str(tmp), metadata={"format": CARD_FORMAT})
    if not card.versions:
        card = card.model_copy(update={"versions": library_versions()})
    save_card(card, directory)
    return directory


def build_model(card: ModelCard, device: str | None = None) -> Classifier:
    """Rebuild the (untrained) :class:`Classifier` that a card describes (on ``device``: ``"meta"`` gives its
    names, shapes and dtypes without allocating a byte).

    Its initial weights are drawn with torch's CPU generator forked: loading a model for inference must not
    move the random numbers of the program that loads it.
    """
    import torch

    from bloodcell.models.classifier import Classifier
    from bloodcell.models.registry import create_model

    if "pretrained" in card.arch_kwargs:  # the weights are the card's own safetensors, never downloaded ones
        raise ValueError(f"model card {card.name!r}: arch_kwargs may not set 'pretrained'")
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        net = create_model(card.architecture, num_classes=len(card.classes), **card.arch_kwargs)
        return Classifier(net, card.normalize)


class _TooManyParameters(Exception):
    """Raised from inside a network's construction (not a ValueError, which a builder might catch)."""


@contextmanager
def _parameters_at_most(limit: int) -> Iterator[None]:
    """Stop building a network (:class:`_TooManyParameters`) once it registers more than ``limit`` parameters
    in this thread: a card's ``depth: 1e4`` took 40 s to build even on the meta device."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    builder, count = threading.get_ident(), 0

    def counted(*_: Any) -> None:
        nonlocal count
        if threading.get_ident() == builder:  # a server may load another model in another thread meanwhile
            count += 1
            if count > limit:
                raise _TooManyParameters

    handle = register_module_parameter_registration_hook(counted)
    try:
        yield
    finally:
        handle.remove()


def _weights_header(weights: Path) -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, dtype code such as "F32")}`` of a safetensors file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as file:
            return {name: (file.get_slice(name).get_shape(), file.get_slice(name).get_dtype()) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{weights}: not readable as safetensors, damaged or cut short? ({error})") from None


def _header_kind(code: str) -> str:
    """The kind of number a safetensors dtype code (F32, BF16, F8_E4M3, I64, U8, BOOL, C64) stands for."""
    if code == "BOOL":
        return "bool"
    return "complex" if code.startswith("C") else "float" if "F" in code else "integer"


def _tensor_kind(tensor: Any) -> str:
    """The kind of number a torch tensor holds, as :func:`_header_kind` names them."""
    if tensor.dtype.is_complex:
        return "complex"
    return "float" if tensor.is_floating_point() else "bool" if str(tensor.dtype) == "torch.bool" else "integer"


def _fit_problem(card: ModelCard, model: dict[str, Any], header: dict[str, tuple[list[int], str]]) -> str | None:
    """How the tensors a weights file holds (its ``header``) do not fit the ``model``'s state (names to
    tensors, on the meta device), or None. Refused before the model is built for real: a card's arch_kwargs
    (``width: 50``) made a 3.7 GB network that no weights file of the model's could fill."""
    missing, unexpected = sorted(set(model) - set(header)), sorted(set(header) - set(model))
    if missing or unexpected:
        return f"weights do not match architecture {card.architecture!r} (missing {missing[:5]}, unexpected {unexpected[:5]})"
    for name, tensor in model.items():
        shape, code = header[name]
        if list(shape) != list(tensor.shape):
            return (f"weights do not fit the card's {card.architecture!r} with {len(card.classes)} classes ({name}: "
                    f"shape {list(shape)} in the file, {list(tensor.shape)} in the model)")  # fmt: skip
        # The same bytes relabelled (F32 as I32) load without a word, cast to nonsense; F64 for F32 is fine.
        if _header_kind(code) != _tensor_kind(tensor):
            return f"{name} holds {code} numbers where the model takes {str(tensor.dtype).removeprefix('torch.')} ones"
    return None


def load_model(path: str | Path | None = None, device: str = "cpu") -> tuple[Classifier, ModelCard]:
    """Load a model for inference: rebuild it from its card and load its safetensors weights.

    The weights file's header is compared with the network built on the meta device first, so a card that
    describes another (or a huge) network is refused before any memory is allocated for it.
    Returns ``(model in eval mode, card)``. Never unpickles.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card, directory = load_card(path)
    weights = directory / WEIGHTS_FILE
    header = _weights_header(weights)

    def cannot_build(error: object) -> ModelFileError:
        return ModelFileError(f"{directory / CARD_FILE}: cannot build {card.architecture!r} from it ({error})")

    try:
        with _parameters_at_most(2 * len(header) + 64):  # slack: a builder may replace a few it registered
            shapes = build_model(card, device="meta").state_dict()
    except _TooManyParameters:
        raise cannot_build(f"it has far more parameters than the {len(header)} tensors of {weights.name}") from None
    # An unknown architecture (timm says so with a RuntimeError), or arguments it does not take.
    except (TypeError, ValueError, KeyError, RuntimeError, NotImplementedError) as error:
        raise cannot_build(error) from None
    problem = _fit_problem(card, shapes, header)
    if problem:
        raise ModelFileError(f"{weights}: {problem}")
    try:
        model = build_model(card)
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise cannot_build(error) from None
    try:
        state = load_file(str(weights), device=device)
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{weights}: not readable as safetensors, damaged or cut short? ({error})") from None
    # The header fits, so the rest are backstops: a name or shape the header check let through.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise ModelFileError(f"{weights}: weights do not fit the card's {card.architecture!r} with "
                             f"{len(card.classes)} classes ({first})") from None  # fmt: skip
    if missing or unexpected:
        raise ModelFileError(
            f"{weights}: weights do not match architecture {card.architecture!r} "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:  # such a model "predicts" NaN probabilities for every image
        raise ModelFileError(f"{weights}: {len(broken)} tensors hold NaN or infinite values (e.g. {broken[0]})")
    return model.to(device).eval(), card
