"""The decoded cache: every image of a manifest decoded once, at one size, into a memory-mapped array.

The cache is a ``.npy`` file of shape ``(N, size, size, 3)`` uint8, aligned with the manifest rows it was
made from. Its name holds a hash of those rows (path and SHA-256 of each, in order, and the decoder's
version), the size and the variant, so any change to the data, the order or the decoding makes a new
file, and an unchanged dataset is decoded only once; the file it replaces is then deleted. It is written
under a temporary name and renamed when complete, so a killed run never leaves a half-filled cache that
a later run would trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock; caches build unlocked, as on a file system that cannot lock
    fcntl = None  # type: ignore[assignment]

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from bloodcell.data.decode import DECODER_VERSION, decode_image
from bloodcell.data.progress import track
from bloodcell.io import atomic_path

log = logging.getLogger(__name__)

#: A cache temporary younger than this may belong to a build that has not locked it yet (seconds).
FRESH_TEMPORARY_SECONDS = 10


def rows_key(manifest: pd.DataFrame) -> str:
    """A 16-hex-digit hash of the rows' paths and SHA-256s, in order, and the decoder's version: what a
    cache file is valid for."""
    digest = hashlib.sha256(f"decoder {DECODER_VERSION}\n".encode())
    for path, sha in zip(manifest["path"], manifest["sha256"]):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()[:16]


def cache_path(manifest: pd.DataFrame, cache_dir: str | Path, size: int, variant: str) -> Path:
    """Where the cache for these rows, size and variant lives: ``<cache_dir>/<variant>-<size>px-<key>.npy``."""
    return Path(cache_dir) / f"{variant}-{size}px-{rows_key(manifest)}.npy"


def _decode_into(target: Path, paths: list[Path], size: int, progress: bool, variant: str) -> None:
    # The lock is held until the temporary has been renamed into place (the handle follows the file), so
    # _remove_abandoned_temporaries can never take a build that is still finishing.
    with contextlib.ExitStack() as held, atomic_path(target, suffix=".npy") as tmp:
        array = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        handle = held.enter_context(open(tmp, "rb+"))
        locked = _lock(handle, blocking=True)
        _reserve(handle, target)
        if not locked:
            held.close()  # no lock to hold, and Windows cannot rename a file that is still open
        for k, path in enumerate(track(paths, len(paths), f"Decoding {variant} images at {size}px", progress)):
            array[k] = decode_image(path, size)
        array.flush()
        del array  # close the map before the file is renamed


#: flock's answers on file systems that do not lock (Lustre without -o flock, some FUSE and SMB mounts).
_NO_LOCKING = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}


def _lock(handle: BinaryIO, blocking: bool) -> bool | None:
    """Take an exclusive lock on an open file: True when taken, False when another process holds it, None
    when the file system (or, on Windows, the system) cannot lock: the build goes on unlocked, and its
    temporaries are then never removed."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in _NO_LOCKING:
            return None
        raise
    return True


def _reserve(handle: BinaryIO, target: Path) -> None:
    """Allocate the whole file on disk now. A memory map's file is sparse: a disk that fills while it is
    written kills the process with SIGBUS, no message, and leaves the temporary file filling the disk."""
    if not hasattr(os, "posix_fallocate"):  # macOS and Windows: decode without the reservation
        return
    size = os.fstat(handle.fileno()).st_size
    try:
        os.posix_fallocate(handle.fileno(), 0, size)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):  # a file system that cannot: decode anyway
            return
        raise OSError(error.errno, f"{error.strerror} (the decoded cache needs {size / 2**20:,.0f} MiB; free some, "
                                   "or point BLOODCELL_HOME at a larger disk)", str(target)) from None  # fmt: skip


def load_images(
    manifest: pd.DataFrame,
    root: str | Path,
    size: int,
    variant: str = "Original",
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Decoded images for the manifest's rows, from the cache (made on first use).

    Parameters
    ----------
    manifest: rows with ``path`` (relative to ``root``) and ``sha256``; every row must decode (pass
        accepted rows only).
    root: the folder the paths are relative to (``Dataset.root``).
    size: square side in pixels.
    variant: ``Original`` or ``Segmented``; part of the cache key.
    cache_dir: where cache files live; default ``dataset_workdir(root's dataset, variant)/cache``.
    progress: draw a progress bar while decoding.

    Returns a read-only memory-mapped ``(N, size, size, 3)`` uint8 array aligned with the rows. Raises
    :class:`~bloodcell.data.decode.ImageError` if a row does not decode.
    """
    if cache_dir is None:
        from bloodcell.data.index import dataset_workdir
        from bloodcell.data.layouts import find_dataset

        cache_dir = dataset_workdir(find_dataset(root, variant).top, variant) / "cache"
    target = cache_path(manifest, cache_dir, size, variant)
    if not target.is_file():
        _remove_abandoned_temporaries(target.parent, size, variant)  # before: it may be what filled the disk
        _decode_into(target, [Path(root) / p for p in manifest["path"]], size, progress, variant)
        _remove_stale_caches(target, size, variant)
    try:
        images = np.load(target, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:  # cut short or damaged after it was written (a full disk, a bad copy; EOFError: empty)
        log.warning("%s: unreadable decoded cache (%s); it is rebuilt", target, error)
        images = None
    if images is None or images.shape != (len(manifest), size, size, 3):  # damaged, or a foreign file: rebuild
        target.unlink()
        return load_images(manifest, root, size, variant, cache_dir=cache_dir, progress=progress)
    return images


def _remove_stale_caches(current: Path, size: int, variant: str) -> None:
    """Delete the caches of this size and variant made for earlier states of the data (about 200 MB each
    at 160 px). A process still reading one keeps its memory map: on POSIX the file goes when the map is
    closed; Windows refuses to delete a mapped file, and it is left for a later run to remove."""
    for stale in current.parent.glob(f"{variant}-{size}px-*.npy"):
        if stale != current:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                stale.unlink()


def _remove_abandoned_temporaries(cache_dir: Path, size: int, variant: str) -> None:
    """Delete the temporaries of builds killed outright (SIGKILL, a power cut), which no cleanup could.

    A build holds an exclusive lock on its temporary while it writes, and the kernel drops the lock when
    the process dies; a temporary whose lock can be taken has no builder left. One younger than a few
    seconds may be another process's build that has not locked it yet, and is left alone.
    """
    for temporary in cache_dir.glob(f".{variant}-{size}px-*.npy*"):
        try:
            if time.time() - temporary.stat().st_mtime < FRESH_TEMPORARY_SECONDS:
                continue
            with open(temporary, "rb+") as handle:  # writable: NFS grants an exclusive lock only then
                taken = _lock(handle, blocking=False)
                if taken is None:  # no locking here: nothing tells a dead build from a live one
                    return
                if taken:
                    temporary.unlink()
        except FileNotFoundError:
            continue
