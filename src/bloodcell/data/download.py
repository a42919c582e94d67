"""Download the public dataset from Kaggle with ``kagglehub`` and find the folder to pass as ``--data``.

The download itself is kagglehub's: it asks Kaggle for the dataset's current version, downloads the
archive (resuming a broken download), unpacks it and marks it complete, so a second call costs one small
request and returns the cached copy. We choose the cache folder, keep kagglehub's progress messages off
stdout (which carries only our result), use the newest complete cached copy when Kaggle cannot be reached
(kagglehub would fail on its version request), remove a damaged download (kagglehub would resume and unpack
the same bad file on every later run), translate kagglehub's failures into one-line errors that say what to
do, and locate the dataset root inside the unpacked archive.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bloodcell.errors import UserError

if TYPE_CHECKING:
    from kagglehub.handle import DatasetHandle

log = logging.getLogger(__name__)

#: The Kaggle dataset of Aria et al. (Original/ and Segmented/ images of the four classes).
DEFAULT_DATASET = "mehradaria/leukemia"

#: kagglehub reads its cache folder from this variable on every call.
_KAGGLEHUB_CACHE_ENV = "KAGGLEHUB_CACHE"

_CREDENTIALS_HELP = (
    "create an API token at https://www.kaggle.com/settings and either save it as ~/.kaggle/kaggle.json, "
    "or set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN)"
)


def default_cache_dir() -> Path:
    """Where datasets go when no ``--cache`` is given: ``$KAGGLEHUB_CACHE`` if set, else ``$BLOODCELL_HOME/kaggle``."""
    if os.environ.get(_KAGGLEHUB_CACHE_ENV):
        return Path(os.environ[_KAGGLEHUB_CACHE_ENV]).expanduser()
    from bloodcell.io import bloodcell_home

    return bloodcell_home() / "kaggle"


@contextmanager
def _kagglehub_cache(cache: Path) -> Iterator[None]:
    """Point kagglehub's cache at ``cache`` for the duration of one call, then restore the environment."""
    previous = os.environ.get(_KAGGLEHUB_CACHE_ENV)
    os.environ[_KAGGLEHUB_CACHE_ENV] = str(cache)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_KAGGLEHUB_CACHE_ENV, None)
        else:
            os.environ[_KAGGLEHUB_CACHE_ENV] = previous


@contextmanager
def _kagglehub_logs_on_stderr() -> Iterator[None]:
    """Send kagglehub's console log ("Downloading to ...", "Extracting files...") to stderr for one call.

    kagglehub's logger writes to a StreamHandler it built on stdout (kagglehub/logger.py), and stdout must
    hold only our result (the path, or one JSON object) for ``--data "$(bloodcell data download)"``.
    ``redirect_stdout`` cannot help: the handler keeps the stream object it was given.
    """
    # Exactly the plain StreamHandler kagglehub builds: file handlers and other tools' handlers (pytest's log
    # capture, say) are subclasses, and their streams are not ours to move.
    consoles = [
        handler
        for handler in logging.getLogger("kagglehub").handlers
        if type(handler) is logging.StreamHandler
    ]
    previous = [handler.setStream(sys.stderr) for handler in consoles]
    try:
        yield
    finally:
        for handler, stream in zip(consoles, previous, strict=True):
            if stream is not None:  # setStream returns None when the stream was stderr already
                handler.setStream(stream)


def _is_damaged_archive(error: Exception) -> bool:
    """Whether kagglehub failed to unpack the archive it downloaded (truncated, corrupt, or not an archive)."""
    if isinstance(error, ValueError) and str(error) == "Unsupported archive type.":  # kagglehub's own
        return True
    return isinstance(error, (zipfile.BadZipFile, zlib.error, EOFError, tarfile.TarError))


def _parse_handle(dataset: str) -> DatasetHandle:
    """kagglehub's handle for ``dataset``, or a :class:`UserError` that says what is wrong with it."""
    from kagglehub.handle import parse_dataset_handle

    try:
        handle = parse_dataset_handle(dataset)
    except ValueError as error:
        raise UserError(f"bad Kaggle dataset handle {dataset!r}: {error} (expected owner/name)") from None
    if {handle.owner, handle.dataset} & {".", ".."}:  # kagglehub would write outside its datasets folder
        raise UserError(
            f"bad Kaggle dataset handle {dataset!r}: '.' and '..' are not names (expected owner/name)"
        )
    return handle


def _dataset_cache_folder(cache_dir: Path, handle: DatasetHandle) -> Path:
    """kagglehub's folder for the dataset in ``cache_dir``: ``<cache>/datasets/<owner>/<name>``."""
    return Path(cache_dir) / "datasets" / handle.owner / handle.dataset


#: kagglehub's folder of completion markers for files downloaded one by one (kagglehub.cache).
_FILE_MARKERS = ".complete"


def remove_unfinished_downloads(cache_dir: Path, dataset: str) -> list[Path]:
    """Delete what kagglehub left of downloads of ``dataset`` that never completed, and return the paths.

    kagglehub downloads version N to ``<folder>/<N>.archive``, unpacks it into ``<folder>/versions/<N>/``,
    deletes the archive and writes ``<folder>/<N>.complete``. An archive left behind (a failed unpack, an
    interrupted download) is resumed next time, and from a host that accepts ranges a complete but damaged
    one counts as "already complete" and is unpacked again; its own ``force_download`` clears only complete
    versions. So both the archives and the ``versions/<N>`` folders without their marker go. A handle
    naming a version touches only that version; complete copies are never touched, nor files another user
    of a shared cache downloaded one by one (``dataset_download(handle, path=...)``, marked in
    ``<folder>/.complete/<N>/``).
    """
    handle = _parse_handle(dataset)
    folder = _dataset_cache_folder(cache_dir, handle)
    pattern = "*" if handle.version is None else str(handle.version)
    archives = [path for path in folder.glob(f"{pattern}.archive") if path.is_file()]
    unpacked = [path for path in (folder / "versions").glob(pattern)
                if path.is_dir() and not (folder / f"{path.name}.complete").exists()
                and not (folder / _FILE_MARKERS / path.name).exists()]  # fmt: skip
    for archive in archives:
        archive.unlink()
    for partial in unpacked:
        if partial.is_symlink():  # never follow a link out of the cache
            partial.unlink()
        else:
            shutil.rmtree(partial)
    return archives + unpacked


def _damaged_download_error(error: Exception, dataset: str, removed: list[Path]) -> UserError:
    """Say that the archive could not be unpacked, and that a new run downloads it again (it is removed)."""
    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return UserError(
        f"the archive of {dataset!r} downloaded from Kaggle is damaged ({detail}); removed the damaged "
        f"download ({', '.join(map(str, removed))}), so a new run downloads it again"
    )


def _explain_failure(error: Exception, dataset: str) -> UserError:
    """Turn a kagglehub / requests failure into an error that says what to do."""
    import requests

    manual = (
        f"download it by hand from https://www.kaggle.com/datasets/{dataset} and pass its folder as --data"
    )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(
            f"Kaggle refused the download of {dataset!r} (HTTP {status}): {_CREDENTIALS_HELP}; or {manual}"
        )
    if status == 404:
        return UserError(f"Kaggle has no dataset {dataset!r} (HTTP 404); check the owner/name spelling")
    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return UserError(
            f"could not reach Kaggle to download {dataset!r} (no internet connection?): retry when online, or {manual}"
        )
    if (
        type(error).__name__ in {"CredentialError", "UnauthenticatedError"}
        or "credentials" in str(error).lower()
    ):
        return UserError(f"no usable Kaggle credentials ({error}): {_CREDENTIALS_HELP}")
    return UserError(f"downloading {dataset!r} from Kaggle failed: {error}; retry, or {manual}")


def find_data_root(folder: Path, max_depth: int = 3) -> Path:
    """The folder inside an unpacked download that ``find_dataset`` recognises (Aria or Kaggle layout).

    Archives sometimes wrap the dataset in one or two extra folders; we search breadth-first so the
    shallowest match wins. Falls back to ``folder`` itself when it holds images in another layout (class
    folders); raises :class:`UserError` when it holds no dataset at all.
    """
    from bloodcell.data.layouts import find_dataset

    level = [folder]
    for _ in range(max_depth + 1):
        for candidate in level:
            try:
                if find_dataset(candidate).layout in {"aria", "kaggle"}:
                    return candidate
            except UserError:
                pass
        level = [child for parent in level for child in sorted(parent.iterdir()) if child.is_dir()]
    try:
        find_dataset(folder)
    except UserError as error:
        raise UserError(f"the download in {folder} holds no dataset bloodcell can read ({error})") from None
    return folder


def download_dataset(
    dataset: str = DEFAULT_DATASET, cache: str | Path | None = None, force: bool = False
) -> Path:
    """Download a Kaggle dataset (cached) and return the folder to pass as ``--data``.

    Parameters
    ----------
    dataset: Kaggle handle ``owner/name`` (optionally ``owner/name/versions/N``).
    cache: folder for downloads; default :func:`default_cache_dir`. kagglehub keeps each version under
        ``<cache>/datasets/<owner>/<name>/versions/<N>/``.
    force: download again even when a complete copy is cached; any unfinished or damaged download of the
        dataset is removed first (see :func:`remove_unfinished_downloads`).

    Returns the dataset root inside the cache. Raises :class:`UserError` when Kaggle cannot be reached,
    refuses the credentials, or does not know the dataset, or when the downloaded archive cannot be
    unpacked (the damaged download is then removed, so that the next run downloads it again).
    """
    try:
        import kagglehub
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise UserError("the dataset download needs kagglehub: pip install kagglehub") from error

    _parse_handle(dataset)
    cache_dir = Path(cache).expanduser() if cache is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if force:
        for leftover in remove_unfinished_downloads(cache_dir, dataset):
            log.info("removed the unfinished download %s", leftover)
    with _kagglehub_cache(cache_dir.resolve()), _kagglehub_logs_on_stderr():
        try:
            path = kagglehub.dataset_download(dataset, force_download=force)
        except Exception as error:  # kagglehub raises whatever its transport or unpacking raised
            if _is_damaged_archive(error):
                removed = remove_unfinished_downloads(cache_dir, dataset)
                raise _damaged_download_error(error, dataset, removed) from error
            # kagglehub asks Kaggle for the current version before it looks in its cache: offline, a
            # complete copy already downloaded is what the user needs.
            cached = None if force or not _is_offline(error) else newest_cached_copy(cache_dir, dataset)
            if cached is None:
                raise _explain_failure(error, dataset) from error
            log.warning("could not reach Kaggle; using the copy of %s downloaded before: %s", dataset, cached)
            path = cached
    return find_data_root(Path(path))


def _is_offline(error: Exception) -> bool:
    import requests

    return isinstance(error, (requests.ConnectionError, requests.Timeout))


def newest_cached_copy(cache_dir: Path, dataset: str) -> Path | None:
    """The newest complete copy of ``dataset`` in kagglehub's cache (``<cache>/datasets/<owner>/<name>/
    versions/<N>/``, complete when kagglehub has written ``<N>.complete`` beside ``versions``), or None.
    A handle naming a version accepts only that version."""
    handle = _parse_handle(dataset)
    folder = _dataset_cache_folder(cache_dir, handle)
    versions = [int(marker.stem) for marker in folder.glob("*.complete") if marker.stem.isdigit()]
    if handle.version is not None:
        versions = [v for v in versions if v == handle.version]
    complete = [v for v in versions if (folder / "versions" / str(v)).is_dir()]
    return folder / "versions" / str(max(complete)) if complete else None
