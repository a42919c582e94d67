"""The index: manifest columns, capture numbers, bad files, mode conversion, duplicates, the hash cache."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bloodcell import CLASSES
from bloodcell.data import index as index_module
from bloodcell.data.decode import squashed_note
from bloodcell.data.index import (
    MANIFEST_COLUMNS,
    NEAR_DUPLICATE_MAX_DISTANCE,
    build_index,
    dataset_workdir,
    parse_capture,
    phash_distances_below,
    read_manifest,
)
from bloodcell.io import sha256_file

SUMMARY_KEYS = {
    "images",
    "accepted",
    "rejected",
    "classes",
    "exact_duplicate_groups",
    "near_duplicate_groups",
    "manifest",
    "recaptured_pairs",
}


def smear(seed: int, size: int = 64) -> np.ndarray:
    """A random, smooth-ish RGB image (distinct per seed under a perceptual hash)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def two_class_dataset(root: Path, per_class: int = 3) -> Path:
    for k, folder in enumerate(("a", "b")):
        for number in range(1, per_class + 1):
            save(root / folder / f"img_{number:03d}.png", Image.fromarray(smear(100 * k + number)))
    return root


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    "name,expected",
    [
        ("WBC-Malignant-Pro-011.jpg", (11, 0)),
        ("Snap_001.jpg", (1, 0)),
        ("Sap_013 (1).jpg", (13, 1)),
        ("Sap_013(2).jpg", (13, 2)),
        ("Pro/WBC-Malignant-Pro-636.jpg", (636, 0)),
        ("scan2_0042.tif", (42, 0)),
        ("no-number.png", (-1, 0)),
        ("photo (3).jpg", (-1, 3)),
        # A time of day in two-digit fields after a year-first date is one capture number, not its seconds
        ("2024-03-12_10-15-30 (2).tif", (101530_000000, 2)),
        ("scan_2024-03-12T10:15.png", (1015_000000, 0)),
        # and one more field orders names within the time: milliseconds, a second shot in the same second
        ("2024-03-12 10.15.30.123.jpg", (101530_000123, 0)),
        ("2024-03-12_09-30-00_1.jpg", (93000_000001, 0)),
        ("IMG_20240312_101530.jpg", (101530, 0)),  # one field: the last number already
        ("2024-03-12_001.jpg", (1, 0)),  # a number counted within the day
        # a counter after a date stays the last number whether or not its digits could be a time
        ("20210315_0059.jpg", (59, 0)),
        ("20210315_0060.jpg", (60, 0)),
        ("20210315_000060.jpg", (60, 0)),
        ("img 12-03-2024 10.15.30.jpg", (30, 0)),  # day first: no time order in its digits
    ],
)
def test_parse_capture(name: str, expected: tuple[int, int]) -> None:
    assert parse_capture(name) == expected


def test_manifest_of_aria_dataset(aria_dataset: Path) -> None:
    result = build_index(aria_dataset, progress=False)
    manifest = result.manifest
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 96 and not manifest["rejected"].any()
    assert manifest["class"].tolist() == sorted(manifest["class"], key=CLASSES.index)
    assert (manifest["label"] == manifest["class"].map(CLASSES.index)).all()
    assert manifest["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert (manifest[["width", "height"]] == 48).all().all()
    first = manifest.iloc[0]
    assert first["path"] == "Benign/WBC-Benign-001.jpg" and first["capture"] == 1 and first["copy"] == 0
    assert first["sha256"] == sha256_file(aria_dataset / "Original" / first["path"])
    assert first["bytes"] == (aria_dataset / "Original" / first["path"]).stat().st_size
    assert result.manifest_path == dataset_workdir(aria_dataset, "Original") / "manifest.csv"
    assert set(result.summary) == SUMMARY_KEYS
    assert result.summary["classes"] == {name: 24 for name in CLASSES}
    back = read_manifest(result.manifest_path)
    pd.testing.assert_frame_equal(back, manifest, check_dtype=False)


def test_the_manifest_and_its_hash_are_the_same_on_every_system(aria_dataset: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The manifest's SHA-256 names the data in model cards: Windows line endings must not change it."""
    import os

    posix = build_index(aria_dataset, out=tmp_path / "posix.csv", progress=False)
    monkeypatch.setattr(os, "linesep", "\r\n")  # what pandas ends CSV lines with on Windows, unless told
    windows = build_index(aria_dataset, out=tmp_path / "windows.csv", progress=False)
    assert b"\r" not in (tmp_path / "windows.csv").read_bytes()
    assert windows.manifest_sha256 == posix.manifest_sha256 == sha256_file(posix.manifest_path)


def test_workdir_follows_bloodcell_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    workdir = dataset_workdir(tmp_path / "my-data", "Segmented")
    assert workdir.parent.parent == tmp_path / "home" / "datasets"
    assert workdir.parent.name.startswith("my-data-") and len(workdir.parent.name) == len("my-data-") + 8
    assert workdir.name == "Segmented"


def test_out_option_writes_manifest_there(aria_dataset: Path, tmp_path: Path) -> None:
    result = build_index(aria_dataset, out=tmp_path / "m.csv", progress=False)
    assert result.manifest_path == tmp_path / "m.csv" and (tmp_path / "m.csv").is_file()


def test_bad_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    root = two_class_dataset(tmp_path / "d")
    (root / "a" / "zero_004.png").write_bytes(b"")
    (root / "a" / "text_005.jpg").write_text("this is not an image")
    good = (root / "b" / "img_001.png").read_bytes()
    (root / "b" / "cut_004.png").write_bytes(good[: len(good) // 2])
    jpeg = save(tmp_path / "x.jpg", Image.fromarray(smear(7)), quality=95).read_bytes()
    (root / "b" / "cut_005.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    # An interrupted download: the full length, its last two thirds zeros (Pillow decodes it into grey).
    (root / "a" / "zeroed_008.jpg").write_bytes(jpeg[: len(jpeg) // 3] + bytes(len(jpeg) - len(jpeg) // 3))
    bomb_png(root / "a" / "bomb_006.png")
    save(root / "a" / "anim_007.jpg", Image.fromarray(smear(8)), format="GIF")
    save(root / "b" / "anim_008.gif", Image.fromarray(smear(9)), format="GIF")
    result = build_index(root, progress=False)
    reasons = dict(zip(result.manifest["path"], result.manifest["reason"]))
    rejected = result.manifest[result.manifest["rejected"]]
    assert set(rejected["path"]) == {
        "a/zero_004.png",
        "a/text_005.jpg",
        "b/cut_004.png",
        "b/cut_005.jpg",
        "a/zeroed_008.jpg",
        "a/bomb_006.png",
        "a/anim_007.jpg",
        "b/anim_008.gif",
    }
    assert "empty file" in reasons["a/zero_004.png"]
    assert "not an image" in reasons["a/text_005.jpg"]
    assert "truncated" in reasons["b/cut_004.png"] and "truncated" in reasons["b/cut_005.jpg"]
    assert "zero-filled" in reasons["a/zeroed_008.jpg"]
    assert "too large" in reasons["a/bomb_006.png"]
    assert "GIF" in reasons["a/anim_007.jpg"]
    assert "unsupported file type" in reasons["b/anim_008.gif"]
    assert (rejected["dup_group"] == -1).all() and (rejected["exact_group"] == -1).all()
    assert (rejected["phash"] == "").all()
    assert result.summary["accepted"] == 6 and result.summary["images"] == 14
    assert {item["path"] for item in result.summary["rejected"]} == set(rejected["path"])


def test_unreadable_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = two_class_dataset(tmp_path / "d")
    locked = (root / "a" / "img_002.png").resolve()
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        # chmod 000 does not stop root (CI containers), so simulate the permission error instead.
        if self.resolve() == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    row = build_index(root, progress=False).manifest.set_index("path").loc["a/img_002.png"]
    assert row["rejected"] and row["reason"] == "cannot read file (Permission denied)"


def test_a_broken_link_is_reported_not_dropped(tmp_path: Path) -> None:
    root = two_class_dataset(tmp_path / "d")
    (root / "a" / "gone_009.png").symlink_to(tmp_path / "moved-away.png")
    row = build_index(root, progress=False).manifest.set_index("path").loc["a/gone_009.png"]
    assert row["rejected"] and row["reason"].startswith("cannot read file")


def test_a_linked_folder_is_not_followed_and_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = two_class_dataset(tmp_path / "d")
    (root / "a" / "loop").symlink_to("..", target_is_directory=True)
    with caplog.at_level("WARNING", logger="bloodcell.data.layouts"):
        paths = build_index(root, progress=False).manifest["path"].tolist()
        build_index(root, progress=False)  # as a command's second preparation of the data: not said again
    assert not any("loop" in path for path in paths)
    assert sum("not followed" in r.getMessage() and "loop" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "1"])
def test_modes_are_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    root = two_class_dataset(tmp_path / "d", per_class=2)
    converted = Image.fromarray(smear(42, size=40)).convert(mode)
    name = "odd_009.jpg" if mode == "CMYK" else "odd_009.png"
    save(root / "a" / name, converted)
    row = build_index(root, progress=False).manifest.set_index("path").loc[f"a/{name}"]
    assert not row["rejected"], row["reason"]
    assert (row["width"], row["height"]) == (40, 40)
    from bloodcell.data.decode import decode_image

    assert decode_image(root / "a" / name, 16).shape == (16, 16, 3)


def test_a_greyscale_tiff_with_premultiplied_alpha_is_refused_by_name_not_a_crash_of_the_index(tmp_path: Path) -> None:
    """Pillow opens it as mode La, which it cannot convert to RGB: the ValueError escaped the decoder's
    checks, and one such file stopped ``bloodcell index`` (and split, train, evaluate) with a traceback."""
    import struct

    root = two_class_dataset(tmp_path / "d", per_class=2)
    grey = Image.fromarray(smear(43, size=40)).convert("L")
    buffer = io.BytesIO()
    Image.merge("LA", [grey, Image.new("L", grey.size, 255)]).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    directory = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[directory:directory + 2])[0]):
        at = directory + 2 + 12 * entry
        if struct.unpack("<H", data[at:at + 2])[0] == 338:  # ExtraSamples: 1 = associated (premultiplied) alpha
            data[at + 8] = 1
    (root / "a" / "la_009.tif").write_bytes(bytes(data))
    row = build_index(root, progress=False).manifest.set_index("path").loc["a/la_009.tif"]
    assert row["rejected"] and row["reason"].startswith("unsupported image mode La")
    from bloodcell.data.decode import ImageError, decode_image

    with pytest.raises(ImageError, match="la_009.tif: unsupported image mode La"):
        decode_image(root / "a" / "la_009.tif", 16)


@pytest.mark.parametrize(
    ("pixels", "suffix", "described"),
    [
        (np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40, ".png", "16-bit greyscale image (mode I;16)"),
        (np.linspace(0, 1, 1600, dtype=np.float32).reshape(40, 40), ".tif", "32-bit float greyscale image (mode F)"),
    ],
)
def test_wide_greyscale_images_are_refused_not_clipped(
    tmp_path: Path, pixels: np.ndarray, suffix: str, described: str
) -> None:
    """PIL's conversion would clip them to a blank field that the model then classifies with confidence."""
    from bloodcell.data.decode import ImageError, open_rgb

    path = save(tmp_path / f"wide{suffix}", Image.fromarray(pixels))
    with pytest.raises(ImageError, match=re.escape(described)) as raised:
        open_rgb(path)
    assert raised.value.source == str(path) and "convert it to 8-bit RGB" in raised.value.reason


def jpeg_with_scans(scans: int) -> bytes:
    """A small progressive JPEG whose last scan is repeated: each repeat costs a pass over the image."""
    buffer = io.BytesIO()
    Image.fromarray(smear(3, size=64)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rfind(b"\xff\xda") : -2]  # up to the end-of-image marker
    return data[:-2] + last_scan * scans + b"\xff\xd9"


def tiff_with_strips(strips: int, extra: tuple[bytes, ...] = ()) -> bytes:
    """An 8 x 8 greyscale TIFF whose StripOffsets lists ``strips`` entries (all of the same 8 bytes), with
    ``extra`` directory entries (12 bytes each) after its own."""
    array_at = 8 + 2 + (9 + len(extra)) * 12 + 4
    pixels_at = array_at + 4 * strips

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, count) + value

    short = lambda v: struct.pack("<HH", v, 0)  # noqa: E731
    tags = [entry(256, 3, 1, short(8)), entry(257, 3, 1, short(8)), entry(258, 3, 1, short(8)),
            entry(259, 3, 1, short(1)), entry(262, 3, 1, short(1)), entry(273, 4, strips, struct.pack("<I", array_at)),
            entry(277, 3, 1, short(1)), entry(278, 3, 1, short(1)), entry(279, 3, 1, short(8)), *extra]  # fmt: skip
    directory = struct.pack("<H", len(tags)) + b"".join(tags) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + directory + struct.pack("<I", pixels_at) * strips + bytes(range(64))


def test_files_whose_structure_makes_decoding_slow_are_refused() -> None:
    """Neither size nor pixel count catches them: a few hundred kB that keep a decoder busy for minutes."""
    from bloodcell.data.decode import MAX_JPEG_SCANS, MAX_PNG_CHUNKS, MAX_TIFF_STRIPS, ImageError, open_rgb

    assert open_rgb(jpeg_with_scans(3)).size == (64, 64)  # an ordinary progressive JPEG still decodes
    with pytest.raises(ImageError, match=f"more than {MAX_JPEG_SCANS} scans"):
        open_rgb(jpeg_with_scans(MAX_JPEG_SCANS + 1))
    whole = jpeg_with_scans(1)
    assert open_rgb(whole[:2] + b"\xff" * 16 + whole[2:]).size == (64, 64)  # a few fill bytes are legal
    for padding in (b"\xff" * 1_000_000, b"\xff\xd0" * 500_000):  # Pillow decodes them, one byte at a time
        with pytest.raises(ImageError, match="fill bytes or markers between its segments: too costly"):
            open_rgb(whole[:2] + padding + whole[2:])
    assert open_rgb(tiff_with_strips(8)).size == (8, 8)
    with pytest.raises(ImageError, match="strips or tiles"):
        open_rgb(tiff_with_strips(MAX_TIFF_STRIPS + 1))
    assert open_rgb(png_with_chunks(MAX_PNG_CHUNKS)).size == (8, 8)  # at the limit: read (in Python, chunk by chunk)
    with pytest.raises(ImageError, match="PNG of more than"):
        open_rgb(png_with_chunks(MAX_PNG_CHUNKS + 1))


def test_jpegs_of_many_segments_and_tiffs_of_many_tags_or_huge_tiles_are_refused() -> None:
    """Each passes the size checks and costs seconds or hundreds of MB to open: empty comment segments,
    which Pillow walks one at a time; bogus tags, read one at a time; a tile far larger than its image."""
    from bloodcell.data.decode import MAX_JPEG_SEGMENTS, MAX_TIFF_TAGS, ImageError, open_rgb

    whole = jpeg_with_scans(1)
    empty_comment = b"\xff\xfe\x00\x02"
    assert open_rgb(whole[:2] + empty_comment * 100 + whole[2:]).size == (64, 64)
    with pytest.raises(ImageError, match=f"JPEG of more than {MAX_JPEG_SEGMENTS:,} segments"):
        open_rgb(whole[:2] + empty_comment * MAX_JPEG_SEGMENTS + whole[2:])
    private = struct.pack("<HHI", 65000, 3, 1) + struct.pack("<HH", 0, 0)
    assert open_rgb(tiff_with_strips(1, (private,) * 10)).size == (8, 8)
    with pytest.raises(ImageError, match=f"TIFF of {MAX_TIFF_TAGS + 1:,} tags"):
        open_rgb(tiff_with_strips(1, (private,) * (MAX_TIFF_TAGS + 1 - 9)))
    tile = (struct.pack("<HHI", 322, 4, 1) + struct.pack("<I", 16384), struct.pack("<HHI", 323, 4, 1) + struct.pack("<I", 16384))
    with pytest.raises(ImageError, match="8x8 pixels in tiles of 16384x16384"):
        open_rgb(tiff_with_strips(1, tile))


def test_pillow_s_warnings_about_a_malformed_file_do_not_flood_the_log() -> None:
    """One warning per bogus tag, each in its own words, printed again on every upload (25 MB of log from
    a 787 KB file): silenced, the file gets one error of ours."""
    import subprocess
    import sys

    bogus = tuple(struct.pack("<HHI", 40000 + k, 2, 1000) + struct.pack("<I", 8) for k in range(500))  # ASCII of 1,000
    script = ("import sys; from bloodcell.data.decode import ImageError, open_rgb\n"
              "try:\n    open_rgb(sys.stdin.buffer.read())\nexcept ImageError:\n    pass\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], input=tiff_with_strips(1, bogus), capture_output=True,
                          timeout=120, check=True)  # fmt: skip
    assert done.stderr.count(b"\n") < 5, done.stderr[:500]


def png_with_chunks(chunks: int) -> bytes:
    """An 8 x 8 PNG of exactly ``chunks`` chunks, padded with empty private ancillary ones (which decoders skip)."""

    def chunk(kind: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 160)).save(buffer, "PNG")
    png = buffer.getvalue()
    header, pos, parts = png[:8], 8, []
    while pos < len(png):  # the file's own chunks: IHDR, IDAT, IEND
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        parts.append(png[pos : pos + 12 + length])
        pos += 12 + length
    padding = [chunk(b"skIp")] * (chunks - len(parts))
    return header + parts[0] + b"".join(padding) + b"".join(parts[1:])


def test_a_jpeg_cut_or_zero_filled_is_refused_and_one_with_a_trailer_is_not() -> None:
    """Only the stream up to its end-of-image marker counts: what a phone appends after it is not read."""
    from bloodcell.data.decode import ImageError, open_rgb

    buffer = io.BytesIO()
    Image.fromarray(smear(4, size=64)).save(buffer, "JPEG", quality=90)
    whole = buffer.getvalue()
    trailer = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x00\x08" + bytes(range(256)) * 40  # a scan marker in it
    assert open_rgb(whole + trailer).size == (64, 64)
    progressive = jpeg_with_scans(2)
    assert open_rgb(progressive + trailer).size == (64, 64)
    for damaged in (whole[: len(whole) * 2 // 3], whole[: len(whole) // 3] + bytes(len(whole) - len(whole) // 3)):
        with pytest.raises(ImageError, match="truncated"):
            open_rgb(damaged)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A camera's orientation tag: the model sees the picture as a viewer shows it (as the web page does)."""
    from bloodcell.data.decode import open_rgb

    upright = smear(5, size=40)[:, :24]  # 40 high, 24 wide
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # as the sensor wrote it: 24 x 40
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "tagged.png"
    stored.save(path, exif=exif)
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), upright)


#: An XMP packet carrying an orientation, as photo editors write it (Pillow reads it where EXIF has none).
XMP_ORIENTATION = ('<x:xmpmeta xmlns:x="adobe:ns:meta/">'
                   '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                   '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{}"/>'
                   "</rdf:RDF></x:xmpmeta>")  # fmt: skip


def with_orientation(image: Image.Image, where: str, orientation: int) -> bytes:
    """``image`` saved with an orientation tag: in EXIF (JPEG, PNG), a TIFF tag, or XMP (PNG, JPEG)."""
    from PIL import PngImagePlugin

    buffer = io.BytesIO()
    xmp = XMP_ORIENTATION.format(orientation)
    if where == "tiff":
        image.save(buffer, "TIFF", tiffinfo={0x0112: orientation})
    elif where == "png xmp":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp)
        image.save(buffer, "PNG", pnginfo=info)
    elif where == "jpeg xmp":
        image.save(buffer, "JPEG", xmp=xmp.encode())
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, where.split()[0].upper(), exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("where", ["jpeg exif", "png exif", "tiff", "png xmp", "jpeg xmp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_reads_as_pillows_exif_transpose_reads_it(where: str, orientation: int) -> None:
    """The orientation is read by hand (see the next test): on well-formed files it must turn the picture
    exactly as ImageOps.exif_transpose does, EXIF and XMP alike."""
    from PIL import ImageOps

    from bloodcell.data.decode import open_rgb

    data = with_orientation(Image.fromarray(smear(5, size=40)[:, :24]), where, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert expected.shape[:2] == ((24, 40) if orientation >= 5 else (40, 24))  # the tag was read
    np.testing.assert_array_equal(np.asarray(open_rgb(data)), expected)


def mistyped_exif(damage: str) -> bytes:
    """An EXIF block with Orientation 6 and one tag of an unexpected type, as some cameras and editors
    write: WhitePoint (RATIONAL by the standard) as the text "Olympus" (Pillow's write back raises
    TypeError), or Make (text) as a RATIONAL (AttributeError). Pillow reads both."""
    entries = 2
    data_at = 8 + 2 + 12 * entries + 4
    if damage == "text WhitePoint":
        odd, extra = struct.pack("<HHII", 0x013E, 2, 8, data_at), b"Olympus\x00"
    else:
        odd, extra = struct.pack("<HHII", 0x010F, 5, 1, data_at), struct.pack("<II", 1, 2)
    directory = struct.pack("<H", entries) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + odd + b"\0\0\0\0"
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + directory + extra


@pytest.mark.parametrize("damage", ["text WhitePoint", "rational Make"])
def test_a_turned_photo_with_a_mistyped_exif_tag_is_read_upright(tmp_path: Path, damage: str) -> None:
    """ImageOps.exif_transpose rewrote the EXIF block after turning, and that write raised TypeError or
    AttributeError on tags Pillow had read: predict said 'cannot read image', serve 422, export crashed."""

    from bloodcell.data.decode import Decoded, decode_or_reason, open_rgb

    stored = smear(5, size=40)[:, :24]
    path = save(tmp_path / "turned.jpg", Image.fromarray(stored), quality=95, exif=mistyped_exif(damage))
    as_stored = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), np.rot90(as_stored, k=-1))  # 6: turn clockwise
    assert isinstance(decode_or_reason(path, 32), Decoded)


def test_an_orientation_tag_that_cannot_be_read_leaves_the_picture_as_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any failure while reading the tag: the picture as stored, rather than refused."""
    from bloodcell.data.decode import open_rgb

    data = with_orientation(Image.fromarray(smear(5, size=40)[:, :24]), "png exif", 6)

    def unreadable(self: Image.Image) -> Image.Exif:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image.Image, "getexif", unreadable)
    np.testing.assert_array_equal(np.asarray(open_rgb(data)), smear(5, size=40)[:, :24])


def png_16_bit(samples: np.ndarray) -> bytes:
    """A 16-bit RGB (or RGBA) PNG of ``samples`` (uint16, H x W x 3 or 4); Pillow cannot write one."""
    from bloodcell.data.decode import PNG_SIGNATURE

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, channels = samples.shape
    header = struct.pack(">IIBBBBB", width, height, 16, 2 if channels == 3 else 6, 0, 0, 0)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)  # filter 0 before each row
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["tiff", "png", "rgba png"])
@pytest.mark.parametrize("scale", [257, 16, 4096 / 255])
def test_12_bit_data_in_16_bit_colour_is_refused_and_full_range_read(
    tmp_path: Path, kind: str, scale: float
) -> None:
    """Pillow keeps a 16-bit sample's top byte: 12-bit data read as 0-15, a near-black smear classified
    without a word. Below 4,096 everywhere is refused, as 16-bit greyscale is; 4,096 and up is read."""
    import tifffile

    from bloodcell.data.decode import ImageError, open_rgb

    rgb = smear(5, size=32).copy()
    rgb[0, 0] = 255  # the brightest sample: 65,535 (full range), 4,080 (12-bit) or 4,096 (the least accepted)
    samples = np.round(rgb.astype(np.float64) * scale).astype(np.uint16)
    if kind == "rgba png":  # an opaque alpha channel must not count as a bright sample
        samples = np.concatenate([samples, np.full((32, 32, 1), 65_535, np.uint16)], axis=2)
    path = tmp_path / ("smear.tif" if kind == "tiff" else "smear.png")
    if kind == "tiff":
        tifffile.imwrite(path, samples, photometric="rgb")
    else:
        path.write_bytes(png_16_bit(samples))
    if scale == 16:
        with pytest.raises(ImageError, match="16-bit colour image whose samples all fall below 4,096") as err:
            open_rgb(path)
        assert str(path) in str(err.value) and "8-bit RGB" in err.value.reason
    else:
        np.testing.assert_array_equal(np.asarray(open_rgb(path)), samples[..., :3] >> 8)


def test_the_stored_sample_format_is_read_from_tiles_of_every_pillow_this_project_allows(tmp_path: Path) -> None:
    """Pillow 11 keeps an image's tiles as named tuples, Pillow 10 (which pyproject allows) as plain ones:
    reading ``.args`` failed on every image there, with a traceback from every command."""
    from bloodcell.data.decode import _stored_rawmode

    image = Image.open(save(tmp_path / "smear.png", Image.fromarray(smear(5, size=16))))
    named = _stored_rawmode(image)
    assert named == "RGB"
    image.tile = [tuple(tile) for tile in image.tile]  # as Pillow 10 holds them
    assert _stored_rawmode(image) == named


def test_upright_rgb_gives_an_open_image_what_the_file_path_gives(tmp_path: Path) -> None:
    """The one way to prepare a PIL image of one's own (docs/SERVING.md): the same refusals, orientation
    and RGB conversion as decoding the file."""
    import tifffile

    from bloodcell.data.decode import ImageError, decode_image, open_rgb, resize_rgb, upright_rgb

    stored = Image.fromarray(smear(5, size=40)[:, :24])
    turned = save(tmp_path / "turned.jpg", stored, exif=mistyped_exif("text WhitePoint"))
    np.testing.assert_array_equal(np.asarray(upright_rgb(Image.open(turned))), np.asarray(open_rgb(turned)))
    np.testing.assert_array_equal(resize_rgb(upright_rgb(Image.open(turned)), 32), decode_image(turned, 32))
    grey = save(tmp_path / "grey.png", Image.fromarray((smear(5)[..., 0].astype(np.uint16) * 257)))
    with pytest.raises(ImageError, match="16-bit greyscale"):
        upright_rgb(Image.open(grey), str(grey))
    twelve = tmp_path / "twelve.tif"
    tifffile.imwrite(twelve, smear(5).astype(np.uint16) * 16, photometric="rgb")
    with pytest.raises(ImageError, match="twelve.tif: 16-bit colour"):
        upright_rgb(Image.open(twelve), str(twelve))


def test_exact_and_near_duplicates_form_groups(tmp_path: Path) -> None:
    root = two_class_dataset(tmp_path / "d", per_class=4)
    shutil.copy(root / "a" / "img_001.png", root / "a" / "img_010.png")  # exact copy
    Image.open(root / "b" / "img_002.png").save(root / "b" / "img_011.jpg", quality=70)  # re-encoded: near
    manifest = build_index(root, progress=False).manifest.set_index("path")
    assert manifest.at["a/img_001.png", "exact_group"] == manifest.at["a/img_010.png", "exact_group"]
    assert manifest.at["a/img_001.png", "dup_group"] == manifest.at["a/img_010.png", "dup_group"]
    assert manifest.at["b/img_002.png", "exact_group"] != manifest.at["b/img_011.jpg", "exact_group"]
    assert manifest.at["b/img_002.png", "dup_group"] == manifest.at["b/img_011.jpg", "dup_group"]
    others = manifest.drop(index=["a/img_001.png", "a/img_010.png", "b/img_002.png", "b/img_011.jpg"])
    assert others["dup_group"].is_unique  # unrelated images stay singletons
    summary = build_index(root, progress=False).summary
    assert (summary["exact_duplicate_groups"], summary["near_duplicate_groups"]) == (1, 1)


def test_phash_distances_below() -> None:
    hashes = ["0000000000000000", "0000000000000003", "ffffffffffffffff", "00000000000003ff"]
    i, j = phash_distances_below(hashes, 2, chunk=2)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1)]
    i, j = phash_distances_below(hashes, NEAR_DUPLICATE_MAX_DISTANCE)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 3), (1, 3)]


def test_rows_sharing_a_hash_are_grouped_without_comparing_every_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rows with one hash (a blank field) join one group; only the distinct hashes are compared."""
    from bloodcell.data.index import duplicate_groups

    hashes = ["0000000000000000"] * 50 + ["0000000000000001"] * 30 + ["ffffffffffffffff"] * 20 + ["000000000000ffff"]
    manifest = pd.DataFrame({"path": [f"{k:03d}.jpg" for k in range(len(hashes))], "sha256": [str(k) for k in range(len(hashes))],
                             "phash": hashes, "rejected": False})  # fmt: skip
    compared: list[int] = []
    real = index_module.phash_distances_below
    monkeypatch.setattr(index_module, "phash_distances_below", lambda h, d: compared.append(len(h)) or real(h, d))
    groups = duplicate_groups(manifest)["dup_group"].to_numpy()
    assert compared == [4]
    assert len(set(groups[:80])) == 1 and len(set(groups[80:100])) == 1 and groups[0] != groups[80] != groups[100]
    assert groups[100] not in groups[:100]  # 16 bits from the zeros: not a near duplicate (10 at most)


def test_an_index_of_some_classes_keeps_the_others_in_the_hash_cache(aria_dataset: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`index --classes` (a model's classes) shares the folder's hash cache: it emptied the cache of the other
    classes' files, and the next full index hashed them all again."""
    build_index(aria_dataset, progress=False)
    (aria_dataset / "Original" / "Pro" / "WBC-Malignant-Pro-003.jpg").unlink()  # gone: no entry kept for it
    build_index(aria_dataset, class_names=["Benign", "Early Pre-B"], progress=False)
    calls: list[Path] = []
    real_inspect = index_module.inspect_file
    monkeypatch.setattr(index_module, "inspect_file", lambda path: calls.append(Path(path)) or real_inspect(path))
    build_index(aria_dataset, progress=False)
    assert calls == []
    cache = pd.read_csv(next(build_index(aria_dataset, progress=False).manifest_path.parent.glob("hash-cache-*.csv")))
    assert len(cache) == 4 * 24 - 1 and "Pro/WBC-Malignant-Pro-003.jpg" not in set(cache["path"])


def test_second_run_reuses_the_hash_cache(aria_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_index(aria_dataset, progress=False)
    calls: list[Path] = []
    real_inspect = index_module.inspect_file

    def counting(path: Path) -> dict:
        calls.append(Path(path))
        return real_inspect(path)

    monkeypatch.setattr(index_module, "inspect_file", counting)
    second = build_index(aria_dataset, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(first.manifest, second.manifest)
    assert sha256_file(first.manifest_path) == sha256_file(second.manifest_path)
    written = first.manifest_path.stat()
    build_index(aria_dataset, progress=False)  # up to date: not written again (a read-only work folder serves)
    assert (first.manifest_path.stat().st_ino, first.manifest_path.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    changed = aria_dataset / "Original" / "Pro" / "WBC-Malignant-Pro-003.jpg"
    Image.fromarray(smear(5, size=48)).save(changed, quality=90)
    third = build_index(aria_dataset, progress=False)
    assert calls == [changed.resolve()]
    assert third.manifest.set_index("path").at["Pro/WBC-Malignant-Pro-003.jpg", "sha256"] == sha256_file(
        changed
    )

    # New contents of the same size under the old modification time, as `cp -p`, `rsync -t` or `tar x` leave
    # them: the change time tells.
    calls.clear()
    other = aria_dataset / "Original" / "Pro" / "WBC-Malignant-Pro-004.jpg"
    before = other.stat()
    data = bytearray(other.read_bytes())
    data[-3] ^= 0xFF  # inside the entropy-coded data, before the end marker: same size, other bytes
    other.write_bytes(bytes(data))
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (other.stat().st_size, other.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    fourth = build_index(aria_dataset, progress=False)
    assert calls == [other.resolve()]
    assert fourth.manifest.set_index("path").at["Pro/WBC-Malignant-Pro-004.jpg", "sha256"] == sha256_file(other)

    calls.clear()
    monkeypatch.setattr(index_module, "DECODER_VERSION", index_module.DECODER_VERSION + 1)  # new decoding rules
    build_index(aria_dataset, progress=False)
    assert len(calls) == len(third.manifest)  # every file judged again: no verdict of the old decoder is kept


@pytest.mark.slow
def test_real_data_index(real_data: Path) -> None:
    result = build_index(real_data, progress=False)
    manifest = result.manifest
    assert result.summary["images"] == 2576 and result.summary["accepted"] == 2576
    assert result.summary["classes"] == {"Benign": 380, "Early Pre-B": 789, "Pre-B": 771, "Pro-B": 636}
    folders = (
        manifest["path"]
        .str.split("/")
        .str[0]
        .map({"Benign": "Benign", "Early": "Early Pre-B", "Pre": "Pre-B", "Pro": "Pro-B"})
    )
    assert (folders == manifest["class"]).all()
    exact = manifest[manifest.groupby("exact_group")["path"].transform("size") > 1]
    # README states these counts of the dataset: 40 identical-file groups (pairs) and 75 near-duplicate groups
    # (55 by the perceptual hash, the rest joined by shifted re-captures of one field).
    assert result.summary["exact_duplicate_groups"] == 40
    assert set(exact["class"]) == {"Pro-B"}
    groups = manifest.set_index("path")
    assert (
        groups.at["Pro/WBC-Malignant-Pro-011.jpg", "exact_group"]
        == groups.at["Pro/WBC-Malignant-Pro-012.jpg", "exact_group"]
    )
    # The identical files come as consecutive pairs.
    assert (exact.groupby("exact_group")["capture"].agg(lambda c: c.max() - c.min()) == 1).all()
    assert result.summary["near_duplicate_groups"] == 75
    # A field re-captured 46 captures later, shifted (phash 12+ bits apart), which a review found split
    # between test and validation: one group now.
    assert groups.at["Pro/WBC-Malignant-Pro-475.jpg", "dup_group"] == groups.at["Pro/WBC-Malignant-Pro-429.jpg", "dup_group"]


def test_segmented_variant_groups_duplicates_by_the_original_pictures(aria_dataset: Path) -> None:
    # Black masked backgrounds make unrelated segmented images hash alike; the Original decides.
    for k, (folder, stem) in enumerate((("Benign", "WBC-Benign-005"), ("Pro", "WBC-Malignant-Pro-007"))):
        black = np.zeros((48, 48, 3), dtype=np.uint8)
        black[k, k] = 255  # different bytes, same perceptual hash
        Image.fromarray(black).save(aria_dataset / "Segmented" / folder / f"{stem}.jpg", quality=95)
    original = build_index(aria_dataset, progress=False).manifest.set_index("path")
    segmented = build_index(aria_dataset, "Segmented", progress=False).manifest.set_index("path")
    pairs = ["Benign/WBC-Benign-005.jpg", "Pro/WBC-Malignant-Pro-007.jpg"]
    assert segmented.at[pairs[0], "phash"] == segmented.at[pairs[1], "phash"]
    assert segmented.at[pairs[0], "sha256"] != segmented.at[pairs[1], "sha256"]
    assert segmented.at[pairs[0], "dup_group"] != segmented.at[pairs[1], "dup_group"]
    same_partition = pd.factorize(segmented.loc[original.index, "dup_group"])[0]
    np.testing.assert_array_equal(same_partition, pd.factorize(original["dup_group"])[0])


def test_one_picture_filed_under_two_classes_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=12, size=32, segmented=False)
    shutil.copyfile(root / "Original" / "Benign" / "WBC-Benign-003.jpg", root / "Original" / "Pro" / "WBC-Malignant-Pro-050.jpg")
    with caplog.at_level("WARNING", logger="bloodcell.data.index"):
        build_index(root, progress=False)
    assert "1 duplicate group(s) hold images filed under different classes" in caplog.text
    assert "Benign/WBC-Benign-003.jpg (Benign); Pro/WBC-Malignant-Pro-050.jpg (Pro-B)" in caplog.text


def test_a_large_mixed_duplicate_group_is_named_in_a_few_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One picture copied under two classes many times: the warning names one image of each class and a
    few more, then how many it leaves out, instead of every member."""
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=12, size=32, segmented=False)
    source = root / "Original" / "Benign" / "WBC-Benign-003.jpg"
    for number in range(50, 60):
        shutil.copyfile(source, root / "Original" / "Benign" / f"WBC-Benign-{number:03d}.jpg")
    shutil.copyfile(source, root / "Original" / "Pro" / "WBC-Malignant-Pro-050.jpg")
    with caplog.at_level("WARNING", logger="bloodcell.data.index"):
        build_index(root, progress=False)
    assert "1 duplicate group(s) hold images filed under different classes" in caplog.text
    assert "Benign/WBC-Benign-003.jpg (Benign); Pro/WBC-Malignant-Pro-050.jpg (Pro-B); " in caplog.text
    assert "; and 8 more" in caplog.text
    assert caplog.text.count("WBC-Benign-0") == 3  # 003 and two more of the 11 Benign copies


def test_the_pixel_limit_named_is_bloodcells_and_a_larger_one_is_honoured(tmp_path: Path) -> None:
    """Pillow refuses at open beyond twice its own guard (about 179 MP): its number must not stand in for
    ours, and a limit set above it (serve --max-side 20000) must be the one applied."""
    from bloodcell.data.decode import ImageError, open_rgb

    bomb = bomb_png(tmp_path / "bomb.png", 30_000, 30_000).read_bytes()
    with pytest.raises(ImageError, match=r"(900,000,000|30000x30000) pixels exceeds the limit of 64,000,000 pixels"):
        open_rgb(bomb)
    with pytest.raises(ImageError) as raised:  # within the raised limits: decoding is tried (the data are empty)
        open_rgb(bomb_png(tmp_path / "big.png", 15_000, 15_000).read_bytes(), max_pixels=20_000**2, max_side=20_000)
    assert "too large" not in str(raised.value)


def test_decoding_in_threads_leaves_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    """``warnings.catch_warnings`` swaps the process-wide filter list: threads entering and leaving it at
    once (a server decoding uploads) left a stray filter behind and let Pillow's bomb warning through."""
    import threading
    import warnings

    from bloodcell.data.decode import ImageError, open_rgb

    bomb = bomb_png(tmp_path / "bomb.png", 10_000, 10_000).read_bytes()  # over Pillow's guard: it warns at open

    def decode_many() -> None:
        for _ in range(400):
            with pytest.raises(ImageError, match="too large"):
                open_rgb(bomb)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        threads = [threading.Thread(target=decode_many) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert warnings.filters == before
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_names_without_numbers_are_said_to_make_no_sessions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for k, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        for cls in ("a", "b"):
            save(tmp_path / "data" / cls / f"{name}.jpg", Image.fromarray(smear(k + (10 if cls == "b" else 0))))
    with caplog.at_level("WARNING", logger="bloodcell.data.index"):
        build_index(tmp_path / "data", progress=False)
    assert "8 of the 8 images" in caplog.text and "not capture order" in caplog.text


def squashed_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not square" in r.getMessage()]


def test_images_that_are_not_square_are_named_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = two_class_dataset(tmp_path / "data", per_class=4)
    # 640 x 480 and 1,920 x 1,080 camera frames, at a size a test decodes quickly.
    save(root / "a" / "img_002.png", Image.fromarray(smear(2)).resize((64, 48)))
    save(root / "b" / "img_004.png", Image.fromarray(smear(4)).resize((64, 36)))
    with caplog.at_level("WARNING", logger="bloodcell.data.index"):
        build_index(root, progress=False)
        build_index(root, progress=False)  # train indexes the data more than once: still one warning
    assert squashed_records(caplog) == [
        f"2 of the 8 images of {root} are not square; resizing to a square squashes the cells along the longer side "
        "by up to 44 % (b/img_004.png: 64x36); crop the images to squares to keep the cells' shape"
    ]


def test_square_and_nearly_square_images_give_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = two_class_dataset(tmp_path / "data", per_class=4)
    save(root / "a" / "img_002.png", Image.fromarray(smear(2)).resize((64, 62)))  # 3 %: a trimmed edge
    with caplog.at_level("WARNING", logger="bloodcell.data.index"):
        build_index(root, progress=False)
    assert squashed_records(caplog) == []
    # The line is drawn at 5 %: 64 x 61 (4.7 %) passes, 64 x 60 (6.3 %) is named, whichever side is longer.
    assert squashed_note([("a.png", 64, 61), ("b.png", 61, 64), ("c.png", 64, 64)]) is None
    assert squashed_note([("a.png", 60, 64)]) == ("1 of the 1 images is not square; resizing to a square squashes the "
                                                  "cells along the longer side by up to 6 % (a.png: 60x64); crop the "
                                                  "images to squares to keep the cells' shape")  # fmt: skip


def test_hashing_in_worker_processes_gives_the_serial_rows_and_never_outnumbers_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(210):  # the pool is used from 200 files on
        path = tmp_path / f"{k:03d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    serial = index_module._inspect_all(paths, workers=1, progress=False)
    pools: list[int] = []
    pool_class = index_module.ProcessPoolExecutor

    def counted_pool(max_workers: int):
        pools.append(max_workers)
        return pool_class(max_workers=max_workers)

    monkeypatch.setattr(index_module, "ProcessPoolExecutor", counted_pool)
    monkeypatch.setattr(index_module, "available_cores", lambda: 2)
    assert index_module._inspect_all(paths, workers=8, progress=False) == serial
    assert pools == [2]

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool on a machine with one core")

    monkeypatch.setattr(index_module, "available_cores", lambda: 1)
    monkeypatch.setattr(index_module, "ProcessPoolExecutor", no_pool)
    assert index_module._inspect_all(paths, workers=8, progress=False) == serial


def test_a_file_over_the_decoder_s_size_limit_is_rejected_by_the_index_unread(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The index refuses what the cache build would (with the same reason), and hashes it as a stream."""
    from bloodcell.data import decode

    path = tmp_path / "big.png"
    Image.new("RGB", (8, 8)).save(path)
    with open(path, "ab") as handle:
        handle.write(bytes(4096))  # past IEND: a decoder would never read it
    monkeypatch.setattr(index_module, "MAX_FILE_BYTES", 4000)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 4000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    facts = index_module.inspect_file(path)
    assert facts["rejected"] and facts["reason"].startswith("file too large")
    assert facts["sha256"] == sha256_file(path)
    with pytest.raises(decode.ImageError, match="file too large"):
        decode.decode_image(path, 32)


def test_hash_like_names_are_said_to_carry_no_capture_order(caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    names = [f"Benign/{hashlib.md5(bytes([k])).hexdigest()}.png" for k in range(40)]
    manifest = pd.DataFrame({"path": names, "rejected": False, "class": "Benign",
                             "capture": [index_module.parse_capture(n)[0] for n in names]})  # fmt: skip
    assert (manifest["capture"] >= 0).all()  # digits in every name: the older check said nothing
    with caplog.at_level("WARNING"):
        index_module._warn_of_names_without_numbers(manifest, Path("hashes"))
    assert "share no name stem with another" in caplog.text
    caplog.clear()
    numbered = pd.DataFrame({"path": [f"Benign/WBC-Benign-{k:03d}.jpg" for k in range(40)], "rejected": False, "class": "Benign",
                             "capture": range(40)})  # fmt: skip
    with caplog.at_level("WARNING"):
        index_module._warn_of_names_without_numbers(numbered, Path("aria"))
    assert "share no name stem" not in caplog.text


def test_date_and_time_names_are_a_capture_series_a_day_not_each_a_series_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2024-03-12_10-15-30.tif: read by its seconds, every minute was a series of one file, so a microscope
    camera's names were said to be hash-like and the class was taken to have no capture order (no capture
    neighbours left out beside training images when another copy of the data was evaluated)."""
    from bloodcell.data.splits import _in_capture_order

    names = [f"Benign/2024-03-{12 + k // 30:02d}_10-{k % 30 + 10:02d}-{(7 * k) % 60:02d}.tif" for k in range(60)]
    manifest = pd.DataFrame({"path": names, "rejected": False, "class": "Benign", "label": 0,
                             "capture": [index_module.parse_capture(n)[0] for n in names]})  # fmt: skip
    assert {index_module.capture_series(n) for n in names} == {"Benign/2024-03-12_", "Benign/2024-03-13_"}
    capture_order = sorted(names, key=lambda n: (index_module.capture_series(n), index_module.parse_capture(n)))
    assert capture_order == names  # the names' time order
    with caplog.at_level("WARNING"):
        index_module._warn_of_names_without_numbers(manifest, Path("camera"))
    assert caplog.text == ""
    assert _in_capture_order(manifest)


def test_a_second_shot_in_the_same_second_stays_beside_the_first() -> None:
    """2024-03-12_09-30-00_1.jpg: with a digit after the time, the name fell back to its last number, a series
    of its own that sorted after the whole day's, far from the shot beside it."""
    names = [f"Benign/2024-03-12_{h:02d}-{m:02d}-00.jpg" for h in (9, 10, 11) for m in range(0, 60, 10)]
    names.insert(4, "Benign/2024-03-12_09-30-00_1.jpg")
    capture_order = sorted(names, key=lambda n: (index_module.capture_series(n), index_module.parse_capture(n)))
    assert capture_order == names


def test_a_counter_after_a_date_keeps_one_series_in_counter_order() -> None:
    """20210315_0059 and 20210315_0060: read as a time of day where the digits could be one (0059) and as a
    counter where not (0060), one session became two series, and images next to each other in capture order
    landed in training and in a held-out part with no embargo between them."""
    names = [f"Benign/20210315_{k:04d}.jpg" for k in range(1, 201)]
    assert {index_module.capture_series(n) for n in names} == {"Benign/20210315_"}
    assert [index_module.parse_capture(n)[0] for n in names] == list(range(1, 201))


def test_a_slide_number_last_in_the_names_is_said_to_be_no_capture_order(caplog: pytest.LogCaptureFixture) -> None:
    """field7_slide3.jpg: the number the split orders by is the slide's, each "series" holds the few slides of
    one field, and every block mixes the slides, without a word before."""
    names = [f"Benign/field{f}_slide{s}.png" for f in range(1, 13) for s in range(1, 5)]
    manifest = pd.DataFrame({"path": names, "rejected": False, "class": "Benign",
                             "capture": [index_module.parse_capture(n)[0] for n in names]})  # fmt: skip
    with caplog.at_level("WARNING"):
        index_module._warn_of_names_without_numbers(manifest, Path("fields"))
    assert "lie in name series of 5 files or fewer (Benign/field1_slide: 4 files)" in caplog.text
    assert "sub-folder of their class folder" in caplog.text
    caplog.clear()
    # a few images a patient, in the patients' sub-folders: the advice is followed already
    patients = [f"{c}/p{p:02d}/img_{k:03d}.png" for c in ("Benign", "Pro-B") for p in range(6) for k in range(4)]
    manifest = pd.DataFrame({"path": patients, "rejected": False, "class": [n.split("/")[0] for n in patients],
                             "capture": [index_module.parse_capture(n)[0] for n in patients]})  # fmt: skip
    with caplog.at_level("WARNING"):
        index_module._warn_of_names_without_numbers(manifest, Path("patients"))
    assert caplog.text == ""
    sessions = [f"Benign/P{p:02d}_{k:03d}.png" for p in range(4) for k in range(20)]  # series of 20: fine
    manifest = pd.DataFrame({"path": sessions, "rejected": False, "class": "Benign", "capture": [int(n[-7:-4]) for n in sessions]})
    with caplog.at_level("WARNING"):
        index_module._warn_of_names_without_numbers(manifest, Path("sessions"))
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("planar", "dtype", "compression", "refused"),
    [
        ("separate", np.uint16, None, "16-bit samples stored one plane a channel"),
        ("separate", ">u2", None, "16-bit samples stored one plane a channel"),  # big-endian
        ("contig", np.float32, None, "floating-point samples"),
        ("contig", np.uint32, None, "32-bit samples"),
        ("contig", np.uint16, None, None),
        ("separate", np.uint8, None, None),
        ("separate", np.uint16, "zlib", None),
        ("separate", np.uint16, "packbits", None),  # compressed: libtiff reads it, not Pillow's raw reader
    ],
)
def test_colour_tiffs_the_image_library_misreads_are_refused_not_read_as_stripes(
    planar: str, dtype: str, compression: str | None, refused: str | None
) -> None:
    """Pillow reads an uncompressed 16-bit colour TIFF in separate planes as 8-bit samples: stripes, which
    the bundled model read as Benign with 0.78 confidence; float and 32-bit colour it cannot open."""
    import tifffile

    from bloodcell.data.decode import ImageError, open_rgb

    rgb = smear(5, size=32)
    wide = np.dtype(dtype)
    pixels = (rgb.astype(wide) / 255 if wide.kind == "f" else rgb.astype(wide) * (257 if wide.itemsize == 2 else 1))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels.transpose(2, 0, 1) if planar == "separate" else pixels, photometric="rgb",
                     planarconfig=planar, compression=None if compression == "packbits" else compression,
                     rowsperstrip=32)  # fmt: skip
    data = packbits_strips(buffer.getvalue()) if compression == "packbits" else buffer.getvalue()
    if refused is None:
        assert np.array_equal(np.asarray(open_rgb(data)), rgb)
    else:
        with pytest.raises(ImageError, match=refused) as raised:
            open_rgb(data)
        assert "8-bit RGB" in raised.value.reason


def packbits_strips(data: bytes) -> bytes:
    """A little-endian, uncompressed TIFF with its strips re-coded as PackBits literal runs (tifffile needs
    the imagecodecs package to write PackBits itself). Each strip's bytes go to the end of the file."""
    out = bytearray(data)
    directory = struct.unpack("<I", out[4:8])[0]
    entries = {}
    for k in range(struct.unpack("<H", out[directory : directory + 2])[0]):
        at = directory + 2 + 12 * k
        tag, kind, count = struct.unpack("<HHI", out[at : at + 8])
        entries[tag] = (at, "<" + ("H" if kind == 3 else "I") * count)

    def where(tag: int) -> int:  # a tag's values: in its entry when they fit, else at the offset it holds
        at, fmt = entries[tag]
        return at + 8 if struct.calcsize(fmt) <= 4 else struct.unpack("<I", out[at + 8 : at + 12])[0]

    offsets_fmt, counts_fmt = entries[273][1], entries[279][1]
    offsets = struct.unpack(offsets_fmt, out[where(273) : where(273) + struct.calcsize(offsets_fmt)])
    counts = struct.unpack(counts_fmt, out[where(279) : where(279) + struct.calcsize(counts_fmt)])
    new_offsets, new_counts = [], []
    for offset, count in zip(offsets, counts):
        raw = bytes(data[offset : offset + count])
        coded = b"".join(bytes([len(raw[i : i + 128]) - 1]) + raw[i : i + 128] for i in range(0, len(raw), 128))
        new_offsets.append(len(out))
        new_counts.append(len(coded))
        out += coded
    out[where(273) : where(273) + struct.calcsize(offsets_fmt)] = struct.pack(offsets_fmt, *new_offsets)
    out[where(279) : where(279) + struct.calcsize(counts_fmt)] = struct.pack(counts_fmt, *new_counts)
    out[entries[259][0] + 8 : entries[259][0] + 10] = struct.pack("<H", 32773)  # Compression: PackBits
    return bytes(out)


def test_a_tiff_tag_of_no_values_reads_as_unset() -> None:
    """A SampleFormat of count 0 (its value field unused) read as 'floating point' refused an 8-bit TIFF."""
    from bloodcell.data.decode import _first_tiff_value

    entry = struct.pack("<HHI", 339, 3, 0) + struct.pack("<HH", 3, 0)
    assert _first_tiff_value(entry, b"", "little") == 0
    assert _first_tiff_value(struct.pack("<HHI", 339, 3, 1) + struct.pack("<HH", 3, 0), b"", "little") == 3


@pytest.mark.parametrize("content", [b"h", b"hi", b"BM", b"BM\x00", b"\x89P", b"II*", b"\xff\xd8\xff", b"GIF8"])
def test_a_file_of_a_few_bytes_is_refused_as_no_image_not_a_crash(content: bytes) -> None:
    """Pillow's signature checks unpack 4 bytes (BMP's among them): a 1-3 byte file raised struct.error out
    of the refusal itself, and index, train and demo stopped with a traceback."""
    from bloodcell.data.decode import ImageError, open_rgb

    with pytest.raises(ImageError):
        open_rgb(content)


@pytest.mark.parametrize("patch", ["count 0", "signed short"])
def test_an_odd_compression_tag_on_a_planar_16_bit_tiff_is_refused_not_read_as_stripes(patch: str) -> None:
    """Pillow takes a Compression tag it cannot read as none, and its raw reader then makes stripes."""
    import tifffile

    from bloodcell.data.decode import ImageError, open_rgb

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (smear(5, size=32).astype(np.uint16) * 257).transpose(2, 0, 1), photometric="rgb",
                     planarconfig="separate")  # fmt: skip
    data = bytearray(buffer.getvalue())
    directory = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[directory : directory + 2])[0]):
        at = directory + 2 + 12 * k
        if struct.unpack("<H", data[at : at + 2])[0] == 259:  # Compression
            if patch == "count 0":
                data[at + 4 : at + 8] = struct.pack("<I", 0)
            else:
                data[at + 2 : at + 4] = struct.pack("<H", 8)  # SSHORT
    with pytest.raises(ImageError, match="stored one plane a channel"):
        open_rgb(bytes(data))


@pytest.mark.parametrize("damage", ["cut mid-row", "garbage number", "carriage return"])
def test_a_damaged_hash_cache_is_rebuilt_not_trusted(tmp_path: Path, damage: str) -> None:
    """A cache cut inside its last row read "False" as text, cast to True: every image rejected for ever."""
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=3, size=32, segmented=False)
    first = build_index(root, progress=False)
    cache = next(first.manifest_path.parent.glob("hash-cache-*.csv"))
    text = cache.read_text()
    if damage == "cut mid-row":
        cache.write_text(text[: text.rstrip("\n").rfind(",") + 3])  # ends "...,Fa"
    elif damage == "garbage number":
        lines = text.splitlines()
        lines[1] = lines[1].replace(lines[1].split(",")[1], "x1", 1)
        cache.write_text("\n".join(lines) + "\n")
    else:  # a name with a carriage return, as macOS's Icon\r files have, is skipped, never written there
        (root / "Original" / "Benign" / "odd\rname.jpg").write_bytes((root / "Original" / "Benign").iterdir().__next__().read_bytes())
    again = build_index(root, progress=False)
    assert (~again.manifest["rejected"]).sum() == (~first.manifest["rejected"]).sum() == 12
    build_index(root, progress=False)  # and the cache it wrote reads back


def test_a_macosx_folder_beside_the_data_is_no_class(tmp_path: Path) -> None:
    """Zip archives made on macOS carry __MACOSX/ with ._name.jpg resource forks beside the data: beside a
    wrapper folder it made a dataset of two classes, "__MACOSX" and the wrapper's name."""
    from bloodcell.data.layouts import find_dataset
    from bloodcell.errors import UserError
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "d" / "leukemia", per_class=3, size=32, segmented=False)
    for top in (tmp_path / "d", root):
        forks = top / "__MACOSX" / "leukemia" / "Original" / "Benign"
        forks.mkdir(parents=True)
        (forks / "._WBC-Benign-001.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert list(find_dataset(root).classes) == list(CLASSES)  # beside the data: ignored
    # Beside a wrapper: no merged classes; the one folder beside __MACOSX is looked into
    assert find_dataset(tmp_path / "d").top == root.resolve()
    (tmp_path / "d" / "notes").mkdir()
    (tmp_path / "d" / "notes" / "figure.png").write_bytes((root / "Original" / "Pro" / "WBC-Malignant-Pro-001.jpg").read_bytes())
    with pytest.raises(UserError, match=r"leukemia holds a dataset of its own .* give .*leukemia as the dataset"):
        find_dataset(tmp_path / "d")


def test_the_manifest_s_hash_is_of_the_text_this_index_wrote(aria_dataset: Path) -> None:
    """Another index of the folder (another --classes selection) may rewrite manifest.csv before a command
    reads it back: the recorded identity must be of the manifest this run used."""
    result = build_index(aria_dataset, progress=False)
    assert result.manifest_sha256 == sha256_file(result.manifest_path)
    result.manifest_path.write_text("rewritten by another index\n")
    assert result.manifest_sha256 != sha256_file(result.manifest_path)  # held, not read back
