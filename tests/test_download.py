"""``bloodcell data download`` against a fake Kaggle API on 127.0.0.1: the real kagglehub code path, no network.

kagglehub talks to Kaggle through kagglesdk: ``POST /api/v1/datasets.DatasetApiService/GetDataset`` for the
current version, then ``POST .../DownloadDataset``, which Kaggle answers with a redirect to the archive.
The server below answers both like Kaggle does, so version lookup, redirect, streaming download, unpacking
and the completion marker all run for real.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.data.download import download_dataset
from bloodcell.errors import UserError


def _archive(source: Path) -> bytes:
    """Zip a dataset folder the way Kaggle ships it (class folders at the top of the archive)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*.jpg")):
            archive.write(path, path.relative_to(source).as_posix())
    return buffer.getvalue()


class FakeKaggle:
    """A tiny Kaggle API: dataset metadata, a redirecting download endpoint, and the archive blob."""

    def __init__(self, archive: bytes, status: int = 200) -> None:
        self.archive, self.status, self.calls = archive, status, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(
                self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                fake.calls.append((self.path, request))
                if fake.status != 200:
                    body = json.dumps({"code": fake.status, "message": "Unauthenticated"}).encode()
                    self._send(fake.status, body, "application/json")
                elif self.path.endswith("/GetDataset"):
                    self._send(200, json.dumps({"currentVersionNumber": 3}).encode(), "application/json")
                elif self.path.endswith("/DownloadDataset"):
                    self._send(302, b"", "text/plain", {"Location": "/blobs/leukemia.zip"})
                else:
                    self._send(404, b"{}", "application/json")

            def do_GET(self) -> None:
                fake.calls.append((self.path, None))
                if self.path == "/blobs/leukemia.zip":
                    self._send(200, fake.archive, "application/zip")
                else:
                    self._send(404, b"", "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kaggle_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[callable]:
    """Route kagglesdk to a local URL; the production endpoint is made unreachable so nothing leaks out."""
    from kagglesdk import kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, "http://127.0.0.1:9")
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))  # no user credentials file
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLEHUB_CACHE"):
        monkeypatch.delenv(name, raising=False)

    def point_at(url: str) -> None:
        monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.LOCAL, url)

    yield point_at


class _CurrentStdout:
    """Whatever ``sys.stdout`` is when written to: what kagglehub's console handler holds in a real run (the
    process's stdout), while CliRunner swaps ``sys.stdout`` per invocation."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture
def kagglehub_logs_to_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point kagglehub's console log handler at stdout, as kagglehub/logger.py does when it is imported."""
    import kagglehub  # noqa: F401 - configures its logger

    for handler in logging.getLogger("kagglehub").handlers:
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", _CurrentStdout())


@pytest.fixture
def resumable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make kagglehub treat FakeKaggle like Kaggle's storage, which sends ``Accept-Ranges: bytes``: an archive
    already in the cache is then resumed, or counted as 'already complete' when it has the full size."""
    import kagglehub.clients

    monkeypatch.setattr(kagglehub.clients, "_is_resumable", lambda response: True)


def _damaged(archive: bytes) -> bytes:
    """The same archive, the same size, with one byte of file data changed (a 'Bad CRC-32' on unpacking)."""
    middle = len(archive) // 2
    return archive[:middle] + bytes([archive[middle] ^ 0xFF]) + archive[middle + 1 :]


def test_download_unpacks_caches_and_prints_data_root(
    aria_dataset: Path, tmp_path: Path, kaggle_endpoint, kagglehub_logs_to_stdout
) -> None:
    cache = tmp_path / "cache"
    with FakeKaggle(_archive(aria_dataset)) as fake:
        kaggle_endpoint(fake.url)
        result = CliRunner().invoke(app, ["data", "download", "--cache", str(cache), "--json"])
        assert result.exit_code == 0, result.output
        # stdout holds the one JSON object and nothing else; kagglehub's progress goes to stderr.
        path = Path(json.loads(result.stdout)["path"])
        assert "Extracting files" in result.stderr
        downloads = sum(1 for p, _ in fake.calls if p == "/blobs/leukemia.zip")

        # The printed folder is a dataset the rest of the tool reads, inside the chosen cache and version.
        from bloodcell.data.layouts import find_dataset

        found = find_dataset(path)
        assert found.layout == "aria" and len(found.files) == 4 * 24
        assert cache.resolve() in path.parents and "versions/3" in path.as_posix()
        request = next(body for p, body in fake.calls if p.endswith("/GetDataset"))
        assert request == {"ownerSlug": "mehradaria", "datasetSlug": "leukemia"}

        # A second call is served from the cache: metadata only, no second archive download.
        assert download_dataset(cache=cache) == path
        assert sum(1 for p, _ in fake.calls if p == "/blobs/leukemia.zip") == downloads == 1

        # Without --json, stdout is the path alone: what `--data "$(bloodcell data download)"` needs.
        text = CliRunner().invoke(app, ["data", "download", "--cache", str(cache), "--force"])
        assert text.exit_code == 0, text.output
        assert text.stdout == f"{path}\n"
        assert "Downloading to" in text.stderr


@pytest.mark.parametrize("damage", [_damaged, lambda archive: b"<html>an error page</html>"],
                         ids=["bad-crc", "not-an-archive"])  # fmt: skip
def test_a_damaged_archive_is_removed_so_the_next_run_downloads_it_again(
    aria_dataset: Path, tmp_path: Path, kaggle_endpoint, resumable_host, damage: Callable[[bytes], bytes]
) -> None:
    """kagglehub leaves an archive it failed to unpack in its cache, and from a resumable host counts it as
    'already complete' on every later run: the failure would repeat forever unless the archive goes."""
    cache, good = tmp_path / "cache", _archive(aria_dataset)
    folder = cache / "datasets" / "mehradaria" / "leukemia"
    with FakeKaggle(damage(good)) as fake:
        kaggle_endpoint(fake.url)
        with pytest.raises(UserError, match=r"is damaged \((BadZipFile|ValueError).*removed the damaged download.*"
                                            r"a new run downloads it again"):  # fmt: skip
            download_dataset(cache=cache)
        assert not list(folder.glob("*.archive")) and not (folder / "versions" / "3").exists()

        fake.archive = good  # the next download arrives intact
        path = download_dataset(cache=cache)
        assert sum(1 for p, _ in fake.calls if p == "/blobs/leukemia.zip") == 2
    assert "versions/3" in path.as_posix() and (folder / "3.complete").exists()


def test_force_downloads_again_over_a_damaged_archive_left_in_the_cache(
    aria_dataset: Path, tmp_path: Path, kaggle_endpoint, resumable_host
) -> None:
    """kagglehub's own force_download clears only a complete version; --force also clears what a failed run
    left (an archive of the full size, a half-unpacked version folder), and nothing complete besides."""
    cache, good = tmp_path / "cache", _archive(aria_dataset)
    folder = cache / "datasets" / "mehradaria" / "leukemia"
    (folder / "versions" / "3").mkdir(parents=True)
    (folder / "versions" / "3" / "half-unpacked.jpg").write_bytes(b"")
    (folder / "3.archive").write_bytes(_damaged(good))
    (folder / "versions" / "2" / "kept.txt").parent.mkdir(parents=True)
    (folder / "versions" / "2" / "kept.txt").write_text("a complete older version")
    (folder / "2.complete").write_text("")
    # A file of version 1 that another user of a shared cache downloaded alone (dataset_download(h, path=...)):
    # kagglehub marks it in .complete/1/, never with 1.complete.
    (folder / "versions" / "1" / "Original").mkdir(parents=True)
    (folder / "versions" / "1" / "Original" / "x.jpg").write_bytes(b"a file")
    (folder / ".complete" / "1" / "Original").mkdir(parents=True)
    (folder / ".complete" / "1" / "Original" / "x.jpg.complete").write_text("")
    with FakeKaggle(good) as fake:
        kaggle_endpoint(fake.url)
        result = CliRunner().invoke(app, ["data", "download", "--cache", str(cache), "--force"])
        assert result.exit_code == 0, result.output
        assert sum(1 for p, _ in fake.calls if p == "/blobs/leukemia.zip") == 1
    assert Path(result.stdout.strip()).is_dir() and (folder / "3.complete").exists()
    assert (
        not (folder / "versions" / "3" / "half-unpacked.jpg").exists() and not (folder / "3.archive").exists()
    )
    assert (folder / "versions" / "2" / "kept.txt").exists() and (folder / "versions" / "1" / "Original" / "x.jpg").exists()


def test_offline_a_copy_downloaded_before_is_used(aria_dataset: Path, tmp_path: Path, kaggle_endpoint,
                                                  caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """kagglehub asks Kaggle for the current version first: offline, the complete cached copy is the answer."""
    cache = tmp_path / "cache"
    with FakeKaggle(_archive(aria_dataset)) as fake:
        kaggle_endpoint(fake.url)
        online = download_dataset(cache=cache)
    kaggle_endpoint("http://127.0.0.1:9")  # now offline
    with caplog.at_level("WARNING", logger="bloodcell.data.download"):
        assert download_dataset(cache=cache) == online
    assert "could not reach Kaggle; using the copy of mehradaria/leukemia downloaded before" in caplog.text
    with pytest.raises(
        UserError, match="could not reach Kaggle"
    ):  # a version never downloaded: no copy to use
        download_dataset("mehradaria/leukemia/versions/2", cache=cache)


def test_download_without_credentials_says_how_to_fix(tmp_path: Path, kaggle_endpoint) -> None:
    with FakeKaggle(b"", status=401) as fake:
        kaggle_endpoint(fake.url)
        with pytest.raises(UserError, match=r"HTTP 401.*kaggle\.json.*KAGGLE_USERNAME"):
            download_dataset(cache=tmp_path / "cache")


def test_download_offline_says_so(tmp_path: Path, kaggle_endpoint) -> None:
    kaggle_endpoint("http://127.0.0.1:9")  # the discard port: connection refused, as when offline
    with pytest.raises(UserError, match="could not reach Kaggle"):
        download_dataset(cache=tmp_path / "cache")


def test_download_rejects_a_malformed_handle(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="expected owner/name"):
        download_dataset("not-a-handle", cache=tmp_path / "cache")
    with pytest.raises(UserError, match="'..' are not names"):  # would reach outside the cache's folder
        download_dataset("../leukemia", cache=tmp_path / "cache")


def test_a_download_that_holds_no_dataset_is_an_error_not_a_path(tmp_path: Path) -> None:
    from bloodcell.data.download import find_data_root

    (tmp_path / "dl" / "docs").mkdir(parents=True)
    (tmp_path / "dl" / "docs" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no dataset bloodcell can read"):
        find_data_root(tmp_path / "dl")
