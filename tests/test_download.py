"""``bloodcell data download`` against a fake Kaggle API on 127.0.0.1: the real kagglehub code path, no network.

kagglehub talks to Kaggle through kagglesdk: ``POST /api/v1/datasets.DatasetApiService/GetDataset`` for the
current version, then ``POST .../DownloadDataset``, which Kaggle answers with a redirect to the archive.
The server below answers both like Kaggle does, so version lookup, redirect, streaming download, unpacking
and the completion marker all run for real.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Iterator
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


def test_download_unpacks_caches_and_prints_data_root(
    aria_dataset: Path, tmp_path: Path, kaggle_endpoint
) -> None:
    cache = tmp_path / "cache"
    with FakeKaggle(_archive(aria_dataset)) as fake:
        kaggle_endpoint(fake.url)
        result = CliRunner().invoke(app, ["data", "download", "--cache", str(cache), "--json"])
        assert result.exit_code == 0, result.output
        path = Path(json.loads(result.output.strip().splitlines()[-1])["path"])
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
    with pytest.raises(UserError, match="could not reach Kaggle"):  # a version never downloaded: no copy to use
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


def test_a_download_that_holds_no_dataset_is_an_error_not_a_path(tmp_path: Path) -> None:
    from bloodcell.data.download import find_data_root

    (tmp_path / "dl" / "docs").mkdir(parents=True)
    (tmp_path / "dl" / "docs" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no dataset bloodcell can read"):
        find_data_root(tmp_path / "dl")
