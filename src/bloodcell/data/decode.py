"""Decode one image file into the RGB uint8 array every stage uses.

This module must not import torch: the ONNX Runtime predictor uses it too. Training (through the decoded
cache), evaluation and every predictor call :func:`decode_image`, so a model always sees exactly the
preprocessing it was trained with.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

#: File suffixes accepted as images (lower case).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
#: The Pillow plugins that may read a file (a ``.jpg`` that is really a GIF is refused unparsed; a camera's
#: multi-picture JPEG, MPO, opens through the JPEG plugin).
READ_FORMATS: tuple[str, ...] = ("BMP", "JPEG", "PNG", "TIFF")
#: Images with more pixels than this are refused as likely decompression bombs (about 8k x 8k).
DEFAULT_MAX_PIXELS = 64_000_000
#: Files larger than this are refused unread: an uncompressed 16-bit RGB TIFF of DEFAULT_MAX_PIXELS is 384 MB.
MAX_FILE_BYTES = 512 * 2**20
#: TIFF headers Pillow reads that the strip count below cannot: BigTIFF (8-byte offsets) and the two
#: non-standard byte orders. No microscope writes them, so they are refused rather than parsed.
UNREAD_TIFF_HEADERS = (b"II+\x00", b"MM\x00+", b"II\x00*", b"MM*\x00")
#: Guards Pillow's process-wide settings while a header is read (see _open_header): decoding runs in threads.
_PILLOW_GUARD = threading.Lock()
# Pillow warns once per malformed tag or EXIF entry ("Tag data larger than file", "Possibly corrupt EXIF
# data"), each with its own words, so a crafted file of thousands of tags printed thousands of lines to a
# server's log on every upload (25 MB from a 787 KB TIFF). A file Pillow cannot read gets our own error;
# the rest are noise. Set once here, not in catch_warnings around each decode, which is not thread-safe.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
#: More scans than this in a JPEG are refused: each scan of a progressive JPEG costs a pass over the whole
#: image, so a 400 KB file with 10,000 tiny scans kept a decoder busy for 14 s (and 10 MB, for minutes).
#: Cameras and encoders write about 10.
MAX_JPEG_SCANS = 100
#: More fill bytes and markers without a length than this between a JPEG's segments are refused: real
#: files have a handful, and Pillow's parser steps through them one at a time in Python (10 MB of fill
#: bytes took 8.6 s to decode, 10 MB of restart markers 5 s).
MAX_JPEG_PADDING = 65_536
#: More segments than this before a JPEG's first scan and between its scans are refused: real files have
#: under 30 (an ICC profile split into APP2 chunks adds up to 255), and Pillow's parser walks them one at
#: a time in Python (10 MB of 2.6 million empty comments took 6.5 s to open).
MAX_JPEG_SEGMENTS = 4_096
#: More strips or tiles than this in a TIFF are refused: the decoder builds one entry per strip while
#: opening, so a 10 MB TIFF of 8 x 8 pixels listing 2.6 million strips took 10 s and 760 MB. One strip per
#: row of an 8,000-row image in three planes is 24,000.
MAX_TIFF_STRIPS = 65_536
#: More entries than this in a TIFF's first directory are refused: real files carry a few dozen tags, and
#: Pillow reads them one at a time (a 787 KB file of 65,535 bogus tags took 1-1.7 s to open).
MAX_TIFF_TAGS = 1_024
#: A TIFF tile may exceed the image it tiles (tiles are multiples of 16 px), but one of more pixels than this
#: and than the image rounded up to whole 16 px is refused: the decoder fills a whole tile, however small the
#: image, so a 64 x 64 TIFF declaring one 16,384 x 16,384 tile took 800 MB.
MAX_TIFF_TILE_PIXELS = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: More chunks than this in a PNG are refused: Pillow reads a PNG's chunks one at a time in Python, so a
#: 10 MB file of 860,000 empty chunks took 1.9 s to decode (at this limit, about 0.3 s). libpng writes
#: 8 KB data chunks (a file of MAX_FILE_BYTES holds about 65,400 of them: half the limit), and an encoder
#: that writes one a row stays under it too.
MAX_PNG_CHUNKS = 131_072
#: Bumped whenever the same file may decode to other pixels or get another accept / refuse verdict
#: (2: EXIF orientation applied, 16-bit and float greyscale refused; 3: a JPEG that ends before its
#: end-of-image marker, or pads its segments with more than MAX_JPEG_PADDING fill bytes, refused; 4: a PNG
#: of more than MAX_PNG_CHUNKS chunks refused; 5: JPEGs of more than MAX_JPEG_SEGMENTS segments, TIFFs of
#: more than MAX_TIFF_TAGS tags or tiles larger than MAX_TIFF_TILE_PIXELS refused; 6: colour TIFFs
#: of samples wider than 8 bits in separate planes, of floating-point or of more than 16-bit samples refused;
#: 7: of those in planes, only uncompressed ones refused, as libtiff reads the others right, and a TIFF tag
#: of no values read as unset; 8: 16-bit colour of no sample of 4,096 or more refused as 12-bit data, and an
#: orientation tag read tolerantly, so a photo whose EXIF block Pillow could not write back is accepted).
#: The index's hash cache and the decoded cache are keyed by it, so a new rule never meets a verdict or
#: pixels from the old one.
DECODER_VERSION = 8
#: Images whose shorter side falls short of the longer by more than this share are named as squashed when
#: resized to the model's square input. A crop that trims a few rows (224 x 216: 3.6 %) changes a cell's
#: proportions less than cells differ among themselves, so it passes unnoted; a 4:3 camera frame (25 %) or a
#: 16:9 one (44 %) squashes every cell far beyond that, a shape a model trained on square images never saw.
MAX_QUIET_SQUASH = 0.05
#: Single-channel modes wider than 8 bits. PIL's conversion to RGB clips them at 255 instead of scaling,
#: which turns a 16-bit smear into a blank white field; their range (12 or 16 bits? 0-1 floats?) cannot be
#: told from the file, so they are refused with a reason instead of guessed.
_WIDE_MODES: dict[str, str] = {
    "I;16": "16-bit greyscale", "I;16L": "16-bit greyscale", "I;16B": "16-bit greyscale",
    "I;16N": "16-bit greyscale", "I": "16- or 32-bit integer greyscale", "F": "32-bit float greyscale",
}  # fmt: skip


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` says why in words a user understands."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def open_rgb(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> Image.Image:
    """Open, validate and fully decode an image, converting any mode to RGB.

    Parameters
    ----------
    source: a path, or the raw bytes of an uploaded file.
    max_pixels: refuse images with more pixels than this (decompression bombs).
    max_side: refuse images whose width or height exceeds this.

    Returns the decoded RGB image. Raises :class:`ImageError` naming the source and the problem for
    zero-byte, non-image, truncated, oversized or unsupported files.
    """
    name = "<upload>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else _read_image_file(source, name)
    if len(data) == 0:
        raise ImageError(name, "empty file (0 bytes)")
    _refuse_costly_structure(name, data)
    try:
        # A plain Image once convert() below has run.
        image: Image.Image = _open_header(data, max(max_pixels, (max_side or 0) ** 2))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                name, f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels:,} pixels"
            )
        if max_side is not None and max(width, height) > max_side:
            raise ImageError(name, f"image dimensions {width}x{height} exceed the limit of {max_side}x{max_side}")
        if width < 8 or height < 8:
            raise ImageError(name, f"image too small: {width}x{height} pixels")
        image = upright_rgb(image, name)  # decodes it now, so truncation is caught here, not later
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        signature = _format_by_signature(data)
        if signature in READ_FORMATS:
            raise ImageError(name, f"a broken {signature} file: its header cannot be read") from error
        if signature is not None:
            raise ImageError(name, f"unsupported image format {signature!r} (use JPEG, PNG, BMP or TIFF)") from error
        raise ImageError(name, "not an image file (or an unsupported format)") from error
    except Image.DecompressionBombError as error:
        # Pillow refuses at open beyond twice its guard, which is at least our limit: say ours, not its own.
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
        raise ImageError(name, f"image too large: {size} exceeds the limit of {max_pixels:,} pixels") from error
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            raise ImageError(name, f"truncated or corrupt image data ({message})") from error
        raise ImageError(name, f"cannot decode image ({message})") from error
    return image


def upright_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """An open image as every stage sees it: decoded, turned upright by its orientation tag and converted to
    8-bit RGB, or refused in an :class:`ImageError` naming ``name`` where its samples cannot be read right.

    :func:`open_rgb` reads files through it; call it on a PIL image of your own (``Image.open(...)`` as it
    returns it, before ``load()``, so that 12-bit data stored in 16-bit colour can be told apart) to give a
    model what :func:`decode_image` would. Refused: greyscale wider than 8 bits, and 16-bit colour of no
    sample of 4,096 or more (12-bit data, read as near black), neither of whose range can be told from the
    file; a mode Pillow cannot convert.
    """
    stored = _stored_rawmode(image)  # read before load(), which forgets it
    image.load()
    if image.mode in _WIDE_MODES:
        raise ImageError(name, f"{_WIDE_MODES[image.mode]} image (mode {image.mode}): bloodcell reads 8-bit "
                               "colour images; convert it to 8-bit RGB first")  # fmt: skip
    # A camera's orientation tag: show the model the picture as a viewer (and the web page) shows it.
    turn = _orientation_transpose(image)
    if turn is not None:
        image = image.transpose(turn)
        for key in _ORIENTATION_METADATA:  # applied: a copy saved with them must not be turned again
            image.info.pop(key, None)
    rgb = _as_rgb(name, image)
    _refuse_12_bit_in_16(name, stored, rgb)
    return rgb


#: EXIF orientation (tag 0x0112) to the transpose that shows the picture upright: ImageOps.exif_transpose's
#: table (1 and anything else: as stored).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
#: The metadata an orientation tag is read from (EXIF, and XMP where EXIF has none).
_ORIENTATION_METADATA = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
#: The image modes whose 16-bit samples Pillow keeps only the top byte of, and that are light intensities
#: (CMYK's are ink): 12-bit data stored in them reads as near black.
_TOP_BYTE_MODES = frozenset({"RGB", "RGBA", "RGBX", "LA"})


def _orientation_transpose(image: Image.Image) -> Image.Transpose | None:
    """The transpose for ``image``'s orientation tag, found as ImageOps.exif_transpose finds it (EXIF, else
    XMP); None for none, and for a tag that cannot be read: a picture is better read as stored than refused.

    Not exif_transpose itself: after turning, it rewrites the EXIF block, and that write raised (TypeError,
    AttributeError, struct.error) on blocks Pillow reads fine, such as a tag stored with an unexpected type
    (63 of 4,000 EXIF blocks with 1-3 bytes changed), which refused the photo everywhere.
    """
    try:
        return _ORIENTATION_TRANSPOSE.get(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any odd EXIF block: as stored
        return None


def _stored_rawmode(image: Image.Image) -> str:
    """How the file stores ``image``'s samples (Pillow's raw mode: ``RGB;16B`` for 16-bit big-endian RGB),
    read from its first tile before it is loaded; "" once loaded, or for an image not read from a file."""
    tiles = getattr(image, "tile", None) or []
    # (decoder, extents, offset, args) by position: Pillow 10 keeps plain tuples, 11 on a named tuple.
    args = tiles[0][3] if tiles and len(tiles[0]) > 3 else None
    stored = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    return stored if isinstance(stored, str) else ""


def _refuse_12_bit_in_16(name: str, stored: str, rgb: Image.Image) -> None:
    """Refuse 16-bit colour whose every sample is below 4,096: 12-bit data stored in 16 bits.

    Pillow reads 16-bit colour as its top byte, right for a full 16-bit range; 12-bit data comes out at
    0-15, a near-black picture a model classified without a word. A smear's bright background cannot sit
    below 4,096 of a 16-bit range, and 12 or 16 bits cannot be told from the file (as for greyscale), so
    it is refused. Below 4,096 is a top byte below 16, so the 8-bit ``rgb`` tells.
    """
    mode, _, depth = stored.partition(";")
    if mode not in _TOP_BYTE_MODES or not depth.startswith("16"):
        return
    if int(np.asarray(rgb).max()) < 16:
        kind = "greyscale" if mode == "LA" else "colour"
        raise ImageError(name, f"16-bit {kind} image whose samples all fall below 4,096, as 12-bit data "
                               "stored in 16 bits would: read as 16-bit it is near black, and 12 or 16 bits "
                               "cannot be told from the file; convert it to 8-bit RGB first")  # fmt: skip


def _as_rgb(name: str, image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit RGB (its top byte) as 8-bit RGB; a mode Pillow cannot
    convert (``La``, greyscale with premultiplied alpha, from a TIFF) is named in an :class:`ImageError`."""
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(name, f"unsupported image mode {image.mode} ({error}): convert it to 8-bit RGB first") from error


def _open_header(data: bytes, largest_limit: int) -> Image.Image:
    """``Image.open`` (which reads the header only), under the lock that keeps concurrent decodes from
    clobbering one another's process-wide settings.

    Pillow warns before it errors on bombs; we check the size ourselves and want one clear message, so the
    warning is silenced here. ``warnings.catch_warnings`` saves and restores the process-wide filter list,
    which threads entering and leaving it at once left with a stray filter and let the warning through
    (measured: 8 threads); Pillow warns only in ``open``, so only the header is read under the lock and the
    costly decode runs outside it. Pillow's own guard (about 179 MP) would refuse before our limits are
    read: it is raised to the largest limit asked for (only ever raised; None means the program turned the
    guard off itself).
    """
    with _PILLOW_GUARD, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if Image.MAX_IMAGE_PIXELS is not None:
            Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, largest_limit)
        # Only the accepted formats' plugins parse the header: no other decoder sees what a user sends.
        return Image.open(io.BytesIO(data), formats=READ_FORMATS)


def _format_by_signature(data: bytes) -> str | None:
    """The Pillow format whose signature (magic bytes) ``data`` starts with, to name a refused format; only
    the plugins' signature checks run, none parses the file."""
    Image.init()
    prefix = data[:16]
    for format_name, (_, accept) in Image.OPEN.items():
        try:
            matches = accept is not None and accept(prefix) is True
        except (struct.error, IndexError, ValueError):  # BMP's check unpacks 4 bytes: a 1-3 byte file crashed it
            continue
        if matches:
            return format_name
    return None


def _read_image_file(source: str | os.PathLike[str], name: str) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_FILE_BYTES`. A pipe would block the read forever
    and a device (``/dev/zero``) never end it, so what is not a regular file is refused before opening."""
    try:
        info = os.stat(source)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(name, "not a regular file (a folder, pipe or device)")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(name, f"file too large ({info.st_size:,} bytes; the limit is {MAX_FILE_BYTES:,})")
        with open(source, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # the file may have grown since
    except OSError as error:
        raise ImageError(name, f"cannot read file ({error.strerror or error})") from error
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(name, f"file too large (more than {MAX_FILE_BYTES:,} bytes)")
    return data


def _refuse_costly_structure(name: str, data: bytes) -> None:
    """Refuse files whose structure, read before decoding, rules them out: JPEGs with very many scans or
    padding, and TIFFs with very many strips (all pass every size and pixel check, and Pillow has no limit
    for any, so they make decoding slow), and JPEGs that end before their end-of-image marker."""
    if data[:2] == b"\xff\xd8":
        scans, cut_short, padding, segments = _jpeg_structure(data)
        if scans > MAX_JPEG_SCANS:
            raise ImageError(name, f"a JPEG of more than {MAX_JPEG_SCANS} scans ({scans}+): too costly to decode")
        if padding > MAX_JPEG_PADDING:
            raise ImageError(name, f"a JPEG with more than {MAX_JPEG_PADDING:,} fill bytes or markers between its "
                                   "segments: too costly to decode")  # fmt: skip
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageError(name, f"a JPEG of more than {MAX_JPEG_SEGMENTS:,} segments: too costly to decode")
        if cut_short:
            # The stream ends before its end-of-image marker: cut short, or its end zero-filled (an
            # interrupted download or copy). Pillow decodes such zeros without a word, into flat grey.
            raise ImageError(name, "truncated JPEG: its data ends before the end-of-image marker (cut short or zero-filled)")
    if data[:4] in UNREAD_TIFF_HEADERS:
        raise ImageError(name, "a BigTIFF, or a TIFF with a non-standard header: not read (save it as an ordinary "
                               "TIFF, PNG or JPEG)")  # fmt: skip
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        directory = _tiff_first_directory(data)
        _refuse_costly_tiff(name, directory)
        _refuse_unread_tiff_samples(name, directory)
    if data[:8] == PNG_SIGNATURE and _png_chunks(data) > MAX_PNG_CHUNKS:
        raise ImageError(name, f"a PNG of more than {MAX_PNG_CHUNKS:,} chunks: too costly to decode")


class JpegStructure(NamedTuple):
    """What :func:`_jpeg_structure` finds in a JPEG's first image before it is decoded."""

    scans: int  # start-of-scan segments, counted up to one past MAX_JPEG_SCANS
    cut_short: bool  # the stream runs out before its end-of-image marker
    padding: int  # fill bytes and markers without a length, counted up to one past MAX_JPEG_PADDING
    segments: int  # segments with a length (scans included), counted up to one past MAX_JPEG_SEGMENTS


def _jpeg_structure(data: bytes) -> JpegStructure:
    """Walk a JPEG's markers: its scans, padding and segments, and whether it ends before its end-of-image
    marker.

    Written by hand because no decoder library exposes these before decoding (Pillow decodes a cut or
    zero-filled stream without a word, and steps through padding one byte at a time in Python). Cheap: a
    segment is skipped by its length, and a scan's entropy-coded data by searching for the next byte 0xFF
    that is not stuffing (``FF 00``) or a restart marker (``FF D0``-``FF D7``). Whatever follows the
    end-of-image marker (a phone's trailer, an appended video) is not read. A malformed stream stops the
    walk, not cut short: the decoder then says what is wrong with it.
    """
    scans, padding, segments, pos, end = 0, 0, 0, 2, len(data)
    while scans <= MAX_JPEG_SCANS and segments <= MAX_JPEG_SEGMENTS:
        if pos + 2 > end:
            return JpegStructure(scans, True, padding, segments)
        if data[pos] != 0xFF:
            return JpegStructure(scans, False, padding, segments)
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, marker without a length
            padding += 1
            if padding > MAX_JPEG_PADDING:
                return JpegStructure(scans, False, padding, segments)
            pos += 1 if marker == 0xFF else 2
        elif marker == 0xD9:  # end of image
            return JpegStructure(scans, False, padding, segments)
        elif pos + 4 > end:
            return JpegStructure(scans, True, padding, segments)
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            segments += 1
            if marker == 0xDA:
                scans += 1
                pos = _end_of_entropy_coded_data(data, pos)
    return JpegStructure(scans, False, padding, segments)


#: The first FF of entropy-coded data that is not stuffing (FF 00) or a restart marker (FF D0-D7).
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def _end_of_entropy_coded_data(data: bytes, pos: int) -> int:
    """Where a scan's entropy-coded data ends: at the next marker, or at the end of the data. One search,
    not a step per stuffed byte (a crafted run of FF 00 cost a second a 10 MB file)."""
    found = _MARKER_AFTER_SCAN.search(data, pos)
    return found.start() if found else len(data)


def _png_chunks(data: bytes) -> int:
    """A PNG's chunks up to its end chunk (IEND), counted up to one past MAX_PNG_CHUNKS. Each chunk is
    skipped by its length, so the walk costs a step per chunk, not per byte (about 30 ms at the limit)."""
    count, pos, end = 0, len(PNG_SIGNATURE), len(data)
    while count <= MAX_PNG_CHUNKS and pos + 8 <= end:
        count += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return count


class TiffDirectory(NamedTuple):
    """What :func:`_tiff_first_directory` reads of a TIFF's first directory before it is decoded."""

    entries: int  # tags it lists
    strips: int  # the larger of its strip and tile counts
    size: tuple[int, int]  # image width and height (0 where unread)
    tile: tuple[int, int]  # tile width and height (0 when it is not tiled)
    samples: int = 0  # samples a pixel (3 for RGB; 0 where unread)
    bits: int = 0  # bits a sample (the first channel's; 0 where unread)
    planar: int = 1  # 1: samples interleaved pixel by pixel, 2: one plane a channel
    sample_format: int = 1  # 1: unsigned integers, 2: signed, 3: floating point
    compression: int = 1  # 1: none


def _tiff_first_directory(data: bytes) -> TiffDirectory:
    """The tag count, strip or tile count, image size and tile size of a (classic) TIFF's first directory.
    Written by hand, like the JPEG walk: Pillow reads every tag and lists every strip before anything can
    be checked. Unreadable parts read as 0."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    offset = int.from_bytes(data[4:8], order)
    if offset + 2 > len(data):
        return TiffDirectory(0, 0, (0, 0), (0, 0))
    entries = int.from_bytes(data[offset : offset + 2], order)
    counts, values = [0], {}
    for k in range(min(entries, MAX_TIFF_TAGS + 1, (len(data) - offset - 2) // 12)):
        entry = data[offset + 2 + 12 * k : offset + 14 + 12 * k]
        tag = int.from_bytes(entry[:2], order)
        if tag in (273, 324):  # StripOffsets, TileOffsets: how many
            counts.append(int.from_bytes(entry[4:8], order))
        # ImageWidth, ImageLength, BitsPerSample, Compression, SamplesPerPixel, PlanarConfiguration,
        # TileWidth, TileLength, SampleFormat: each a SHORT or LONG (the first channel's, for a per-channel tag)
        elif tag in (256, 257, 258, 259, 277, 284, 322, 323, 339):
            values[tag] = _first_tiff_value(entry, data, order)
    return TiffDirectory(entries, max(counts), (values.get(256, 0), values.get(257, 0)),
                         (values.get(322, 0), values.get(323, 0)), values.get(277, 0), values.get(258, 0),
                         values.get(284, 1), values.get(339, 1), values.get(259, 1))  # fmt: skip


def _first_tiff_value(entry: bytes, data: bytes, order: Literal["little", "big"]) -> int:
    """The first value of a SHORT or LONG tag entry (a per-channel tag lists one a channel, stored elsewhere
    in the file when they do not fit the entry's 4 bytes); 0 where it cannot be read."""
    size = {3: 2, 4: 4}.get(int.from_bytes(entry[2:4], order), 0)
    if not size:
        return 0
    count = int.from_bytes(entry[4:8], order)
    if count == 0:  # no value: the field is unused, whatever it holds
        return 0
    if size * count <= 4:
        raw = entry[8 : 8 + size]
    else:
        at = int.from_bytes(entry[8:12], order)
        raw = data[at : at + size]
    return int.from_bytes(raw, order) if len(raw) == size else 0


def _refuse_unread_tiff_samples(name: str, directory: TiffDirectory) -> None:
    """Refuse colour TIFFs whose samples Pillow misreads or cannot read, with the reason.

    Pillow reads an uncompressed colour TIFF of 16-bit samples stored one plane a channel as if its samples
    were 8-bit (compressed ones go through libtiff, which reads them right: deflate, LZW and PackBits were
    measured bit-exact): a striped picture, classified without a word (a review measured a Pre-B sample read as
    Benign, 0.78); floating-point and 32-bit colour it cannot open at all, and said only that the header
    could not be read. Greyscale is left to the mode check in :func:`open_rgb`, which names its mode.
    """
    if directory.samples < 3:
        return
    if directory.sample_format == 3:
        raise ImageError(name, "a colour TIFF of floating-point samples: bloodcell reads 8-bit colour images; "
                               "convert it to 8-bit RGB first")  # fmt: skip
    if directory.bits > 16:
        raise ImageError(name, f"a colour TIFF of {directory.bits}-bit samples: bloodcell reads 8-bit colour "
                               "images; convert it to 8-bit RGB first")  # fmt: skip
    # Compression 0 is an unset or unreadable tag, which Pillow takes as none (1): refused too.
    if directory.planar == 2 and directory.bits > 8 and directory.compression in (0, 1):
        raise ImageError(name, f"an uncompressed colour TIFF of {directory.bits}-bit samples stored one plane a "
                               "channel, which the image library misreads: save it with interleaved samples or "
                               "compressed (LZW, deflate), or as 8-bit RGB")  # fmt: skip


def _refuse_costly_tiff(name: str, directory: TiffDirectory) -> None:
    """Refuse a TIFF whose first directory lists too many tags or strips, or tiles far larger than it."""
    if directory.entries > MAX_TIFF_TAGS:
        raise ImageError(name, f"a TIFF of {directory.entries:,} tags (at most {MAX_TIFF_TAGS:,}): too costly to decode")
    if directory.strips > MAX_TIFF_STRIPS:
        raise ImageError(name, f"a TIFF of {directory.strips:,} strips or tiles (at most {MAX_TIFF_STRIPS:,}): too "
                               "costly to decode")  # fmt: skip
    (width, height), (tile_width, tile_height) = directory.size, directory.tile
    whole = -(-width // 16) * 16 * (-(-height // 16) * 16)  # the image in whole 16 px tiles
    if tile_width * tile_height > max(whole, MAX_TIFF_TILE_PIXELS):
        raise ImageError(name, f"a TIFF of {width}x{height} pixels in tiles of {tile_width}x{tile_height}: tiles "
                               "that much larger than the image are too costly to decode")  # fmt: skip


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to ``size`` x ``size`` and return a ``(size, size, 3)`` uint8 array.

    The whole field of view is kept (no crop): cells near the border matter. Bilinear resampling with
    PIL's antialiasing is used everywhere, so cache and predictors agree to the bit.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def decode_image(source: str | os.PathLike[str] | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` to a ``(size, size, 3)`` uint8 RGB array (see :func:`open_rgb` for errors)."""
    return resize_rgb(open_rgb(source, max_pixels=max_pixels), size)


class Decoded(NamedTuple):
    """An image decoded for a model by :func:`decode_or_reason`."""

    pixels: np.ndarray  # (size, size, 3) uint8 RGB, as decode_image gives it
    width: int  # of the image before it was resized (after its EXIF orientation)
    height: int


def decode_or_reason(source: str | os.PathLike[str], size: int) -> Decoded | str:
    """:func:`decode_image` with the size the image had, or the reason the file cannot be used: for the
    tools that report a bad file and go on with the rest (``predict``, ``explain``, ``export --images``)."""
    try:
        image = open_rgb(source)
        return Decoded(resize_rgb(image, size), image.width, image.height)
    except ImageError as error:
        return error.reason
    except Exception as error:  # noqa: BLE001 - one odd file must not stop a batch of thousands
        return f"cannot read image ({type(error).__name__}: {error})"


def squash(width: int, height: int) -> float:
    """How much resizing a ``width`` x ``height`` image to a square squashes what it shows along its longer
    side: ``1 - shorter / longer`` (0 for a square, 0.25 for 640 x 480, 0.44 for 1920 x 1080)."""
    return 1 - min(width, height) / max(width, height)


def squashed_warning(width: int, height: int) -> str | None:
    """The sentence telling the user that resizing one ``width`` x ``height`` image to a square squashes it
    by more than :data:`MAX_QUIET_SQUASH`, or None when it does not: for the web service, which answers one
    image at a time (:func:`squashed_note` sums up many)."""
    share = squash(width, height)
    if share <= MAX_QUIET_SQUASH:
        return None
    return (f"the image is {width}x{height} pixels, not square: resizing it to the model's square input squashes the "
            f"cells along its longer side by {100 * share:.0f} %; crop it to a square to keep the cells' shape")  # fmt: skip


def squashed_note(sizes: Sequence[tuple[str, int, int]], where: str = "") -> str | None:
    """One line naming the images that resizing to a square squashes by more than :data:`MAX_QUIET_SQUASH`,
    or None when there are none.

    Parameters
    ----------
    sizes: ``(name, width, height)`` of every image used.
    where: words placed after "images" (`` of DATASET``), or nothing.
    """
    measured = [(squash(width, height), name, width, height) for name, width, height in sizes]
    squashed = [item for item in measured if item[0] > MAX_QUIET_SQUASH]
    if not squashed:
        return None
    most, name, width, height = max(squashed, key=lambda item: item[0])  # the first of the worst, in order
    verb = "is" if len(squashed) == 1 else "are"
    return (f"{len(squashed)} of the {len(sizes)} images{where} {verb} not square; resizing to a square squashes the "
            f"cells along the longer side by up to {100 * most:.0f} % ({name}: {width}x{height}); crop the images to "
            "squares to keep the cells' shape")  # fmt: skip
