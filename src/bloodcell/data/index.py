"""The index: one manifest row per file, with hashes, sizes, capture numbers and duplicate groups.

``build_index`` walks a dataset (see :mod:`bloodcell.data.layouts`), opens every file once to hash it and
check it decodes, and writes ``manifest.csv`` into the dataset's work folder. Files that cannot be used
(empty, not an image, truncated, unreadable, decompression bombs) get a row with ``rejected=True`` and a
reason, and never stop the run. A hash cache keyed by (path, size, modification and change times, inode) makes a
second run read only files that changed.

Duplicates: rows with the same SHA-256 form an ``exact_group``. Rows whose perceptual hashes (64-bit DCT
``phash``) differ in at most :data:`NEAR_DUPLICATE_MAX_DISTANCE` bits are near duplicates, and so are
re-captures of one field shifted by a few pixels, which the hash misses (:mod:`bloodcell.data.recaptures`);
exact, near and re-capture links are joined transitively (connected components, i.e. union-find) into
``dup_group``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bloodcell.data.decode import DECODER_VERSION, MAX_FILE_BYTES, ImageError, open_rgb, squashed_note
from bloodcell.data.layouts import Dataset, find_dataset, is_image_name
from bloodcell.data.progress import track
from bloodcell.io import atomic_path, bloodcell_home, path_digest, sha256_file, write_text_if_changed
from bloodcell.machine import available_cores
from bloodcell.notices import warn_once

log = logging.getLogger(__name__)

#: Largest Hamming distance between two 64-bit perceptual hashes that still counts as "the same picture".
#: Chosen on the real data (Aria Original, 2,576 images; see docs/ARCHITECTURE.md, "Duplicate threshold"):
#: all 58 non-identical pairs at distance <= 10 lie within one class, and the 18 we viewed (every pair at
#: 8-10 among them) are the same field of view re-captured (one pair 369 capture numbers apart); at 12 most
#: pairs are merely similar smears and half of them cross classes, so they must not be merged.
NEAR_DUPLICATE_MAX_DISTANCE = 10

MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "class",
    "label",
    "sha256",
    "phash",
    "width",
    "height",
    "bytes",
    "capture",
    "copy",
    "rejected",
    "reason",
    "exact_group",
    "dup_group",
)

#: Per-file facts that depend only on the file's bytes; these are what the hash cache stores.
_FILE_FACTS: tuple[str, ...] = ("sha256", "phash", "width", "height", "rejected", "reason")
#: The hash cache's key columns beside the path (see _stat_key).
_STAT_COLUMNS: tuple[str, ...] = ("bytes", "mtime_ns", "ctime_ns", "inode")
#: The order the manifest's rows are written in (and kfold numbers its groups in).
MANIFEST_ORDER: list[str] = ["label", "capture", "copy", "path"]
#: Name series this short are read as a number that is no capture order (see _warn_of_names_without_numbers).
FEW_IN_A_SERIES = 5
_COPY_SUFFIX = re.compile(r"^(?P<stem>.*?)\s*\((?P<copy>\d+)\)$")
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")
# A time of day in fields of two digits after a year-first date, ending the name's digits but for one more
# field (a camera's 2024-03-12_10-15-30, 2024-03-12 10.15.30, with milliseconds or a second shot in the same
# second: 10-15-30-123, 10-15-30_1): the time's fields together are the capture number, counted within the
# date, and the last field orders names within the time. Read by its last field alone (the seconds, or the
# shot), every minute or second would be a series of its own, one file each, and the names would look like
# hashes (no capture order). Only two-digit time fields count: a counter after a date (20210315_0060), or one
# six-digit time (IMG_20240312_101530), is already the last number, and reading some counters as times (0059)
# and others not (0060) would cut one session in two.
_TIME_AFTER_DATE = re.compile(
    r"(?<!\d)(?:19|20)\d\d[-_.]?(?:0[1-9]|1[0-2])[-_.]?(?:0[1-9]|[12]\d|3[01])[-_.T ]"
    r"(?P<time>\d\d[-_.:]\d\d(?:[-_.:]\d\d)?)(?:[-_.,](?P<within>\d{1,6}))?(?!.*\d)"
)
#: Room for the field after the time (up to six digits) in a capture number: time * WITHIN_TIME + field.
WITHIN_TIME = 10**6


@dataclass(frozen=True)
class IndexResult:
    """What :func:`build_index` produced.

    Attributes
    ----------
    manifest: the manifest, one row per file (columns :data:`MANIFEST_COLUMNS`).
    manifest_path: where it was written.
    summary: the dict ``bloodcell index --json`` prints (see :func:`index_summary`).
    dataset: the dataset that was indexed.
    manifest_sha256: the SHA-256 of the manifest as written: the identity of these data. Taken from the
        text, not read back from the file, which another index of the folder (another class selection) may
        rewrite meanwhile.
    """

    manifest: pd.DataFrame
    manifest_path: Path
    summary: dict[str, Any]
    dataset: Dataset
    manifest_sha256: str


def dataset_workdir(root: str | Path, variant: str) -> Path:
    """The work folder of a dataset: ``$BLOODCELL_HOME/datasets/<folder>-<8 hex of its path>/<variant>/``.

    Parameters
    ----------
    root: the dataset's top folder (``Dataset.top``).
    variant: ``Original`` or ``Segmented``.

    Returns the folder path (not created).
    """
    absolute = Path(root).expanduser().resolve()
    return bloodcell_home() / "datasets" / f"{absolute.name}-{path_digest(absolute)}" / variant


def parse_capture(file_name: str) -> tuple[int, int]:
    """Parse the capture number and copy number from a file name.

    ``WBC-Malignant-Pro-011.jpg`` -> ``(11, 0)``; ``Snap_001.jpg`` -> ``(1, 0)``; ``Sap_013 (1).jpg`` ->
    ``(13, 1)``; ``2024-03-12_10-15-30_2.jpg`` -> ``(101530000002, 0)``. The capture number is the last run
    of digits in the stem after a ``(n)`` copy suffix is taken off, or a time of day in two-digit fields after
    a year-first date, ending the stem's digits but for one more field, read as one number (times
    :data:`WITHIN_TIME`, plus that field); the copy number breaks ties between copies of one capture.

    Parameters
    ----------
    file_name: a file name or path (only the name is used).

    Returns ``(capture, copy)``; capture is -1 when the name holds no number.
    """
    stem = Path(file_name).stem.strip()
    copy = 0
    suffix = _COPY_SUFFIX.match(stem)
    if suffix:
        stem, copy = suffix.group("stem"), int(suffix.group("copy"))
    start, number = _capture_number(stem)
    return (int(number) if start >= 0 else -1), copy


def _capture_number(stem: str) -> tuple[int, str]:
    """Where a name's capture number starts in ``stem`` (-1 without one) and its digits: a time of day in
    two-digit fields after a year-first date (see ``_TIME_AFTER_DATE``), else its last run of digits."""
    stamp = _TIME_AFTER_DATE.search(stem)
    if stamp:
        time = int(re.sub(r"\D", "", stamp.group("time")))
        return stamp.start("time"), str(time * WITHIN_TIME + int(stamp.group("within") or 0))
    number = _LAST_NUMBER.search(stem)
    return (number.start(), number.group(1)) if number else (-1, "")


def capture_series(path: str) -> str:
    """The series a file's capture number counts in: its folder and the name before that number.

    ``Benign/WBC-Benign-011.jpg`` -> ``Benign/WBC-Benign-``; ``P02_011.png`` -> ``P02_``; ``pA/011.png`` ->
    ``pA/``; ``2024-03-12_10-15-30.jpg`` -> ``2024-03-12_`` (the time of day is the number). Numbers restart
    in each series (one per patient, slide or camera session), so capture order is the order within a series, and series follow one another: sorting all files by number alone would
    interleave ``P01_011`` and ``P02_011`` and cut blocks across patients. A name without a number is a
    series of its own.
    """
    relative = Path(path)
    stem = relative.stem.strip()
    suffix = _COPY_SUFFIX.match(stem)
    if suffix:
        stem = suffix.group("stem")
    start, _ = _capture_number(stem)
    prefix = stem[:start] if start >= 0 else stem
    folder = relative.parent.as_posix()
    return prefix if folder in ("", ".") else f"{folder}/{prefix}"


def inspect_file(path: str | Path) -> dict[str, Any]:
    """Hash and validate one file: the facts the manifest keeps about its bytes.

    Parameters
    ----------
    path: the file.

    Returns a dict with ``sha256``, ``phash`` (16 hex digits, empty if rejected), ``width``, ``height``
    (of the stored image, 0 if rejected), ``rejected`` and ``reason``. Never raises for a bad file.
    """
    facts: dict[str, Any] = {
        "sha256": "",
        "phash": "",
        "width": 0,
        "height": 0,
        "rejected": True,
        "reason": "",
    }
    try:
        size = os.stat(path).st_size
        # A file over the decoder's limit is hashed as a stream, never held whole (a video in a class folder).
        data = Path(path).read_bytes() if size <= MAX_FILE_BYTES else None
        facts["sha256"] = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    except OSError as error:
        facts["reason"] = f"cannot read file ({error.strerror or error})"
        return facts
    if not is_image_name(path):
        facts["reason"] = (
            f"unsupported file type {Path(path).suffix or '(no suffix)'!r} (use JPEG, PNG, BMP or TIFF)"
        )
        return facts
    if data is None:  # what the cache build's decoder would refuse too, with the same words
        facts["reason"] = f"file too large ({size:,} bytes; the limit is {MAX_FILE_BYTES:,})"
        return facts
    try:
        # open_rgb already converts grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB.
        image = open_rgb(data)
    except ImageError as error:
        facts["reason"] = error.reason
        return facts
    except Exception as error:  # noqa: BLE001 - one odd file must not stop the index of thousands
        facts["reason"] = f"cannot read image ({type(error).__name__}: {error})"
        return facts
    facts.update(
        phash=str(imagehash.phash(image)), width=image.width, height=image.height, rejected=False, reason=""
    )
    return facts


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode): what says a file is unchanged since it was hashed. The change time
    and inode too, not only the modification time: ``cp -p``, ``rsync -t`` and ``tar x`` restore that one
    on new contents, but not the change time, which only the kernel sets."""
    try:
        stat = path.stat()
    except OSError:  # a broken link, say: inspect_file gives the reason, and a repaired link gets a real key
        return -1, -1, -1, -1
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _hash_cache_name() -> str:
    """The hash cache's file name, per decoder version: a new decoder's verdicts are never mixed with old ones."""
    return f"hash-cache-decoder{DECODER_VERSION}.csv"


def _load_hash_cache(workdir: Path) -> dict[tuple[str, int, int, int, int], dict[str, Any]]:
    """(path, size, mtime_ns, ctime_ns, inode) -> file facts, from an earlier run; empty if there is none or
    it is unreadable (or of an older layout)."""
    cache_path = workdir / _hash_cache_name()
    if not cache_path.is_file():
        return {}
    try:
        table = pd.read_csv(
            cache_path, dtype={"path": str, "phash": str, "sha256": str, "reason": str}, keep_default_na=False
        )
        if not {*_STAT_COLUMNS, *_FILE_FACTS} <= set(table.columns) or not _plausible_hash_cache(table):
            return {}
        facts = table[list(_FILE_FACTS)].to_dict("records")
        keys = zip(table["path"], *(table[column].astype(int) for column in _STAT_COLUMNS))
        return {key: fact for key, fact in zip(keys, facts)}
    except (OSError, ValueError, TypeError, pd.errors.ParserError):
        return {}  # a damaged cache only costs time, never correctness


def _plausible_hash_cache(table: pd.DataFrame) -> bool:
    """Whether every row of a read hash cache holds facts of the kinds written: a file cut short (a full disk,
    a crash mid-write by another tool) leaves a last row whose ``rejected`` reads as text, and ``"False"``
    cast to bool is True: every image would be rejected, for ever."""
    hexes = {"sha256": r"[0-9a-f]{64}", "phash": r"[0-9a-f]{16}"}
    return (table["rejected"].dtype == bool
            and all(table[c].fillna("").str.fullmatch(f"({pattern})?").all() for c, pattern in hexes.items())
            and all(pd.api.types.is_integer_dtype(table[c]) for c in (*_STAT_COLUMNS, "width", "height")))  # fmt: skip


def _save_hash_cache(workdir: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(workdir / _hash_cache_name()) as tmp:
        pd.DataFrame(rows, columns=["path", *_STAT_COLUMNS, *_FILE_FACTS]).to_csv(tmp, index=False, lineterminator="\n")


def _inspect_all(paths: list[Path], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Run :func:`inspect_file` over ``paths`` in order, in ``workers`` processes when that is more than 1
    (capped at the cores this process may use: more processes than cores only compete)."""
    if not paths:
        return []
    workers = min(workers, available_cores())
    if workers <= 1 or len(paths) < 200:
        return list(track(map(inspect_file, paths), len(paths), "Hashing images", progress))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(inspect_file, paths, chunksize=64)
        return list(track(results, len(paths), "Hashing images", progress))


def phash_distances_below(
    phashes: list[str], max_distance: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of 64-bit hex perceptual hashes within ``max_distance`` bits of each other.

    Parameters
    ----------
    phashes: 16-hex-digit hashes.
    max_distance: the largest Hamming distance that counts.
    chunk: rows compared at once (bounds memory at ``chunk * len(phashes) * 8`` bytes).

    Returns two index arrays ``(i, j)``.
    """
    values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    rows, cols = [], []
    for start in range(0, len(values), chunk):
        block = values[start : start + chunk, None] ^ values[None, :]
        i, j = np.nonzero(np.bitwise_count(block) <= max_distance)
        i = i + start
        keep = i < j
        rows.append(i[keep])
        cols.append(j[keep])
    if not rows:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def near_any(phashes: list[str], references: list[str], max_distance: int, chunk: int = 1024) -> np.ndarray:
    """Which of ``phashes`` lie within ``max_distance`` bits of any of ``references`` (a boolean mask).

    Only the cross pairs are compared, in chunks of ``chunk`` rows (memory ``chunk * len(references) * 8``
    bytes): :func:`phash_distances_below` over both lists would also pair the first list with itself.
    """
    values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    known = np.array([int(h, 16) for h in references], dtype=np.uint64)
    near = np.zeros(len(values), dtype=bool)
    if len(known):
        for start in range(0, len(values), chunk):
            block = values[start : start + chunk, None] ^ known[None, :]
            near[start : start + chunk] = (np.bitwise_count(block) <= max_distance).any(axis=1)
    return near


def duplicate_groups(
    manifest: pd.DataFrame,
    max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE,
    near_hashes: dict[str, str] | None = None,
    recaptures: list[tuple[str, str]] | None = None,
) -> pd.DataFrame:
    """Assign ``exact_group`` (same SHA-256) and ``dup_group`` (exact or near duplicates, transitively).

    Parameters
    ----------
    manifest: rows with ``path``, ``sha256``, ``phash`` and ``rejected``.
    max_distance: near-duplicate threshold in bits of perceptual-hash distance.
    near_hashes: path -> perceptual hash to compare instead of the row's own (the Segmented variant
        compares its Original counterparts: black masked backgrounds make unrelated images look alike).
    recaptures: pairs of paths found to be shifted re-captures of one field (joined like near duplicates).

    Returns a copy with the two int columns; ids number groups in row order, singletons get their own
    id, rejected rows get -1.
    """
    result = manifest.copy()
    accepted = np.flatnonzero(~result["rejected"].to_numpy(bool))
    result["exact_group"] = -1
    result["dup_group"] = -1
    if len(accepted) == 0:
        return result
    sha = result["sha256"].to_numpy()[accepted]
    result.loc[result.index[accepted], "exact_group"] = pd.factorize(sha)[0]
    hashes = result["phash"].to_numpy()[accepted].tolist()
    if near_hashes:
        paths = result["path"].to_numpy()[accepted]
        hashes = [near_hashes.get(path) or own for path, own in zip(paths, hashes)]
    # Rows that share a hash are linked to the first row with it, and only the distinct hashes are compared
    # pairwise: 20,000 near-identical images (a blank field, an eyepiece's black surround) made 200 million
    # pairs, 9.5 GB, when every row was compared with every other.
    distinct, first_row, codes = np.unique(np.asarray(hashes), return_index=True, return_inverse=True)
    near_i, near_j = phash_distances_below(distinct.tolist(), max_distance)
    i = np.concatenate([first_row[near_i], np.arange(len(accepted))])
    j = np.concatenate([first_row[near_j], first_row[codes.ravel()]])
    if recaptures:
        position = {path: k for k, path in enumerate(result["path"].to_numpy()[accepted])}
        linked = np.array([(position[a], position[b]) for a, b in recaptures if a in position and b in position],
                          dtype=np.int64).reshape(-1, 2)  # fmt: skip
        i, j = np.concatenate([i, linked[:, 0]]), np.concatenate([j, linked[:, 1]])
    # Exact copies are linked explicitly (their own hashes are equal, but near_hashes may differ).
    exact_codes = result.loc[result.index[accepted], "exact_group"].to_numpy()
    first_of_group = pd.Series(np.arange(len(accepted))).groupby(exact_codes).transform("first").to_numpy()
    i, j = np.concatenate([i, np.arange(len(accepted))]), np.concatenate([j, first_of_group])
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(len(accepted), len(accepted)))
    _, components = connected_components(graph, directed=False)
    result.loc[result.index[accepted], "dup_group"] = pd.factorize(components)[0]
    return result


def count_duplicate_groups(manifest: pd.DataFrame) -> tuple[int, int]:
    """Count duplicate groups with more than one member.

    Returns ``(exact, near)``: exact groups are files with identical bytes; near groups are ``dup_group``
    groups that hold at least two different files (so they exist because of the perceptual hash or a
    shifted re-capture).
    """
    accepted = manifest[~manifest["rejected"]]
    exact = int((accepted.groupby("exact_group").size() > 1).sum())
    near = int((accepted.groupby("dup_group")["sha256"].nunique() > 1).sum())
    return exact, near


def index_summary(manifest: pd.DataFrame, manifest_path: Path, classes: tuple[str, ...]) -> dict[str, Any]:
    """The ``bloodcell index --json`` object.

    Keys: ``images`` (files indexed), ``accepted``, ``rejected`` (list of ``{"path", "reason"}``),
    ``classes`` (class -> accepted images), ``exact_duplicate_groups``, ``near_duplicate_groups`` (see
    :func:`count_duplicate_groups`), ``manifest`` (path of the manifest CSV); :func:`build_index` adds
    ``recaptured_pairs`` (pairs of shifted re-captures linked into duplicate groups).
    """
    accepted = manifest[~manifest["rejected"]]
    exact, near = count_duplicate_groups(manifest)
    counts = accepted["class"].value_counts()
    return {
        "images": len(manifest),
        "accepted": len(accepted),
        "rejected": [
            {"path": row.path, "reason": row.reason} for row in manifest[manifest["rejected"]].itertuples()
        ],
        "classes": {name: int(counts.get(name, 0)) for name in classes},
        "exact_duplicate_groups": exact,
        "near_duplicate_groups": near,
        "manifest": str(manifest_path),
    }


def _manifest_rows(dataset: Dataset, facts: list[dict[str, Any]], sizes: list[int]) -> pd.DataFrame:
    labels = {name: i for i, name in enumerate(dataset.classes)}
    rows = []
    for (path, name), fact, size in zip(dataset.files, facts, sizes):
        capture, copy = parse_capture(path)
        rows.append(
            {
                "path": path,
                "class": name,
                "label": labels[name],
                "bytes": size,
                "capture": capture,
                "copy": copy,
                **fact,
            }
        )
    table = pd.DataFrame(rows)
    table["rejected"] = table["rejected"].astype(bool)
    # Capture order within each class is what the session split cuts into blocks.
    return table.sort_values(MANIFEST_ORDER, kind="stable").reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV back with the right column types (hashes stay strings)."""
    table = pd.read_csv(
        path, dtype={"sha256": str, "phash": str, "reason": str, "class": str}, keep_default_na=False
    )
    table["rejected"] = table["rejected"].astype(str).str.lower().eq("true") | table["rejected"].eq(True)
    return table


def _original_hashes(
    dataset: Dataset, class_names: list[str] | None, progress: bool
) -> dict[str, str] | None:
    """For an Aria Segmented index, path -> perceptual hash of the Original counterpart; else None.

    On the real Segmented images the masked black background makes unrelated smears hash alike (23
    cross-class groups, one of 43 images, at the Original threshold); the Original field of view does not.
    """
    if dataset.layout != "aria" or dataset.variant != "Segmented" or not (dataset.top / "Original").is_dir():
        return None
    original = build_index(dataset.top, "Original", class_names, progress=progress)
    accepted = original.manifest[~original.manifest["rejected"]]
    return dict(zip(accepted["path"], accepted["phash"]))


def _recaptures(dataset: Dataset, rows: pd.DataFrame, workdir: Path, progress: bool,
                counterparts: dict[str, str] | None) -> list[tuple[str, str]]:  # fmt: skip
    """Shifted re-captures among the accepted rows. For the Aria Segmented variant the Original counterparts
    (``counterparts``: the paths the Original index accepted) are compared, as for the perceptual hashes
    (masked backgrounds would make unrelated fields alike); a row without one is compared as it is."""
    from bloodcell.data.recaptures import find_recaptures

    accepted = rows[~rows["rejected"]]
    original = dataset.top / "Original"
    files = [original / path if counterparts and path in counterparts else dataset.root / path
             for path in accepted["path"]]  # fmt: skip
    return find_recaptures(files, accepted["path"].tolist(), accepted["sha256"].tolist(), accepted["class"].tolist(),
                           workdir, progress)  # fmt: skip


def _warn_of_names_without_numbers(manifest: pd.DataFrame, top: Path) -> None:
    """Say when most file names carry no number: the session split's blocks follow capture order, which
    the numbers stand for; without them the blocks follow the names' order, and neither the blocks, nor the
    embargo beside them, nor the block bootstrap's interval need follow the sessions."""
    accepted = manifest[~manifest["rejected"]]
    unnumbered = int((accepted["capture"] < 0).sum())
    if unnumbered > len(accepted) / 2:
        warn_once(log, "%d of the %d images of %s have no number in their file names: the session split's blocks "
                  "then follow the names' order, not capture order, and need not be sessions (name files in "
                  "capture order, as cameras do, for blocks that are)", unnumbered, len(accepted), top)  # fmt: skip
        return
    # Names like hashes hold digits too, but every file is then a series of its own (capture_series):
    # no numbering to follow either.
    sizes = accepted["path"].map(capture_series).value_counts()
    alone = int((sizes == 1).sum())
    if alone > len(accepted) / 2:
        warn_once(log, "%d of the %d images of %s share no name stem with another (hash-like names?): their "
                  "numbers are no capture order, so the session split's blocks need not be sessions (name files "
                  "in capture order, as cameras do, for blocks that are)", alone, len(accepted), top)  # fmt: skip
        return
    # A number that is no capture order comes last in names like field7_slide3.jpg: each "series" (field7_slide)
    # then holds a few files, one a slide, and every block mixes the slides.
    few = sizes[(sizes > 1) & (sizes <= FEW_IN_A_SERIES)]
    # A series inside a sub-folder of its class folder (Benign/p07/img_003.png) is a patient's or a slide's,
    # kept whole by every split: the advice below (sub-folders) is followed already.
    from bloodcell.data.splits import sub_folders  # splits imports this module

    kept_whole = set(accepted["path"][sub_folders(accepted).notna().to_numpy()].map(capture_series))
    few = few[~few.index.isin(kept_whole)]
    if alone + int(few.sum()) > len(accepted) / 2 and len(few):
        example = str(few.index[0])
        warn_once(log, "most of the %d images of %s lie in name series of %d files or fewer (%s: %d files): each "
                  "series is put in the order of the last number in its names, so where that number is no capture "
                  "order (a slide or patient number last, as in field7_slide3.jpg) the session split's blocks need "
                  "not be sessions; put each patient's or slide's images in a sub-folder of their class folder "
                  "(kept whole by every split), or name files so the capture number comes last", len(accepted), top,
                  FEW_IN_A_SERIES, example, int(few.iloc[0]))  # fmt: skip


def _warn_of_cross_class_duplicates(manifest: pd.DataFrame, shown: int = 3, members_shown: int = 4) -> None:
    """Name duplicate groups whose images are filed under different classes: one picture with two labels
    is a labelling error, which the split keeps in one part but cannot resolve. At most ``shown`` groups
    and ``members_shown`` images of each are named (one of each class first), so that one large group
    cannot fill the terminal."""
    accepted = manifest[~manifest["rejected"]]
    classes = accepted.groupby("dup_group")["class"].nunique()
    mixed = classes[classes > 1].index
    if len(mixed):
        examples = []
        for group in mixed[:shown]:
            members = accepted.loc[accepted["dup_group"] == group, ["path", "class"]]
            first_of_each_class = ~members["class"].duplicated()
            ordered = pd.concat([members[first_of_each_class], members[~first_of_each_class]])
            named = [f"{path} ({name})" for path, name in ordered.head(members_shown).itertuples(index=False)]
            more = len(members) - len(named)
            examples.append("; ".join(named) + (f"; and {more} more" if more else ""))
        warn_once(log, "%d duplicate group(s) hold images filed under different classes (labelling errors?): %s",
                  len(mixed), " | ".join(examples))  # fmt: skip


def _warn_of_squashed_images(manifest: pd.DataFrame, top: Path) -> None:
    """Say when images are not square: the cache, like every predictor, resizes each to a square without
    cropping, which changes the cells' proportions (said once for the data set, not once an image)."""
    accepted = manifest[~manifest["rejected"]]
    note = squashed_note(list(zip(accepted["path"], accepted["width"], accepted["height"])), f" of {top}")
    if note:
        warn_once(log, note)


def build_index(
    root: str | Path,
    variant: str = "Original",
    class_names: list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    near_distance: int = NEAR_DUPLICATE_MAX_DISTANCE,
) -> IndexResult:
    """Index a dataset: hash and check every file, find duplicates, write the manifest.

    Parameters
    ----------
    root: the dataset folder (any layout :func:`~bloodcell.data.layouts.find_dataset` knows).
    variant: ``Original`` or ``Segmented`` (Aria layout).
    class_names: class names for a plain class-per-folder layout (see ``find_dataset``).
    out: where to write the manifest CSV; default ``dataset_workdir(...)/manifest.csv``.
    progress: draw a progress bar on stderr.
    workers: processes for hashing. Measured on the 2-core machine (2,576 files): 2.3 s with 1, 1.3-2.2 s with
        2 depending on load; the default stays 1 so indexing does not starve other work.
    near_distance: near-duplicate threshold (bits of perceptual-hash distance).

    Returns an :class:`IndexResult`. Raises :class:`~bloodcell.errors.UserError` for a missing, empty or
    unrecognisable folder.
    """
    dataset = find_dataset(root, variant, class_names)
    workdir = dataset_workdir(dataset.top, dataset.variant)
    cache = _load_hash_cache(workdir)
    paths = [dataset.root / path for path, _ in dataset.files]
    keys = [(path, *_stat_key(full)) for (path, _), full in zip(dataset.files, paths)]
    missing = [k for k, key in enumerate(keys) if key not in cache]
    fresh = _inspect_all([paths[k] for k in missing], workers, progress)
    inspected = dict(zip(missing, fresh))
    facts = [inspected[k] if k in inspected else cache[key] for k, key in enumerate(keys)]
    # Files of the folder this listing left out (other classes than --classes asks for) keep their entries
    # while they are unchanged: each such index emptied the cache of them, and the next full one hashed them again.
    listed = {key[0] for key in keys}
    kept = {key: fact for key, fact in cache.items() if key[0] not in listed and _stat_key(dataset.root / key[0]) == key[1:]}
    if missing or len(cache) != len(keys) + len(kept):
        rows = [*zip(keys, facts), *kept.items()]
        _save_hash_cache(workdir, [{"path": k[0], **dict(zip(_STAT_COLUMNS, k[1:])), **f} for k, f in rows])
    rows = _manifest_rows(dataset, facts, [k[1] for k in keys])
    near_hashes = _original_hashes(dataset, class_names, progress)
    recaptures = _recaptures(dataset, rows, workdir, progress, near_hashes)
    manifest = duplicate_groups(rows, near_distance, near_hashes, recaptures)
    manifest = manifest[list(MANIFEST_COLUMNS)]
    _warn_of_cross_class_duplicates(manifest)
    _warn_of_names_without_numbers(manifest, dataset.top)
    _warn_of_squashed_images(manifest, dataset.top)
    manifest_path = Path(out) if out is not None else workdir / "manifest.csv"
    # One line ending on every system: the manifest's SHA-256 names the data in model cards and reports, and
    # pandas would otherwise end lines with \r\n on Windows.
    text = manifest.to_csv(index=False, lineterminator="\n")
    write_text_if_changed(manifest_path, text)
    # Pairs of distinct files only: the screen links byte-identical copies too, which are counted (and said) as
    # identical files, and "1 pair of re-captures" beside "0 groups with re-captures" contradicted itself.
    sha256 = dict(zip(manifest["path"], manifest["sha256"]))
    distinct = sum(sha256[a] != sha256[b] for a, b in recaptures)
    summary = {**index_summary(manifest, manifest_path, dataset.classes), "recaptured_pairs": distinct}
    return IndexResult(manifest, manifest_path, summary, dataset, hashlib.sha256(text.encode("utf-8")).hexdigest())
