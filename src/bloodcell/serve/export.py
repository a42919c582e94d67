"""Export a saved model to one self-contained ONNX file, with its card beside it and a parity check.

The exported graph takes what every predictor has after decoding, uint8 RGB images in NHWC layout with a
dynamic batch dimension (input ``images``, ``(batch, size, size, 3)``), and returns logits (output
``logits``, ``(batch, K)``). Normalisation is inside the graph, as it is inside the PyTorch model; the
temperature stays in the card and is applied by the predictor, so recalibrating never needs a re-export.

The export is refused unless ONNX Runtime reproduces PyTorch's probabilities on the parity images to
within ``tolerance`` (default 1e-4, max absolute difference), at batch size N and 1. The ``.onnx`` file is
written atomically and only after the check passed; ``card.json`` follows it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bloodcell.data.decode import decode_or_reason
from bloodcell.errors import ParityError, UserError
from bloodcell.io import atomic_path, sha256_file
from bloodcell.models.card import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    bundled_model_dir,
    load_model,
    resolve_model_dir,
    save_card,
)
from bloodcell.notices import quieted
from bloodcell.probabilities import softmax_with_temperature
from bloodcell.serve.common import expand_inputs, names_onnx_file, read_card_json
from bloodcell.serve.onnx_predictor import GRAPH_VERSION, INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

#: Largest allowed max-abs difference of probabilities between PyTorch and ONNX Runtime.
PARITY_TOLERANCE = 1e-4
ONNX_FILE = "model.onnx"


class NhwcUint8Model(nn.Module):
    """Wrap a Classifier so the graph takes uint8 NHWC images: what decoding produces, 4x less data than
    float, and no transpose left to do for the caller."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


def synthetic_smears(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Deterministic smear-like test images (light background, dark stained blob, noise) plus the extremes
    (black, white, uniform noise) that exercise the whole input range. uint8 ``(n, size, size, 3)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = []
    for _ in range(max(0, n - 3)):
        background = rng.uniform(160, 240, size=3)
        stain = rng.uniform(40, 150, size=3)
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
        ry, rx = rng.uniform(0.1 * size, 0.3 * size, size=2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        image = np.where(inside[..., None], stain, background) + rng.normal(0, 8, size=(size, size, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    extremes = [
        np.zeros((size, size, 3), np.uint8),
        np.full((size, size, 3), 255, np.uint8),
        rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8),
    ]
    return np.stack((images + extremes)[:n])


def bundled_sample_files() -> list[Path]:
    """Sample images shipped with the package (``bloodcell/assets/samples``), if any."""
    folder = Path(str(resources.files("bloodcell") / "assets" / "samples"))
    return expand_inputs([folder]).files if folder.is_dir() else []


#: Largest max-abs difference of logits allowed on the synthetic parity images (see export_onnx).
SYNTHETIC_LOGIT_TOLERANCE = 1e-2


def parity_images(
    size: int, sources: Sequence[str | os.PathLike[str]] | np.ndarray | None = None, limit: int = 32
) -> tuple[np.ndarray, np.ndarray, str]:
    """The images the parity check runs on: ``(real, synthetic, a few words saying what they are)``.

    ``sources`` may be a uint8 NHWC array, or files / folders / globs of real images (at most ``limit``
    are used; an unreadable one is named in a warning and skipped, as ``predict`` does, and only none
    readable is refused). None uses the package's bundled sample images when it has some. Synthetic smears
    and the input-range extremes are always added, so a check never runs on too few or too similar images.
    """
    synthetic = synthetic_smears(8, size)
    if isinstance(sources, np.ndarray):
        return sources.astype(np.uint8), synthetic, f"{len(sources)} given images + 8 synthetic"
    if sources:
        found = expand_inputs(sources)
        if found.missing or not found.files:
            # Silently falling back to synthetic images would hold the export to a weaker check than asked.
            raise UserError(f"--images: no image files in or matching {', '.join(map(str, found.missing or sources))}")
        files = found.files
    else:
        files = bundled_sample_files()
    real: list[np.ndarray] = []
    unreadable: list[str] = []
    for path in files:
        if len(real) == limit:
            break
        decoded = decode_or_reason(path, size)  # any failure, not only a refusal: one odd file must not stop it
        if isinstance(decoded, str):
            unreadable.append(f"{path}: {decoded}")
            log.warning("parity check: skipped %s: %s", path, decoded)
        else:
            real.append(decoded.pixels)
    if sources and not real:
        raise UserError(f"--images: none of the images could be read ({'; '.join(unreadable[:3])})")
    what = f"{len(real)} real images + 8 synthetic" if real else "8 synthetic images (no real images given)"
    return (np.stack(real) if real else synthetic[:0]), synthetic, what


def _export_graph(wrapper: nn.Module, size: int, target: Path, exporter: str, opset: int | None) -> None:
    """Write the ONNX graph of ``wrapper`` to ``target`` as one file (weights inside)."""
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quieted(logging.getLogger("torch.onnx")):
        # The exporters print progress and deprecation notes; the CLI reports what matters itself.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(
                wrapper, (example,), str(target), dynamo=True, external_data=False, optimize=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                opset_version=opset, verbose=False,
            )
        else:
            torch.onnx.export(
                wrapper, (example,), str(target), dynamo=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset or 17, do_constant_folding=True,
            )


def check_parity(model: nn.Module, onnx_file: str | Path, images: np.ndarray, temperature: float) -> dict[str, Any]:
    """Compare PyTorch and ONNX Runtime on ``images`` (whole batch and batch of one).

    Returns ``max_abs_diff_probabilities``, ``max_abs_diff_logits``, ``n_images`` and ``batch_sizes``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        device = next(model.parameters()).device
        reference = model(torch.from_numpy(images).to(device).permute(0, 3, 1, 2)).float().cpu().numpy()
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    single = session.run([OUTPUT_NAME], {INPUT_NAME: images[:1]})[0]
    got = np.concatenate([batched, single])
    expected = np.concatenate([reference, reference[:1]])
    probs_diff = np.abs(softmax_with_temperature(got, temperature) - softmax_with_temperature(expected, temperature))
    return {
        "max_abs_diff_probabilities": float(probs_diff.max()),
        "max_abs_diff_logits": float(np.abs(got - expected).max()),
        "n_images": len(images),
        "batch_sizes": [len(images), 1],
    }


def default_onnx_path(model_path: str | Path | None) -> Path:
    """Where ``export`` writes by default: ``<model directory>/onnx/model.onnx``; for the model bundled with
    the package, the work folder's copy (:func:`cached_onnx_path`), since an installed package may be
    read-only and must stay as pip installed it."""
    model_dir = resolve_model_dir(model_path)
    if model_dir.resolve() == bundled_model_dir().resolve():
        return cached_onnx_path(model_dir)
    return model_dir / "onnx" / ONNX_FILE


def cached_onnx_path(model_dir: Path) -> Path:
    """``$BLOODCELL_HOME/onnx/<weights hash>/model.onnx``: an export kept in the work folder, by its weights."""
    from bloodcell.io import bloodcell_home

    return bloodcell_home() / "onnx" / sha256_file(model_dir / WEIGHTS_FILE)[:16] / ONNX_FILE


def export_onnx(
    model_path: str | Path | None,
    out: str | Path | None = None,
    *,
    images: Sequence[str | os.PathLike[str]] | np.ndarray | None = None,
    tolerance: float = PARITY_TOLERANCE,
    exporter: Literal["dynamo", "legacy"] = "dynamo",
    opset: int | None = None,
) -> Path:
    """Export a saved model to ONNX and verify it against PyTorch.

    Parameters
    ----------
    model_path: a run directory, model directory, ``card.json`` path, or None for the bundled default.
    out: the ``.onnx`` file to write (a folder means ``<folder>/model.onnx``); None writes
        ``<model directory>/onnx/model.onnx``, or for the bundled model (whose folder an installation may
        keep read-only) ``$BLOODCELL_HOME/onnx/<weights hash>/model.onnx``. ``card.json`` is written beside it.
    images: images for the parity check: files, folders, globs or a uint8 NHWC array; None uses the
        bundled sample images if the package has them (synthetic smears are always added).
    tolerance: largest allowed max-abs difference of probabilities (with the card's temperature).
    exporter: ``dynamo`` (torch.export based, the default) or ``legacy`` (TorchScript based).
    opset: ONNX opset (None: the exporter's default).

    Returns the path of the ``.onnx`` file. Raises :class:`ParityError` (and writes no file; the target folder may be made) if ONNX Runtime
    disagrees with PyTorch by more than ``tolerance``, and :class:`~bloodcell.errors.UserError` for an
    ``out`` in a model's own folder (its card would be replaced by the export's), in a folder holding
    another export (the same), or ``images`` that match no image files.
    """
    model, card = load_model(model_path)
    model = model.float().eval()
    weights = resolve_model_dir(model_path) / WEIGHTS_FILE
    target = Path(out) if out is not None else default_onnx_path(model_path)
    is_onnx = target.suffix.lower() == ".onnx"
    if target.exists() and not target.is_dir() and not is_onnx:  # the folder could not be made: "File exists"
        raise UserError(f"--out {target}: a file, not an .onnx file; give an .onnx file to write, or a folder "
                        f"(for {ONNX_FILE})")  # fmt: skip
    if target.is_dir() or not is_onnx:  # a name without .onnx is a folder, dots and all (v1.2/)
        target = target / ONNX_FILE
    if (target.parent / WEIGHTS_FILE).exists():
        raise UserError(
            f"{target.parent} holds a model ({WEIGHTS_FILE}); the export's {CARD_FILE} would replace that model's "
            f"card: write the export into another folder, such as {target.parent / 'onnx'}"
        )
    other = _other_export(target)
    if other is not None:
        raise UserError(
            f"{target.parent} holds another export, {other.name}, which its {CARD_FILE} describes; this export's "
            f"{CARD_FILE} would replace it and leave {other.name} without its card: write the export into another "
            f"folder, such as {target.parent / target.stem}"
        )
    size = card.input_size
    real, synthetic, what = parity_images(size, images)
    with atomic_path(target) as tmp:
        _export_graph(NhwcUint8Model(model).eval(), size, tmp, exporter, opset)
        parity = check_parity(model, tmp, real if len(real) else synthetic, card.temperature)
        if not parity["max_abs_diff_probabilities"] <= tolerance:  # also catches NaN
            raise ParityError(
                f"ONNX export of {card.name} failed its parity check: probabilities differ from PyTorch by "
                f"{parity['max_abs_diff_probabilities']:.2e} (tolerance {tolerance:.0e}); no model file was written"
            )
        # Synthetic smears and blank images sit far from the data, often on a decision boundary where
        # float32 rounding (about 1e-4 in the logits) moves a probability by more than 1e-4; there the
        # logits are compared, which still catches a broken graph (differences of order 1).
        parity["synthetic"] = check_parity(model, tmp, synthetic, card.temperature)
        if not parity["synthetic"]["max_abs_diff_logits"] <= SYNTHETIC_LOGIT_TOLERANCE:
            raise ParityError(
                f"ONNX export of {card.name} failed its parity check on synthetic images: logits differ from "
                f"PyTorch by {parity['synthetic']['max_abs_diff_logits']:.2e} (tolerance "
                f"{SYNTHETIC_LOGIT_TOLERANCE:.0e}); no model file was written"
            )
        onnx_digest = sha256_file(tmp)
    onnx_info = {
        "file": target.name,
        # The card is written after the graph: a run killed between the two leaves a graph beside an older
        # card, which this digest exposes (the predictor refuses the pair, ensure_onnx exports again).
        "onnx_sha256": onnx_digest,
        "exporter": exporter,
        "graph_version": GRAPH_VERSION,
        "opset": _opset_of(target),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", size, size, 3]},
        "output": {"name": OUTPUT_NAME, "meaning": "logits; probabilities = softmax(logits / temperature)"},
        "weights_sha256": sha256_file(weights),
        "card_sha256": sha256_file(weights.parent / CARD_FILE),
        "parity": {**parity, "tolerance": tolerance, "images": what, "n_real_images": len(real)},
    }
    save_card(ModelCard.model_validate({**card.model_dump(mode="json"), "onnx": onnx_info}), target.parent)
    return target


def _other_export(target: Path) -> Path | None:
    """The ``.onnx`` file other than ``target`` that the card in ``target``'s folder describes, if it is
    there: one folder holds one export, as the card beside the graph is named ``card.json`` whatever the
    graph's name. An unreadable card, or one of no export, is replaced as before."""
    try:
        described = json.loads((target.parent / CARD_FILE).read_text(encoding="utf-8"))["onnx"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    other = target.parent / str(described)
    return other if other.name != target.name and other.is_file() else None


def _opset_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_is_current(onnx_file: Path, model_path: str | Path | None) -> bool:
    """True when ``onnx_file`` exists and was exported from the model's present weights and card, by this
    version's graph.

    The card counts too: recalibrating a model changes only its temperature, which the ONNX card copies.
    """
    if not onnx_file.is_file() or not (onnx_file.parent / CARD_FILE).is_file():
        return False
    try:
        recorded = read_card_json(onnx_file.parent).get("onnx", {})
    except ValueError:
        return False
    source = resolve_model_dir(model_path)
    return (
        recorded.get("graph_version") == GRAPH_VERSION
        and recorded.get("weights_sha256") == sha256_file(source / WEIGHTS_FILE)
        and recorded.get("card_sha256") == sha256_file(source / CARD_FILE)
        and recorded.get("onnx_sha256") == sha256_file(onnx_file)
    )


def ensure_onnx(model_path: str | Path | None) -> Path:
    """An up-to-date ONNX file for a saved model, exporting it once if needed.

    Uses the default export (:func:`default_onnx_path`) when it matches the weights; otherwise exports into
    the work folder (``$BLOODCELL_HOME/onnx/<weights hash>/``) and reuses that on later calls. A path ending
    in ``.onnx`` is returned as it is.
    """
    if model_path is not None and names_onnx_file(model_path):
        return Path(model_path)
    cached = cached_onnx_path(resolve_model_dir(model_path))
    for candidate in dict.fromkeys((default_onnx_path(model_path), cached)):  # one path for the bundled model
        if onnx_is_current(candidate, model_path):
            return candidate
    return export_onnx(model_path, cached)
