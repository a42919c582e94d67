"""Leakage-aware train / val / test splits of a manifest.

The files carry no patient ids, but their numbers follow capture order, so neighbouring numbers tend to
come from one patient and one session. Protocols:

``session`` (default)
    Each class, in capture order, is cut into contiguous blocks of about ``block_size`` images. Whole
    blocks, chosen by the seed, go to test and to validation; blocks joined by a duplicate group (a field
    re-captured in another session) go together. Training loses the ``embargo`` images on each
    side of every held-out image run (they get ``split="embargo"`` and are used by nothing).
``random``
    Stratified by class at image level, for comparison with published numbers; such splits leak sessions.
``kfold``
    ``folds`` stratified folds whose groups are session blocks; fold ``fold`` is validation, the rest
    training (with the same embargo); there is no test part.

Under every protocol, the sub-folders of a class folder (``Benign/patient07/...``: a patient or a slide, the
strongest grouping a user can give) stay whole in one part: session blocks are cut only between them, and
the random split draws them whole. A class that keeps all its images in one sub-folder is split as if it
kept them loose (that folder tells no one apart).

Under every protocol, duplicate groups (``dup_group``: exact and near duplicates, and shifted re-captures of
one field) stay in one part: a group found in two parts keeps its members in the most protected of them
(test, then val, then train), and its members in the others are left out (``embargo``).
:func:`check_leakage` re-checks the result and raises :class:`LeakageError`.

Every row keeps its ``block`` (``"<class>:<nn>"``), the session block used to resample for bootstrap
confidence intervals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bloodcell.config import DataConfig
from bloodcell.data.index import MANIFEST_ORDER, capture_series
from bloodcell.errors import UserError
from bloodcell.io import write_text_if_changed
from bloodcell.notices import warn_once

log = logging.getLogger(__name__)

#: Raised whenever make_split gives other parts for the same manifest and settings, so that what was cached
#: from a split (the audit's baselines) is computed again: 2 since blocks joined by a re-capture are held out
#: together (eighteenth session), 3 since a class folder's sub-folders are kept whole (twentieth; files
#: directly in their class folders, as in Aria and the Kaggle copy, are split as under 2), 4 since a time of
#: day in two-digit fields after a year-first date in a file name is read as one capture number (the order
#: is that of rules 3 but for corner cases; names numbered otherwise, Aria's among them, are split as under 3).
SPLIT_RULES = 4
PROTOCOLS: tuple[str, ...] = ("session", "random", "kfold")
PARTS: tuple[str, ...] = ("train", "val", "test", "embargo")
#: Parts a model is trained or evaluated on; a duplicate group must not touch two of them.
USED_PARTS: tuple[str, ...] = ("train", "val", "test")
#: When a duplicate group straddles parts it is kept in the first of these that it touches (the rest is left out).
_PROTECTION_ORDER: tuple[str, ...] = ("test", "val", "train")


class LeakageError(RuntimeError):
    """A split in which the same (or nearly the same) image is in two parts; the message lists examples."""


class TooFewToSplit(UserError):
    """A class (or the data) gives too few session blocks for the parts a protocol needs. Scoring every image
    (``evaluate --split all``) needs no parts: it falls back to :func:`unsplit`, and says the ``reason``
    without the ``advice`` on how to get a split."""

    def __init__(self, reason: str, advice: str, joiner: str = "; ") -> None:
        super().__init__(f"{reason}{joiner}{advice}")
        self.reason = reason


def _capture_order(split: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by class, then capture series, capture number, copy number and path (the order blocks
    are cut in): each series (patient, slide, session; see :func:`capture_series`) in its own stretch. Aria's
    files hold one series a class, so there this is the order of the numbers."""
    series = split["path"].map(lambda path: capture_series(str(path)))
    return split.assign(_series=series).sort_values(["label", "_series", "capture", "copy", "path"],
                                                    kind="stable").drop(columns="_series")  # fmt: skip


def sub_folders(rows: pd.DataFrame) -> pd.Series:
    """The sub-folder each row lies in below what all the files of its class share (``Benign/patient07/
    slide2/img_3.jpg`` -> ``Benign/patient07``: the outermost, the patient rather than the slide; under
    ``Benign/all/patient07/...``, ``Benign/all/patient07``), kept whole by every split. NaN for a file
    directly in that shared folder, so for every file of a class kept all in one folder of files (one such
    folder tells no patient apart: its files are split as if they lay loose in the class folder)."""
    parts = [PurePosixPath(str(path)).parts for path in rows["path"]]
    classes = (rows["class"] if "class" in rows else rows["label"]).to_numpy()
    folder = np.full(len(rows), None, dtype=object)
    for name in pd.unique(classes):
        at = np.flatnonzero(classes == name)
        members = [parts[k] for k in at]
        depth = 1  # a path's first part is its class folder
        while all(len(p) > depth + 1 for p in members) and len({p[: depth + 1] for p in members}) == 1:
            depth += 1  # every file lies deeper in one and the same folder (Benign/all/): look inside it
        folder[at] = ["/".join(p[: depth + 1]) if len(p) > depth + 1 else None for p in members]
    return pd.Series(folder, index=rows.index, dtype=object)


def _capture_segments(rows: pd.DataFrame) -> np.ndarray:
    """The stretch of capture order each row counts in: its sub-folder (:func:`sub_folders`), or "" for the
    files loose in a class folder. Capture-order neighbours (the embargo's, the capture gaps') share one:
    another patient's images are no neighbours."""
    return sub_folders(rows).fillna("").to_numpy()


def _unit_sizes(folders: pd.Series) -> tuple[list[int], list[bool]]:
    """The sizes of the runs (in capture order) that a block may not cut, a sub-folder's files or one loose
    file, and whether each is a loose file."""
    sizes: list[int] = []
    loose: list[bool] = []
    previous: object = None
    for folder in folders.to_numpy(dtype=object):
        if sizes and pd.notna(folder) and folder == previous:
            sizes[-1] += 1
        else:
            sizes.append(1)
            loose.append(not pd.notna(folder))
        previous = folder
    return sizes, loose


def _block_starts(units: list[int], n_blocks: int, loose: Sequence[bool] | None = None) -> list[int]:
    """Where each of about ``n_blocks`` blocks begins, the ``units`` (sizes, in capture order) kept whole.

    A unit larger than a block's share (the images over the blocks, both less those of such units) is a
    block of its own; the runs of smaller units between them share the other blocks in proportion to their
    images (one at least each), and each run is cut as evenly as its units allow. With units of one image
    only, ``np.array_split``'s equal cut. ``loose`` says which units are loose files (default: all): a run of
    loose files only, under half a block's share, joins the block beside it.
    """
    loose = [True] * len(units) if loose is None else list(loose)
    alone: set[int] = set()  # indices of the units that are blocks of their own
    base = sum(units) / n_blocks  # a block's share of the whole class
    while True:
        rest = [k for k in range(len(units)) if k not in alone]
        blocks_left = n_blocks - len(alone)
        share = sum(units[k] for k in rest) / blocks_left if blocks_left > 0 else math.inf
        # (never a unit of under half the whole's share: once the large sub-folders are set apart, the
        # share of what is left can fall to a stray file's size)
        larger = {k for k in rest if units[k] > share and units[k] >= base / 2}
        if not larger or blocks_left <= len(larger):
            break
        alone |= larger
    runs: list[list[int]] = [[]]  # the runs of smaller units, by index, between the blocks of their own
    for k in range(len(units)):
        if k in alone:
            runs.append([])
        else:
            runs[-1].append(k)
    runs = [run for run in runs if run]
    # A run of a few loose files between sub-folders (a stray scan_001.png sorted after them) joins the block
    # beside it rather than making a block of its own: a one-image block would take the class's embargo
    # (half its smallest loose block) to nothing.
    stray = [run for run in runs if alone and all(loose[k] for k in run) and sum(units[k] for k in run) < base / 2]
    runs = [run for run in runs if run not in stray]
    shares = _apportion([sum(units[k] for k in run) for run in runs], max(n_blocks - len(alone), len(runs)))
    starts_at = {k: [k] for k in alone}
    for run, blocks in zip(runs, shares, strict=True):
        starts_at[run[0]] = [run[first] for first in _even_cut([units[k] for k in run], blocks)]
    if stray and stray[0][0] == 0:  # a stray run first: the block after it begins with it instead
        after = min(starts_at)
        starts_at[0] = [0, *starts_at.pop(after)[1:]]
    offsets = np.concatenate([[0], np.cumsum(units)])
    return [int(offsets[k]) for first in sorted(starts_at) for k in starts_at[first]]


def _apportion(sizes: list[int], blocks: int) -> list[int]:
    """Blocks for each run of ``sizes``: one each, the rest in proportion to the sizes (largest remainders)."""
    extra = blocks - len(sizes)
    if extra <= 0:
        return [1] * len(sizes)
    exact = [extra * size / sum(sizes) for size in sizes]
    given = [math.floor(value) for value in exact]
    for k in sorted(range(len(sizes)), key=lambda k: given[k] - exact[k])[: extra - sum(given)]:
        given[k] += 1
    return [1 + g for g in given]


def _even_cut(units: list[int], n_blocks: int) -> list[int]:
    """The indices of the units that begin each of ``n_blocks`` blocks of one run: each block takes units
    until it holds its share of what is left, leaving a unit for each block to come (``np.array_split``'s
    cut for units of one image)."""
    firsts, index, blocks_left = [], 0, n_blocks
    while index < len(units):
        firsts.append(index)
        share, size = sum(units[index:]) / blocks_left, 0
        while index < len(units) and (size == 0 or (size < share and len(units) - index > blocks_left - 1)):
            size += units[index]
            index += 1
        blocks_left = max(1, blocks_left - 1)
    return firsts


def _blocks_per_class(n_images: int, block_size: int, min_blocks: int) -> int:
    """How many contiguous blocks a class of ``n_images`` is cut into (at least ``min_blocks`` if it can)."""
    return max(1, math.floor(n_images / block_size + 0.5), min(n_images, min_blocks))  # half rounds up


def session_blocks(split: pd.DataFrame, block_size: int = 40, min_blocks: int = 1) -> pd.DataFrame:
    """Cut each class, in capture order, into contiguous blocks of about ``block_size`` images.

    Parameters
    ----------
    split: accepted manifest rows (``path``, ``class``, ``label``, ``capture``, ``copy``).
    block_size: images per block.
    min_blocks: cut small classes into at least this many blocks (so val and test can each take one).

    Returns a copy with ``block`` (``"<class>:<nn>"``), ``block_index`` (int within the class) and
    ``position`` (capture-order position within the class). A block never cuts a sub-folder
    (:func:`sub_folders`): a class of few sub-folders gets fewer blocks, of whole sub-folders.
    """
    result = split.copy()
    result["block"] = ""
    result["block_index"] = -1
    result["position"] = -1
    ordered = _capture_order(split)
    folders = sub_folders(ordered)
    for _, rows in ordered.groupby("label", sort=True):
        n_blocks = _blocks_per_class(len(rows), block_size, min_blocks)
        starts = np.zeros(len(rows), dtype=np.int64)
        sizes, loose = _unit_sizes(folders[rows.index])
        starts[_block_starts(sizes, n_blocks, loose)] = 1
        index = np.cumsum(starts) - 1
        name = rows["class"].iloc[0]
        result.loc[rows.index, "block_index"] = index
        result.loc[rows.index, "block"] = [f"{name}:{k:02d}" for k in index]
        result.loc[rows.index, "position"] = np.arange(len(rows))
    return result


def _held_out_counts(rows: pd.DataFrame, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of one class's blocks go to val and to test; a clear error when too few are left to train."""
    n_blocks, n_images, name = int(rows["block_index"].max()) + 1, len(rows), rows["class"].iloc[0]
    n_test = max(1, math.floor(test_fraction * n_blocks + 0.5))
    n_val = max(1, math.floor(val_fraction * n_blocks + 0.5))
    if n_test + n_val >= n_blocks:
        folders = sub_folders(rows).dropna()
        # Every unit (a sub-folder, a loose file) already a block of its own: no block size gives more
        if folders.size and n_blocks >= folders.nunique() + n_images - folders.size:
            raise TooFewToSplit(
                f"class {name!r} gives only {n_blocks} session block(s), too few for val, test and training: "
                f"{folders.size} of its {n_images} images lie in {folders.nunique()} sub-folder(s), each kept whole "
                "in one part (a patient or a slide)",
                "add images or sub-folders, or, if its sub-folders are no patients or slides, move the images out of them",
            )
        if n_blocks >= n_images:  # one image a block already: no block size helps
            raise TooFewToSplit(f"class {name!r} has only {n_images} image(s), too few for val, test and training (3 at "
                                "the least)", "add images, or leave the class out", ": ")  # fmt: skip
        raise TooFewToSplit(
            f"class {name!r} has only {n_blocks} session block(s), too few for val, test and training",
            "lower the block size (--block-size; for train, --set data.block_size=N) or add images",
        )
    return n_val, n_test


def _assign_session(blocked: pd.DataFrame, seed: int, val_fraction: float, test_fraction: float) -> pd.Series:
    """Per class, pick whole blocks for test and val with a seeded generator; the rest is train.

    Blocks joined by a duplicate group (a field captured again in another session: the same slide) are
    held out together, as kfold's groups are: holding out one of them and leaving out only the re-captured
    image of the other would keep the rest of that slide's session in training.
    """
    split = pd.Series("train", index=blocked.index, dtype=object)
    units = pd.Series(_block_and_duplicate_groups(blocked), index=blocked.index)
    for label, rows in blocked.groupby("label", sort=True):
        n_blocks, name = int(rows["block_index"].max()) + 1, rows["class"].iloc[0]
        n_val, n_test = _held_out_counts(rows, val_fraction, test_fraction)
        blocks_of_unit = rows.groupby(units[rows.index])["block_index"].agg(lambda blocks: sorted(set(blocks)))
        unit_of_block = dict(zip(rows["block_index"], units[rows.index], strict=True))
        # One generator per (seed, class index): the classes' blocks are drawn independently (a class added
        # after the others, with the last index, leaves their draws as they were).
        order = [int(block) for block in np.random.default_rng([seed, int(label)]).permutation(n_blocks)]
        free = set(order)
        for part, wanted in (("test", n_test), ("val", n_val)):
            chosen = _draw_whole_units(order, free, wanted, lambda block: blocks_of_unit[unit_of_block[block]])
            if len(chosen) < wanted:  # only groups too large for what is left: cut one, as before
                chosen += [block for block in order if block in free and block not in chosen][: wanted - len(chosen)]
                warn_once(log, "class %r: its session blocks are joined by duplicates (re-captured fields, copies) into groups too large "
                          "to hold out whole; blocks of a group were split, and their re-captures left out", name)  # fmt: skip
            free -= set(chosen)
            split[rows.index[rows["block_index"].isin(chosen)]] = part
    return split


def _draw_whole_units(order: list[int], free: set[int], wanted: int, unit: Callable[[int], list[int]]) -> list[int]:
    """Blocks for one part, in the drawn ``order``: each free block brings its whole unit, if the unit fits in
    the ``wanted`` count and is still free; a unit that does not fit is passed over for the next one."""
    chosen: list[int] = []
    for block in order:
        members = unit(block)
        if block in free and block not in chosen and set(members) <= free and len(chosen) + len(members) <= wanted:
            chosen += members
        if len(chosen) == wanted:
            break
    return chosen


def _stratified_group_fold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, advice: str) -> np.ndarray:
    """Fold number of each row from sklearn's StratifiedGroupKFold (shuffled with ``seed``); ``advice`` says
    what helps when the groups are too few for the folds."""
    folds = np.full(len(labels), -1)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():  # "the least populated class ... n_splits=7": the parts' own warning says it plainly
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
                folds[held] = k
    except ValueError as error:  # sklearn's words for "a class has fewer groups than folds"
        raise TooFewToSplit(f"cannot cut {n_splits} stratified folds from these images ({error})", advice) from None
    return folds


def _kfold_advice(blocked: pd.DataFrame) -> str:
    """What gives kfold more groups: smaller blocks, unless the sub-folders (kept whole) bound them."""
    folders = sub_folders(blocked)
    if folders.notna().any():
        return (f"the class folders' sub-folders ({folders.nunique()}, each kept whole in one block) bound the blocks: "
                "use fewer folds (--folds) or add images or sub-folders")  # fmt: skip
    return "use fewer folds (--folds), smaller session blocks (--block-size) or more images"


def _assign_random(blocked: pd.DataFrame, seed: int, val_fraction: float, test_fraction: float) -> pd.Series:
    """Stratified image-level split that keeps duplicate groups and sub-folders whole."""
    labels = blocked["label"].to_numpy()
    folders = sub_folders(blocked)
    groups = _joined_groups(blocked, [blocked["dup_group"], folders])
    # The fold counts follow the fractions (1/k each); whole sub-folders or duplicate groups may be too few.
    advice = (f"the sub-folders ({folders.nunique()}, each kept whole) are too few: " if folders.notna().any() else
              "") + "hold out larger shares (--test-fraction, --val-fraction) or add images"  # fmt: skip
    test = _stratified_group_fold(labels, groups, max(2, round(1 / test_fraction)), seed, advice) == 0
    rest = np.flatnonzero(~test)
    val_splits = max(2, round((1 - test_fraction) / val_fraction))
    val = np.zeros(len(labels), dtype=bool)
    val[rest[_stratified_group_fold(labels[rest], groups[rest], val_splits, seed + 1, advice) == 0]] = True
    # Whole folds of 1/k each: a fraction that is no such share is rounded to the nearest one (0.4 -> 1/2).
    shares = {"test": float(test.mean()), "validation": float(val.mean())}
    asked = {"test": test_fraction, "validation": val_fraction}
    off = [f"{part} {shares[part]:.2f} for {asked[part]:g}" for part in shares if abs(shares[part] - asked[part]) > 0.05]
    if off:
        warn_once(log, "the random split holds out whole folds (a share of 1/k), so it gives %s: choose fractions "
                  "such as 0.1, 0.125, 0.15, 0.2 or 0.25 for shares near them", ", ".join(off))  # fmt: skip
    return pd.Series(np.where(test, "test", np.where(val, "val", "train")), index=blocked.index, dtype=object)


def _block_and_duplicate_groups(blocked: pd.DataFrame) -> np.ndarray:
    """Group ids joining rows that share a session block or a duplicate group (so neither is cut)."""
    return _joined_groups(blocked, [blocked["block"], blocked["dup_group"]])


def _joined_groups(table: pd.DataFrame, keys: Sequence[pd.Series]) -> np.ndarray:
    """Group ids joining rows that share a value of any of ``keys`` (NaN joins nothing), numbered by their
    first row in the index's order."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(table)
    # Bipartite graph: row nodes 0..n-1, then one node per value of each key.
    rows, cols, size = [], [], n
    for key in keys:
        codes = pd.factorize(key)[0]
        missing = codes < 0  # no value recorded (NaN): a node of its own, not code -1 for all
        codes[missing] = codes.max(initial=-1) + 1 + np.arange(int(missing.sum()))
        rows.append(np.arange(n))
        cols.append(size + codes)
        size += int(codes.max(initial=-1)) + 1
    graph = coo_matrix((np.ones(n * len(keys), dtype=np.int8), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(size, size))  # fmt: skip
    components = connected_components(graph, directed=False)[1][:n]
    # Number the groups by their first row in the index's order, not the table's: scipy numbers them as it
    # meets them, and the folds (drawn over group ids) would change with the rows' order. The index writes
    # its manifest in this order, where both numberings agree.
    order = np.empty(n, dtype=np.int64)
    order[table.reset_index(drop=True).sort_values(MANIFEST_ORDER, kind="stable").index] = np.arange(n)
    first = np.full(components.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, components, order)
    return np.argsort(np.argsort(first))[components]


def bootstrap_blocks(split: pd.DataFrame, rows: np.ndarray, stratified: bool = True) -> np.ndarray:
    """The session block of each of ``rows`` as a bootstrap over the split's blocks must resample it.

    Blocks of one class that a duplicate group joins (a field re-captured in another session, so one
    slide) are named as one unit, e.g. ``Benign:05+Benign:06``, as the split draws them
    (:func:`_block_and_duplicate_groups`, over the whole table): resampled apart, two pieces of one slide
    would count as independent and narrow the interval. For a bootstrap ``stratified`` by class (the
    balanced-accuracy interval's), except where joining would leave a class of several blocks with a single
    unit: that bootstrap resamples such a class by image (it has no spread between units), narrower still
    than resampling its blocks apart, so they stay apart. The name lists the blocks among ``rows`` only;
    :func:`bloodcell.evaluate.metrics.joins_blocks` tells a joined name.
    """
    blocks = split["block"].to_numpy()
    if "dup_group" not in split or len(split) == 0 or (blocks == "").any():
        return blocks[rows]
    chosen = pd.DataFrame({"block": blocks[rows], "group": _block_and_duplicate_groups(split)[rows],
                           "label": split["label"].to_numpy()[rows]})  # fmt: skip
    joined = chosen.groupby(["label", "group"])["block"].transform(lambda names: "+".join(sorted(set(map(str, names)))))
    if not stratified:
        return joined.to_numpy()
    units, separate = joined.groupby(chosen["label"]).nunique(), chosen.groupby("label")["block"].nunique()
    apart = chosen["label"].map((units < 2) & (separate >= 2)).to_numpy(dtype=bool)
    return np.where(apart, chosen["block"].to_numpy(), joined.to_numpy())


def keep_duplicate_groups_together(split: pd.DataFrame) -> pd.DataFrame:
    """Leave every duplicate group in one used part: the most protected part it touches (test, then val).

    Its members in the other parts are left out (``embargo``) rather than moved in: a member moved into a
    held-out part would bring a piece of a training block with it (a session seen in training) and, with
    the embargo then laid around it, cost up to twice the embargo in training images besides.

    Parameters
    ----------
    split: rows with ``dup_group`` and ``split``.

    Returns a copy; embargo rows stay embargo (they are used by nothing).
    """
    result = split.copy()
    used = result[result["split"].isin(USED_PARTS)]
    parts_per_group = used.groupby("dup_group")["split"].agg(set)
    for group, parts in parts_per_group[parts_per_group.map(len) > 1].items():
        keep = next(part for part in _PROTECTION_ORDER if part in parts)
        members = used.index[(used["dup_group"] == group) & (used["split"] != keep)]
        result.loc[members, "split"] = "embargo"
    return result


def apply_embargo(split: pd.DataFrame, embargo: int) -> pd.DataFrame:
    """Mark training rows within ``embargo`` capture-order positions of a held-out row as ``embargo``.

    Parameters
    ----------
    split: rows with ``label``, ``position`` (capture order within the class), ``block`` and ``split``.
    embargo: images to leave out on each side of every held-out (val or test) image run; capped for each
        class at half its smallest block (see :func:`effective_embargo`), with a warning naming the class.

    Returns a copy with those rows' ``split`` set to ``"embargo"``.
    """
    result = split.copy()
    if embargo <= 0:
        return result
    capped = []
    # Capture order joins files of one sub-folder (a patient, a slide) only, and loose files among
    # themselves: another patient's images beside a held-out one are no neighbours of it.
    segments = _capture_segments(result)
    labels, parts, positions = result["label"].to_numpy(), result["split"].to_numpy(), result["position"].to_numpy()
    marked = parts.copy()
    for label in np.unique(labels):
        in_class = labels == label
        held_out, train = in_class & np.isin(parts, ("val", "test")), in_class & (parts == "train")
        if not held_out.any() or not train.any():
            continue
        rows = result[in_class]
        own = effective_embargo(embargo, rows)
        if own < embargo and (segments[in_class] == "").any():  # of sub-folders only, it acts on nothing
            capped.append(f"{rows['class'].iloc[0] if 'class' in rows else label} {own}")
        for segment in np.unique(segments[train]):
            held = np.sort(positions[held_out & (segments == segment)])
            members = np.flatnonzero(train & (segments == segment))
            if len(held):
                marked[members[_distance_to_nearest(positions[members], held) <= own]] = "embargo"
    result["split"] = marked
    if capped:
        warn_once(log, "the embargo beside held-out blocks is less than %d images where a class's blocks are small "
                  "(half its smallest block): %s", embargo, ", ".join(capped))  # fmt: skip
    return result


def capture_neighbours(split: pd.DataFrame, marked: np.ndarray, distance: int) -> np.ndarray:
    """Rows within ``distance`` capture-order positions of a ``marked`` row of their class (the marked rows
    excluded): the same sessions, as the embargo reckons them (capped per class as it is, when the rows
    carry their ``block``). ``split`` holds manifest rows (``path``, ``label``, ``capture``, ``copy``);
    ``marked`` is a boolean array over them. A class whose file names carry no capture order (most without a
    number, or each a series of its own: hash-like names) has no neighbours: its order says nothing. As for
    the embargo, neighbours lie in one sub-folder of the class folder (or are both loose files): another
    patient's images are none."""
    near = np.zeros(len(split), dtype=bool)
    if distance <= 0 or not marked.any():
        return near
    ordered = _capture_order(split.reset_index(drop=True).assign(_marked=marked))
    segments = _capture_segments(ordered)
    for _, rows in ordered.groupby("label", sort=False):
        if not _in_capture_order(rows):
            continue
        own = effective_embargo(distance, rows) if "block" in rows else distance
        at = ordered.index.get_indexer(rows.index)
        for segment in np.unique(segments[at]):
            inside = segments[at] == segment
            positions = np.flatnonzero(inside)  # capture-order positions within the class
            seen = positions[rows["_marked"].to_numpy()[inside]]
            if len(seen):
                gap = _distance_to_nearest(positions, seen)
                near[rows.index[positions[(gap <= own) & (gap > 0)]]] = True
    return near


def _distance_to_nearest(positions: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Each position's distance to the nearest of the sorted, non-empty ``anchors`` (capture-order steps)."""
    after = np.clip(np.searchsorted(anchors, positions), 0, len(anchors) - 1)
    before = np.clip(after - 1, 0, len(anchors) - 1)
    return np.minimum(np.abs(anchors[after] - positions), np.abs(anchors[before] - positions))


def _in_capture_order(rows: pd.DataFrame) -> bool:
    """Whether one class's file names give a capture order: most carry a number, in series of more than
    one file (the index warns when they do not)."""
    series = rows["path"].map(lambda path: capture_series(str(path)))
    alone = int((series.map(series.value_counts()) == 1).sum())
    return bool((rows["capture"] >= 0).mean() > 0.5 and alone <= len(rows) / 2)


def effective_embargo(embargo: int, rows: pd.DataFrame) -> int:
    """The embargo applied to one class's rows: at most half its smallest block, so a class of few images
    keeps training rows. Per class, not over the dataset: one class of 3 images would otherwise take every
    other class's embargo down to nothing. Where the class has blocks mostly of loose files, only those
    count: the embargo acts among loose files alone (a small patient's sub-folder, or a stray loose file in
    a sub-folder's block, is no reason to shrink it)."""
    loose = sub_folders(rows).isna().to_numpy() if "path" in rows else np.ones(len(rows), dtype=bool)
    blocks = pd.DataFrame({"block": rows["block"].to_numpy(), "loose": loose}).groupby("block")["loose"]
    sizes, loose_sizes = blocks.size(), blocks.sum()
    mostly_loose = loose_sizes[loose_sizes * 2 > sizes]
    smallest_block = int(mostly_loose.min() if len(mostly_loose) else sizes.min())
    return min(embargo, smallest_block // 2)


def make_split(
    manifest: pd.DataFrame,
    protocol: str = "session",
    seed: int = 0,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    block_size: int = 40,
    embargo: int = 12,
    folds: int = 5,
    fold: int = 0,
    check: bool = True,
) -> pd.DataFrame:
    """Split a manifest's accepted rows into train / val / test (and embargo) by a named protocol.

    Parameters
    ----------
    manifest: a manifest (see :mod:`bloodcell.data.index`); rejected rows are dropped.
    protocol: ``session``, ``random`` or ``kfold`` (see the module docstring).
    seed: the split is a pure function of the manifest and these arguments.
    val_fraction, test_fraction: share of each class's blocks (session) or images (random) held out.
    block_size: images per session block.
    embargo: images left out of training on each side of every held-out run (session and kfold); capped
        for each class at half its smallest block (see :func:`effective_embargo`).
    folds, fold: number of folds and which one is validation (kfold).
    check: run :func:`check_leakage` on the result (the CLI turns it off to report the verdict itself).

    Returns the accepted rows in manifest order with ``block``, ``split`` (``train|val|test|embargo``)
    and, for kfold, ``fold``. Raises :class:`UserError` for an unknown protocol or too few images, and
    :class:`LeakageError` if the result fails :func:`check_leakage`.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown split protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "kfold" and not 0 <= fold < folds:
        raise UserError(f"fold {fold} is out of range for {folds} folds (0..{folds - 1})")
    for part, option, fraction in (("validation", "val", val_fraction), ("test", "test", test_fraction)):
        if not 0 < fraction < 0.5:
            raise UserError(f"the {part} fraction (--{option}-fraction, data.{option}_fraction) must be more than "
                            f"0 and less than 0.5, got {fraction}")  # fmt: skip
    if seed < 0:
        raise UserError(f"the split seed (--seed, data.split_seed) must be 0 or more, got {seed}")
    accepted = manifest[~manifest["rejected"].astype(bool)].reset_index(drop=True)
    if accepted.empty:
        raise UserError("the manifest has no accepted images to split")
    min_blocks = math.ceil(1 / min(val_fraction, test_fraction))
    blocked = session_blocks(accepted, block_size, min_blocks if protocol == "session" else folds)
    if protocol == "session":
        blocked["split"] = _assign_session(blocked, seed, val_fraction, test_fraction)
        _warn_of_uneven_shares(blocked, {"test": test_fraction, "val": val_fraction})
    elif protocol == "random":
        blocked["split"] = _assign_random(blocked, seed, val_fraction, test_fraction)
    else:
        groups = _block_and_duplicate_groups(blocked)
        if len(np.unique(groups)) < folds:
            raise TooFewToSplit(f"only {len(np.unique(groups))} session blocks: too few for {folds} folds", _kfold_advice(blocked))
        blocked["fold"] = _stratified_group_fold(blocked["label"].to_numpy(), groups, folds, seed, _kfold_advice(blocked))
        blocked["split"] = np.where(blocked["fold"] == fold, "val", "train")
    _warn_of_duplicates_across_sub_folders(blocked)
    blocked = keep_duplicate_groups_together(blocked)
    if protocol != "random":  # an image-level random split is leaky by design; no embargo pretends otherwise
        blocked = apply_embargo(blocked, embargo)
    result = blocked.drop(columns=["block_index", "position"])
    _warn_of_empty_parts(result, ("train", "val") if protocol == "kfold" else ("train", "val", "test"))
    if check:
        check_leakage(result)
    return result


def unsplit(manifest: pd.DataFrame, block_size: int = 40) -> pd.DataFrame:
    """Every accepted row of ``manifest`` as one held-out part (``split`` is ``test``) in its session blocks:
    for scoring every image of data too few to split (another lab's two patients a class), where the blocks
    still give the bootstrap its units. No training part, so no shortcut baseline is fitted on them."""
    accepted = manifest[~manifest["rejected"].astype(bool)].reset_index(drop=True)
    if accepted.empty:
        raise UserError("the manifest has no accepted images to split")
    blocked = session_blocks(accepted, block_size)
    blocked["split"] = "test"
    return blocked.drop(columns=["block_index", "position"])


def _warn_of_uneven_shares(blocked: pd.DataFrame, asked: dict[str, float]) -> None:
    """Name the classes whose held-out parts hold under half or over twice the share of images asked for: the
    session split draws whole blocks, and blocks of whole sub-folders (patients of 100 and of 5 images) can
    make a test part of 2 % where 15 % was asked, without a word."""
    if not sub_folders(blocked).notna().any():  # blocks of loose files are of one size, give or take one
        return
    off = []
    for name, rows in blocked.groupby("class", sort=False):
        for part, fraction in asked.items():
            share = float((rows["split"] == part).mean())
            if not fraction / 2 <= share <= 2 * fraction:
                off.append(f"{name} {part} {share:.0%} of {len(rows)} images")
    if off:
        warn_once(log, "whole sub-folders make held-out parts far from the shares asked for (test %.0f%%, val %.0f%%): "
                  "%s; another --seed draws other sub-folders", 100 * asked["test"], 100 * asked["val"], "; ".join(off))  # fmt: skip


def _warn_of_duplicates_across_sub_folders(rows: pd.DataFrame, shown: int = 3) -> None:
    """Name the duplicate groups whose images lie in two sub-folders of one class (a copy filed under two
    patients?): the split keeps them in one part, and with them both sub-folders whole, silently joining two
    patients that then may be too large to hold out."""
    folders = sub_folders(rows)
    keyed = rows.assign(_folder=folders)[folders.notna()]
    # within one class: a duplicate across classes is the index's warning (a labelling error), and each class
    # is split on its own
    spans = keyed.groupby(["class", "dup_group"])["_folder"].agg(lambda names: sorted(set(names)))
    spans = spans[spans.map(len) > 1]
    if len(spans):
        examples = "; ".join(" and ".join(f"{name}/" for name in names) for names in spans.iloc[:shown])
        warn_once(log, "%d duplicate group(s) hold images of two sub-folders (a copy filed under two patients or "
                  "slides?): %s; each such pair of sub-folders is kept in one part, together (bloodcell audit "
                  "lists the groups)", len(spans), examples)  # fmt: skip


def _warn_of_empty_parts(split: pd.DataFrame, parts: tuple[str, ...]) -> None:
    """Name the classes left with no image in a part: a duplicate group or the embargo can empty a small
    class's part, and its recall there (and the balanced accuracy over classes) is then undefined."""
    for part in parts:
        present = set(split.loc[split["split"] == part, "class"])
        empty = [name for name in dict.fromkeys(split["class"]) if name not in present]
        if empty:
            warn_once(log, "the %s part holds no image of %s: %s", part, ", ".join(empty),
                      "; ".join(_why_a_part_is_empty(split[split["class"] == name], name) for name in empty))  # fmt: skip


def _why_a_part_is_empty(rows: pd.DataFrame, name: str) -> str:
    """The likely cause, in words: a duplicate group that holds most of the class, or too few images."""
    largest = int(rows.groupby("dup_group").size().max()) if "dup_group" in rows and len(rows) else 0
    if largest > 1 and largest > len(rows) / 2:  # a group lies in one part, and takes the class's images there with it
        return (f"{largest} of its {len(rows)} images are one duplicate group (near-identical images: a blank field, "
                "an eyepiece's surround?), which stays in one part")  # fmt: skip
    return f"too few images or blocks in {name} for this split"


def warn_of_classes_without_images(manifest: pd.DataFrame, classes: Sequence[str]) -> None:
    """Name the classes with no accepted image (an empty folder, or every file rejected): they are in no
    part of any split, and training refuses them; without a word the split's table showed them as zeros."""
    accepted = set(manifest.loc[~manifest["rejected"].astype(bool), "class"])
    rejected = manifest.loc[manifest["rejected"].astype(bool), "class"].value_counts()
    for name in (name for name in classes if name not in accepted):
        why = f"all {rejected[name]} of its files were rejected" if name in rejected else "its folder holds no files"
        log.warning("class %s has no usable image (%s; bloodcell index lists the reasons): it is in no part, and "
                    "train refuses it", name, why)  # fmt: skip


def check_leakage(split: pd.DataFrame, max_examples: int = 5) -> None:
    """Fail loudly if any file, exact duplicate, near duplicate or sub-folder of a class folder (a patient or
    a slide, :func:`sub_folders`) is in two used parts.

    Parameters
    ----------
    split: a split table (``path``, ``sha256``, ``dup_group``, ``split``).
    max_examples: how many offending groups to name in the message.

    Returns nothing; raises :class:`LeakageError` naming the offending files.
    """
    missing = [column for column in ("path", "sha256", "dup_group", "split") if column not in split]
    if missing:  # a table that cannot be checked must not pass as one that was
        raise LeakageError(f"cannot check the split for leakage: it lacks the column(s) {', '.join(missing)}")
    used = split[split["split"].isin(USED_PARTS)]
    problems: list[str] = []
    repeated = used["path"][used["path"].duplicated()]
    problems += [f"{path} appears twice" for path in repeated[:max_examples]]
    for column, what in (
        ("sha256", "identical files"),
        ("exact_group", "identical files"),
        ("dup_group", "near duplicates"),
    ):
        if column not in used:  # exact_group: older split tables lack it; sha256 checks the same
            continue
        parts = used.groupby(column)["split"].nunique()
        for key in parts[parts > 1].index[:max_examples]:
            rows = used[used[column] == key]
            where = ", ".join(f"{r.path} ({r.split})" for r in rows.itertuples())
            problems.append(f"{what} in two parts: {where}")
    folder_parts = used.groupby(sub_folders(used))["split"].agg(lambda parts: sorted(set(parts)))
    for folder, parts in folder_parts[folder_parts.map(len) > 1].head(max_examples).items():
        problems.append(f"sub-folder {folder}/ in {' and '.join(parts)}")
    if problems:
        raise LeakageError(f"split leaks: {len(problems)} problem(s): " + "; ".join(problems[:max_examples]))


#: The split settings a saved split's file name leaves out at their defaults (``DataConfig``'s).
_DEFAULT_SETTINGS = {
    key: DataConfig.model_fields[key].default for key in ("val_fraction", "test_fraction", "block_size", "embargo", "folds")
}


def split_file_name(protocol: str, seed: int, fold: int | None = None, **settings: Any) -> str:
    """File name of a saved split, e.g. ``session-seed0-rules4.csv`` or ``kfold-seed0-fold2-rules4.csv``.

    Settings that differ from the defaults (``val_fraction``, ``test_fraction``, ``block_size``, ``embargo``,
    ``folds``, ``class_names``) add a short hash of them, and :data:`SPLIT_RULES` is in every name, so
    neither a split of other settings nor one cut by newer rules replaces this one: a model's
    ``metrics.json`` names the file, which must still hold the split it was scored on.
    """
    changed = {k: v for k, v in sorted(settings.items()) if v is not None and _DEFAULT_SETTINGS.get(k) != v}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""
    return (f"{protocol}-seed{seed}" + (f"-fold{fold}" if fold is not None else "") + (f"-{digest}" if digest else "")
            + f"-rules{SPLIT_RULES}.csv")  # fmt: skip


def save_split(split: pd.DataFrame, path: str | Path) -> Path:
    """Write a split table as CSV, atomically (left alone when it holds this split already); returns the path."""
    return write_text_if_changed(path, split_csv(split))


def split_csv(split: pd.DataFrame) -> str:
    """A split table as the CSV text :func:`save_split` writes."""
    return split.to_csv(index=False, lineterminator="\n")


def split_counts(split: pd.DataFrame, classes: list[str] | tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Images per part and class: ``{part: {class: n, ..., "total": n}}`` for every part in :data:`PARTS`."""
    table = pd.crosstab(split["split"], split["class"])
    counts = {}
    for part in PARTS:
        row = {
            name: int(table.at[part, name]) if part in table.index and name in table.columns else 0
            for name in classes
        }
        counts[part] = {**row, "total": sum(row.values())}
    return counts


def split_summary(
    split: pd.DataFrame, protocol: str, seed: int, classes: list[str] | tuple[str, ...], path: Path | None
) -> dict[str, Any]:
    """The ``bloodcell split --json`` object.

    Keys: ``protocol``, ``seed``, ``counts`` (``{part: {class: n, "total": n}}`` for train, val, test,
    embargo), ``blocks`` (session blocks per part), ``leakage_check`` (``"passed"`` or ``"failed"``),
    ``leakage_message`` (empty when passed), ``capture_gaps`` (see :func:`capture_gaps`), ``split`` (path
    of the CSV, or null), ``split_rules`` (:data:`SPLIT_RULES`) and ``split_sha256`` (of the table as
    :func:`save_split` writes it: what a later reader compares the named file with).
    """
    try:
        check_leakage(split)
        verdict, message = "passed", ""
    except LeakageError as error:
        verdict, message = "failed", str(error)
    blocks = {part: int(split.loc[split["split"] == part, "block"].nunique()) for part in PARTS}
    return {
        "protocol": protocol,
        "seed": seed,
        "counts": split_counts(split, classes),
        "blocks": blocks,
        "leakage_check": verdict,
        "leakage_message": message,
        "capture_gaps": capture_gaps(split),
        "split": str(path) if path is not None else None,
        "split_rules": SPLIT_RULES,
        "split_sha256": hashlib.sha256(split_csv(split).encode()).hexdigest(),
    }


def capture_gaps(split: pd.DataFrame) -> dict[str, int | None]:
    """Per class, the fewest capture-order steps between a training image and a held-out (val/test) one
    within one sub-folder of its class folder, or among its loose files (another patient's images are no
    neighbours, as for the embargo): 1 means neighbours, as in a random split (the leakage check looks at
    duplicates, not at this); None when no training image shares a sub-folder (or looseness) with a held-out
    one. The embargo of a session split makes it larger."""
    gaps: dict[str, int | None] = {}
    ordered = _capture_order(split)
    segments = _capture_segments(ordered)
    for name, rows in ordered.groupby("class", sort=False):
        at, parts = ordered.index.get_indexer(rows.index), rows["split"].to_numpy()
        found = [_fewest_steps(parts, segments[at] == segment) for segment in np.unique(segments[at])]
        steps = [gap for gap in found if gap is not None]
        gaps[str(name)] = min(steps) if steps else None
    return gaps


def _fewest_steps(parts: np.ndarray, inside: np.ndarray) -> int | None:
    """The fewest capture-order steps (positions in the class) between a ``train`` and a ``val``/``test``
    entry of ``parts`` among those ``inside`` one segment."""
    position = np.arange(len(parts))
    trained = position[inside & (parts == "train")]
    held = position[inside & np.isin(parts, ["val", "test"])]
    return int(_distance_to_nearest(held, trained).min()) if len(trained) and len(held) else None
