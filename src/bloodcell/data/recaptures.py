"""Re-captures of one field of view, slightly shifted: duplicates that a perceptual hash misses.

The microscope's stage moved a little between two captures of the same field: the same cells, shifted by
a few to twenty pixels. A 64-bit perceptual hash changes with such a shift (12-26 bits on the dataset's
pairs, beyond :data:`~bloodcell.data.index.NEAR_DUPLICATE_MAX_DISTANCE`), so those pairs could fall on both
sides of a split: the model would be tested on a field it was trained on. A review found 10 such pairs at
a correlation of 0.95 and 21 at 0.90, some of them 175 captures apart, beyond any embargo.

What counts: the best normalised correlation of two grey thumbnails over small shifts. Each image's
thumbnail (:data:`CONFIRM_SIZE` px) has its centre compared with every window of the other's within
:data:`CONFIRM_SHIFT` px (about 10 % of the field); :data:`MIN_CORRELATION` or more is a re-capture. Comparing
every pair so costs a tenth of a teraflop for this dataset, so a cheaper screen (smaller thumbnails and
shifts, a lower bar) picks the candidates first; it kept all 21 pairs of the review's check. Images are
compared within their class: on this data no pair across classes reaches even 0.8, and it quarters the
work. Written by hand because no library we use finds shifted copies (imagehash's hashes are not
shift-tolerant, and a feature-matching library would be a heavy dependency for one check).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bloodcell.data.decode import DECODER_VERSION, open_rgb
from bloodcell.io import atomic_path
from bloodcell.notices import warn_once

log = logging.getLogger(__name__)

#: Bump when the method or its thresholds change: cached pairs of another version are not reused.
RECAPTURE_VERSION = 2
#: The check: thumbnails of this side, compared over shifts of up to this many pixels, at this correlation.
CONFIRM_SIZE, CONFIRM_SHIFT, MIN_CORRELATION = 40, 4, 0.90
#: The screen that picks the candidates for the check.
SCREEN_SIZE, SCREEN_SHIFT, SCREEN_CORRELATION = 24, 2, 0.70
#: Rows of the screen's correlation matrix computed at once (bounds memory at ``ROWS * n * 4`` bytes).
ROWS = 512
#: Candidate pairs checked at once (bounds the check's memory at about ``PAIRS * 2 * 4 * side**2`` bytes).
PAIRS = 4096
#: The screen lets through 0.008-0.033 % of a class's pairs on this dataset. Where it lets through more than
#: this share, the images are alike at the screen's scale for a reason other than re-capture (a round
#: eyepiece's black surround, an empty background), the check cannot tell fields apart, and linking
#: would merge distinct fields into one duplicate group: the class is left unchecked, with a warning.
MAX_SCREEN_SHARE = 0.01


def grey_thumbnail(path: str | os.PathLike[str], size: int = CONFIRM_SIZE) -> np.ndarray:
    """The image at ``path`` as a ``(size, size)`` float32 grey thumbnail (the whole field, squeezed)."""
    with open_rgb(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _unit_rows(windows: np.ndarray) -> np.ndarray:
    """Each window as a zero-mean, unit-length row: a dot product of two is their correlation."""
    flat = windows.reshape(len(windows), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)


def _shifted(thumbs: np.ndarray, shift: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The centres of the thumbnails, and every window of them shifted by up to ``shift`` px, as unit rows."""
    side = thumbs.shape[1] - 2 * shift
    centre = _unit_rows(thumbs[:, shift : shift + side, shift : shift + side])
    windows = [_unit_rows(thumbs[:, dy : dy + side, dx : dx + side])
               for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)]  # fmt: skip
    return centre, windows


def best_correlations(thumbs: np.ndarray, shift: int, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The best correlation over shifts of each pair ``(i, j)``, either way round."""
    if len(pairs[0]) == 0:
        return np.zeros(0, dtype=np.float32)
    # Only the images in some pair: every shifted window of every image would take 330 KB an image.
    involved, inverse = np.unique(np.concatenate(pairs), return_inverse=True)
    i, j = inverse[: len(pairs[0])], inverse[len(pairs[0]) :]
    centre, windows = _shifted(thumbs[involved], shift)
    best = np.full(len(i), -1.0, dtype=np.float32)
    for start in range(0, len(i), PAIRS):  # in chunks: gathering every pair's rows at once grows without bound
        a, b, out = i[start : start + PAIRS], j[start : start + PAIRS], best[start : start + PAIRS]
        for window in windows:
            np.maximum(out, np.einsum("kd,kd->k", centre[a], window[b]), out=out)
            np.maximum(out, np.einsum("kd,kd->k", centre[b], window[a]), out=out)
    return best


def _screen(thumbs: np.ndarray, most: float = np.inf) -> tuple[np.ndarray, np.ndarray] | None:
    """Candidate pairs ``i < j`` whose small thumbnails correlate at :data:`SCREEN_CORRELATION` at some shift;
    None as soon as more than ``most`` pairs are sure to pass (their indices would take memory for nothing)."""
    small = np.stack([np.asarray(Image.fromarray(t).resize((SCREEN_SIZE, SCREEN_SIZE), Image.Resampling.BILINEAR))
                      for t in thumbs])  # fmt: skip
    centre, windows = _shifted(small, SCREEN_SHIFT)
    rows, cols, passed = [], [], 0
    for start in range(0, len(small), ROWS):
        block = np.full((min(ROWS, len(small) - start), len(small)), -1.0, dtype=np.float32)
        for window in windows:
            np.maximum(block, centre[start : start + ROWS] @ window.T, out=block)
        i, j = np.nonzero(block >= SCREEN_CORRELATION)
        # Each image passes with itself, and a pair may pass both ways round: at least this many pairs.
        passed += len(i) - len(block)
        if passed / 2 > most:
            return None
        rows.append(i + start)
        cols.append(j)
    i, j = np.concatenate(rows), np.concatenate(cols)
    i, j = np.minimum(i, j), np.maximum(i, j)  # the screen is one-sided: a pair may pass either way round
    keep = i < j
    unique = np.unique(np.stack([i[keep], j[keep]], axis=1), axis=0)
    return unique[:, 0], unique[:, 1]


def recapture_pairs(thumbs: np.ndarray, label: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``i < j`` of thumbnails (one class) that are re-captures of one field: see the module doc.

    None, with a warning naming ``label``, where the screen passes more than :data:`MAX_SCREEN_SHARE` of the
    pairs: images so alike that the check would link distinct fields.
    """
    none = np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    if len(thumbs) < 2:
        return none
    n_pairs = len(thumbs) * (len(thumbs) - 1) // 2
    most = max(50, int(MAX_SCREEN_SHARE * n_pairs))
    candidates = _screen(thumbs, most)
    if candidates is None or len(candidates[0]) > most:
        warn_once(log, "class %s: more than %d of its %d image pairs look alike at %d px, too many to be re-captures "
                    "of one field (a round eyepiece or an empty background?); shifted re-captures are not looked "
                    "for in it, only exact and near duplicates", label or "?", most, n_pairs, SCREEN_SIZE)  # fmt: skip
        return none
    i, j = candidates
    keep = best_correlations(thumbs, CONFIRM_SHIFT, (i, j)) >= MIN_CORRELATION
    return i[keep], j[keep]


def find_recaptures(
    files: Sequence[Path],
    keys: Sequence[str],
    hashes: Sequence[str],
    classes: Sequence[str],
    cache_dir: Path,
    progress: bool = False,
) -> list[tuple[str, str]]:
    """Re-captured pairs among ``files`` (compared within their ``classes``), named by their ``keys``.

    ``keys`` (the manifest's paths) and ``hashes`` (the rows' SHA-256s) identify the data: each class's pairs
    are computed once for a state of that class and kept in ``cache_dir`` (``recaptures-<hash>.csv``; about
    a second of decoding and one of arithmetic for this dataset on 2 cores). Per class, so that a changed
    file costs its class only: one touched file among 20,000 took 49 s when every class was compared again.
    """
    labels = np.asarray(classes)
    members = {label: np.flatnonzero(labels == label) for label in dict.fromkeys(classes)}
    cached = {label: Path(cache_dir) / f"recaptures-{_state_key(rows, files, keys, hashes, label)}.csv"
              for label, rows in members.items()}  # fmt: skip
    found = {label: _read_pairs(cached[label]) for label in members}
    todo = [label for label, pairs in found.items() if pairs is None]
    if todo:
        from bloodcell.data.progress import track

        rows = np.concatenate([members[label] for label in todo])
        thumbnails = track((grey_thumbnail(files[k]) for k in rows), len(rows), "Looking for re-captured fields", progress)
        thumbs = dict(zip(rows.tolist(), thumbnails))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for label in track(todo, len(todo), "Comparing the fields of each class", progress):  # quadratic in a class
            own = members[label]
            i, j = recapture_pairs(np.stack([thumbs[k] for k in own.tolist()]), str(label))
            found[label] = [(keys[own[a]], keys[own[b]]) for a, b in zip(i, j)]
            with atomic_path(cached[label], suffix=".csv") as tmp:
                pd.DataFrame(found[label], columns=["a", "b"]).to_csv(tmp, index=False, lineterminator="\n")
    for stale in set(Path(cache_dir).glob("recaptures-*.csv")) - set(cached.values()):
        with contextlib.suppress(OSError):  # gone already, or open in another process (Windows)
            stale.unlink()
    return [pair for label in members for pair in found[label] or []]


def _state_key(rows: np.ndarray, files: Sequence[Path], keys: Sequence[str], hashes: Sequence[str], label: str) -> str:
    """What one class's pairs depend on: its rows' names, hashes and files, this module's version and the
    decoder's (which makes the thumbnails compared)."""
    key = hashlib.sha256(f"recaptures {RECAPTURE_VERSION} decoder {DECODER_VERSION}\n{label}\n".encode())
    for k in rows.tolist():
        # The files read may be others than the rows hashed (the Segmented variant reads the Original
        # pictures): their size, modification and change time stand for their content here (as in the
        # index's hash cache).
        stat = os.stat(files[k])
        key.update(f"{keys[k]}\0{hashes[k]}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n".encode())
    return key.hexdigest()[:16]


def _read_pairs(path: Path) -> list[tuple[str, str]] | None:
    """The pairs a cache file holds; None when it is missing or damaged (they are computed again)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if (table[["a", "b"]] == "").to_numpy().any():  # a row cut short (a file cut mid-write): recompute
            return None
        return list(zip(table["a"], table["b"], strict=True))
    return None
