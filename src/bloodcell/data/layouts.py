"""Known dataset layouts: find the class folders and image files under a root path.

Three layouts are recognised, tried in this order:

``aria``
    ``ROOT/Original/{Benign,Early,Pre,Pro}`` and optionally ``ROOT/Segmented/...`` (the Kaggle "Leukemia"
    dataset of Aria et al.). ``variant`` picks Original or Segmented. ``ROOT`` may also be the variant
    folder itself, or a folder holding nothing but ``ROOT`` (the archive unpacked into a folder of its own).
``kaggle``
    The "Blood Cell Cancer [ALL] 4 class" copy: ``Benign``, ``[Malignant] early Pre-B``, ``[Malignant]
    Pre-B``, ``[Malignant] Pro-B``, directly under ``ROOT`` or under one wrapping folder such as ``Blood
    cell Cancer [ALL]``.
``folders``
    Any class-per-folder layout. With ``class_names`` the folders are matched to those names (loosely)
    and the classes keep the given order; without, folder names that are aliases of the canonical
    classes map onto them, and otherwise every sub-folder is a class (sorted by name).

Folder names are matched case- and punctuation-insensitively, so ``[Malignant] early Pre-B``,
``early pre b`` and ``Early`` all mean the canonical class ``Early Pre-B``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from bloodcell import CLASSES
from bloodcell.data.decode import IMAGE_SUFFIXES
from bloodcell.errors import UserError
from bloodcell.io import printable_path
from bloodcell.notices import warn_once

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("Original", "Segmented")

#: Normalised folder name -> canonical class. Covers Aria, the Kaggle 4-class copy and common spellings.
CLASS_ALIASES: dict[str, str] = {
    "benign": "Benign",
    "hematogone": "Benign",
    "hematogones": "Benign",
    "early": "Early Pre-B",
    "earlypreb": "Early Pre-B",
    "malignantearly": "Early Pre-B",
    "malignantearlypreb": "Early Pre-B",
    "pre": "Pre-B",
    "preb": "Pre-B",
    "malignantpre": "Pre-B",
    "malignantpreb": "Pre-B",
    "pro": "Pro-B",
    "prob": "Pro-B",
    "malignantpro": "Pro-B",
    "malignantprob": "Pro-B",
}

#: File names that operating systems drop into folders; never indexed.
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "icon\r"})
#: Folders an archiver or the OS adds beside the data (macOS's zip resource forks): never a class, never a
#: wrapper. Beside a wrapper folder, __MACOSX made the dataset look like a folder of two classes.
_JUNK_FOLDERS = frozenset({"__macosx"})


@dataclass(frozen=True)
class Dataset:
    """A dataset found on disk.

    Attributes
    ----------
    root: the folder holding the class folders (for Aria, ``TOP/Original`` or ``TOP/Segmented``).
    top: the folder the user named, normalised (for Aria, the folder holding ``Original``/``Segmented``).
    layout: ``aria``, ``kaggle`` or ``folders``.
    variant: ``Original`` or ``Segmented`` (always ``Original`` outside the Aria layout).
    classes: class names in model order (canonical order when the classes are the canonical ones).
    class_folders: class name -> folder name under ``root``.
    files: ``(relative POSIX path under root, class name)`` pairs, sorted by class order then path.
    """

    root: Path
    top: Path
    layout: str
    variant: str
    classes: tuple[str, ...]
    class_folders: dict[str, str]
    files: tuple[tuple[str, str], ...]


def normalise_name(name: str) -> str:
    """Lower-case a folder name and drop everything but letters and digits (``[Malignant] Pre-B`` -> ``malignantpreb``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_class(folder_name: str) -> str | None:
    """The canonical class a folder name stands for, or ``None`` if it is not a known alias."""
    return CLASS_ALIASES.get(normalise_name(folder_name))


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in _JUNK_FOLDERS)  # fmt: skip


def _canonical_folders(path: Path) -> dict[str, str]:
    """Canonical class -> folder name for the sub-folders of ``path`` that are known class aliases."""
    found: dict[str, str] = {}
    for folder in _subfolders(path):
        name = canonical_class(folder.name)
        if name is not None:
            if name in found:
                raise UserError(
                    f"{path}: folders {found[name]!r} and {folder.name!r} both mean class {name!r}"
                )
            found[name] = folder.name
    return found


def _class_files(root: Path, folder: str) -> list[str]:
    """Relative POSIX paths of every candidate file under a class folder (recursively, hidden files skipped)."""
    base = root / folder
    paths = []
    for path in base.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.name.lower() in _JUNK_FILES:
            continue
        if path.is_dir() and path.is_symlink():
            # Not followed (a link to a parent would loop, and another class's folder would file its images
            # twice), but said: the images there are not in the index.
            warn_once(log, "not followed: %s is a link to a folder (%s); link or copy the files themselves to "
                      "include them", path, path.resolve())  # fmt: skip
            continue
        if not (path.is_file() or (path.is_symlink() and not path.exists())):  # a broken link is reported
            continue
        if "\r" in relative.as_posix():
            # A carriage return survives no CSV round trip (the hash cache, the manifest): it would break every
            # later command. macOS's "Icon\r" is junk and skipped above; any other such name is said.
            log.warning("skipped %s: its name holds a carriage return (rename the file to use it)", ascii(str(path)))
            continue
        if printable_path(relative) != relative.as_posix():
            # The manifest, caches and reports are UTF-8 text; such a name would stop the whole run there.
            log.warning("skipped %s: its name is not valid UTF-8 (rename the file to use it)", ascii(str(path)))
            continue
        paths.append(relative.as_posix())
    return sorted(paths)


def _is_a_data_file(path: Path) -> bool:
    """Whether ``path`` is a file someone put there: not a folder, a hidden file or one the OS drops in."""
    return path.is_file() and not path.name.startswith(".") and path.name.lower() not in _JUNK_FILES


def is_image_name(path: str | Path) -> bool:
    """Whether a file name has one of the accepted image suffixes (JPEG, PNG, BMP, TIFF) and is not hidden
    (macOS's ``._name.jpg`` resource forks end in .jpg too; hidden files are never read)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def _is_aria_variant(folder: Path) -> bool:
    """Whether ``folder`` (named Original or Segmented) holds Aria class folders: at least one, and every
    sub-folder holding images is one (a folder of a single class is still the Aria layout)."""
    known = set(_canonical_folders(folder).values())
    with_images = {f.name for f in _subfolders(folder) if any(is_image_name(p) for p in f.rglob("*"))}
    return len(known) >= 2 or (len(known) == 1 and with_images <= known)


def _only_subfolder(root: Path) -> list[Path]:
    """``root``'s sub-folder when it is the only one (a wrapper an archive unpacks into), else nothing."""
    folders = _subfolders(root)
    return folders if len(folders) == 1 else []


def _holds_aria_variant(folder: Path) -> bool:
    return any((folder / v).is_dir() and _is_aria_variant(folder / v) for v in VARIANTS)


def _aria_top(root: Path) -> Path | None:
    """The Aria top folder for ``root``: ``root`` itself, its parent when ``root`` is a variant folder, or
    the one folder inside ``root`` (an archive unpacked into a folder of its own) when that is the top."""
    if root.name in VARIANTS and _is_aria_variant(root):
        return root.parent
    for candidate in [root, *_only_subfolder(root)]:
        if _holds_aria_variant(candidate):
            return candidate
    return None


def _is_whole_dataset(folder: Path) -> bool:
    """Whether ``folder`` (or the one folder in it) holds a whole dataset: Aria's layout, or the Kaggle copy's
    with its Benign folder."""
    kaggle = _kaggle_root(folder)
    return _aria_top(folder) is not None or (kaggle is not None and "Benign" in _canonical_folders(kaggle))


def _kaggle_root(root: Path) -> Path | None:
    """The folder holding the Kaggle class folders (``[Malignant] ...``), if ``root`` has that layout."""
    for candidate in [root, *_only_subfolder(root)]:
        folders = [p.name for p in _subfolders(candidate)]
        if any(normalise_name(name).startswith("malignant") for name in folders) and _canonical_folders(
            candidate
        ):
            return candidate
    return None


def _match_user_classes(root: Path, class_names: list[str]) -> dict[str, str]:
    """Match user class names to sub-folders of ``root`` loosely; every name must find exactly one folder."""
    by_key: dict[str, list[str]] = {}
    for folder in _subfolders(root):
        by_key.setdefault(normalise_name(folder.name), []).append(folder.name)
        alias = canonical_class(folder.name)
        if alias is not None and normalise_name(alias) != normalise_name(folder.name):
            by_key.setdefault(normalise_name(alias), []).append(folder.name)
    mapping: dict[str, str] = {}
    for name in class_names:
        if name in mapping or _matches_folder_of(mapping, by_key.get(normalise_name(name), [])):
            raise UserError(f"class {name!r} is named twice in --classes ({', '.join(class_names)})")
        matches = by_key.get(normalise_name(name), [])
        if len(matches) != 1:
            available = ", ".join(p.name for p in _subfolders(root)) or "none"
            what = "no folder" if not matches else f"several folders ({', '.join(matches)})"
            raise UserError(f"class {name!r}: {what} under {root} matches it; folders there: {available}")
        mapping[name] = matches[0]
    return mapping


def _matches_folder_of(mapping: dict[str, str], folders: list[str]) -> bool:
    """Whether the one folder a class name matches is already another name's (two names for one class)."""
    return len(folders) == 1 and folders[0] in mapping.values()


#: Suffixes of image formats bloodcell does not read. A folder holding only such files is no class folder,
#: so without a word a class exported as WebP or HEIC would be left out of the model.
UNREAD_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".webp", ".gif", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl", ".svs", ".ndpi", ".czi", ".dcm"}
)


def _warn_about_unused_images(root: Path, class_folders: dict[str, str]) -> None:
    """Name the images beside the class folders (loose files, or folders that are not classes), the folders
    of images in formats bloodcell does not read, and the folders holding no file at all, so that a forgotten
    class or a misplaced file is not left out without a word."""
    used = set(class_folders.values())
    unused, unread, empty = [], [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in used:
            continue
        files = [entry] if entry.is_file() else list(entry.rglob("*")) if entry.is_dir() else []
        name = entry.name + ("/" if entry.is_dir() else "")
        if any(map(is_image_name, files)):
            unused.append(name)
            continue
        if entry.is_dir() and entry.name.lower() not in _JUNK_FOLDERS and not any(map(_is_a_data_file, files)):
            empty.append(name)  # a class whose images were never copied in, most likely; notes/ holds files
            continue
        other = sorted(f.suffix.lower() for f in files if f.suffix.lower() in UNREAD_IMAGE_SUFFIXES)
        if other:
            unread.append(f"{name} ({len(other)} {'/'.join(sorted(set(other)))} file{'s' * (len(other) > 1)})")
    messages = [f"{root}: {', '.join(unused)} not used: images outside the class folders ({', '.join(sorted(used))})"
                ] if unused else []  # fmt: skip
    if unread:
        messages.append(f"{root}: {', '.join(unread)} not used: bloodcell reads JPEG, PNG, BMP and TIFF; convert "
                        "the images to one of them (a class folder holding none is no class)")  # fmt: skip
    if empty:
        messages.append(f"{root}: {', '.join(empty)} hold{'s' * (len(empty) == 1)} no images: not used as a class")
    for message in messages:  # a command indexes a dataset several times: said once, when not quieted
        warn_once(log, message)


def _build(root: Path, top: Path, layout: str, variant: str, class_folders: dict[str, str]) -> Dataset:
    files = tuple(
        (path, name) for name, folder in class_folders.items() for path in _class_files(root, folder)
    )
    if not files:
        raise UserError(
            f"no files found in the class folders under {root} ({', '.join(class_folders.values())})"
        )
    _warn_about_unused_images(root, class_folders)
    return Dataset(root, top, layout, variant, tuple(class_folders), dict(class_folders), files)


def _in_canonical_order(found: dict[str, str]) -> dict[str, str]:
    return {name: found[name] for name in CLASSES if name in found}


def find_dataset(
    root: str | Path, variant: str = "Original", class_names: list[str] | None = None
) -> Dataset:
    """Find the images under ``root`` in any known layout.

    Parameters
    ----------
    root: the dataset folder (for Aria, the folder holding ``Original``/``Segmented``, or one of them).
    variant: ``Original`` or ``Segmented`` (Aria layout only; other layouts accept only ``Original``).
    class_names: the classes in model order, matched to the class folders' names loosely (in any layout);
        ``None`` maps known aliases to the canonical classes, else takes every folder as a class.

    Returns the :class:`Dataset`. Raises :class:`UserError` for a missing path, an empty folder, or a
    folder with no recognisable classes.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"dataset folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"dataset path is not a folder: {path}")
    path = path.resolve()
    if not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise UserError(f"dataset folder is empty: {path}")

    aria_top = _aria_top(path)
    if aria_top is not None:
        if path == aria_top / path.name and path.name != variant:  # .../Segmented given, Original asked for
            warn_once(log, "%s is the %s variant's folder; the %s variant (the one asked for) of %s is used. For "
                      "the %s images, pass --variant %s", path, path.name, variant, aria_top, path.name, path.name)  # fmt: skip
        variant_root = aria_top / variant
        if not variant_root.is_dir():
            present = [v for v in VARIANTS if (aria_top / v).is_dir()]
            cased = [f.name for f in _subfolders(aria_top) if f.name.lower() == variant.lower()]
            rename = f" (rename {cased[0]}/ to {variant}/)" if cased else ""
            raise UserError(f"{aria_top} has no {variant!r} folder{rename}; use --variant {' or '.join(present)}")
        found = (
            _match_user_classes(variant_root, class_names)
            if class_names
            else _canonical_folders(variant_root)
        )
        order = found if class_names else _in_canonical_order(found)
        return _build(variant_root, aria_top, "aria", variant, order)

    if variant != "Original":
        raise UserError(
            f"--variant {variant} needs the Aria layout (Original/ and Segmented/ folders) under {path}"
        )

    kaggle_root = _kaggle_root(path)
    if kaggle_root is not None:
        classes = (
            _match_user_classes(kaggle_root, class_names)
            if class_names
            else _in_canonical_order(_canonical_folders(kaggle_root))
        )
        return _build(kaggle_root, path, "kaggle", variant, classes)

    folders = _subfolders(path)
    if not folders:
        raise UserError(f"no class folders under {path}: expected one sub-folder per class holding images")
    if class_names:
        return _build(path, path, "folders", variant, _match_user_classes(path, class_names))
    known = _canonical_folders(path)
    with_images = [f for f in folders if any(is_image_name(p) for p in f.rglob("*"))]
    # Every folder holding images is a known class alias: the canonical classes. A notes/ or docs/ folder
    # without images beside them changes nothing; a known class folder left empty stays a class (training
    # then says it has no images).
    if known and with_images and {f.name for f in with_images} <= set(known.values()):
        return _build(path, path, "folders", variant, _in_canonical_order(known))
    # A whole dataset beside other folders (a wrapper beside notes/) is no class; the Kaggle copy's malignant
    # folders without its Benign (ALL/{[Malignant] ...} beside Healthy/) are one class, ALL.
    nested = [f for f in with_images if _is_whole_dataset(f)]
    if nested:
        raise UserError(f"{nested[0]} holds a dataset of its own (Aria's or the Kaggle copy's layout), beside other "
                        f"folders under {path}: give {nested[0]} as the dataset folder")  # fmt: skip
    variant_of = {v.lower(): v for v in VARIANTS}
    misnamed = {f.name: variant_of[f.name.lower()] for f in with_images if f.name.lower() in variant_of}
    if misnamed:  # else a model would learn to tell the Original images from their Segmented copies
        renames = ", ".join(f"{name}/ to {right}/" for name, right in misnamed.items())
        looks = "looks like one of the Aria layout's variant folders" if len(misnamed) == 1 else \
            "look like the Aria layout's variant folders"
        raise UserError(f"{path}: {', '.join(misnamed)} {looks}, named in another case; rename {renames}")
    if len(with_images) < 2:
        wrapper = "".join(f"; if {f.name}/ holds the class folders, give {f} instead" for f in _only_subfolder(path))
        raise UserError(
            f"no recognisable classes under {path}: expected the Aria layout (Original/{{Benign,Early,Pre,Pro}}), "
            f"the Kaggle 4-class folders, or at least two class folders holding JPEG/PNG/BMP/TIFF images{wrapper}"
        )
    return _build(path, path, "folders", variant, {f.name: f.name for f in with_images})
