"""The web page in a real browser: Playwright drives the system's Chromium against a live uvicorn server.

Skipped only when Chromium is missing and CI is not 'true' (CI installs it; see .ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bloodcell.serve.app import create_app
from conftest import DEFAULT_DATA
from serve_support import infer_speed_module, real_images

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
CLASSES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


def chromium_or_skip() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    message = f"{CHROMIUM} not found (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI=true the browser tests must run")
    pytest.skip(message)


@contextmanager
def running(app) -> Iterator[str]:
    """uvicorn serving ``app`` on a free loopback port in a background thread; yields the base URL."""
    import uvicorn

    bench = infer_speed_module()
    port = bench.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        bench.wait_until_healthy(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def server_url(tiny_model: Path) -> Iterator[str]:
    """The tiny model served with the PyTorch backend (Grad-CAM available)."""
    with running(create_app(tiny_model, warm_up=True)) as url:
        yield url


@contextmanager
def browser_page(server_url: str):
    """A Chromium page on ``server_url`` that fails the test if it requests anything from elsewhere."""
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.set_default_timeout(30_000)
            blocked: list[str] = []
            # The page must load nothing from anywhere but the server itself.
            page.on("request", lambda request: None if request.url.startswith((server_url, "data:", "blob:")) else blocked.append(request.url))
            page.goto(server_url + "/")
            yield page
            assert not blocked, f"the page requested outside resources: {blocked}"
        finally:
            browser.close()


@pytest.fixture
def page(server_url: str):
    with browser_page(server_url) as page:
        yield page


@pytest.fixture(scope="module")
def smear_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real smear image: from the team dataset when it is present, else one the package ships."""
    from bloodcell.demo import sample_images

    root = Path(os.environ.get("BLOODCELL_DATA", DEFAULT_DATA))
    real = real_images(root, per_class=1) if (root / "Original").is_dir() else [p for p, _ in sample_images()]
    target = tmp_path_factory.mktemp("upload") / ("smear.jpg")
    shutil.copyfile(real[-1], target)
    return target


def wait_until_decoded(image, timeout: float = 30.0) -> None:
    """Wait until an <img> has loaded and decoded a picture (bounded; no eval, the page's CSP forbids it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if image.evaluate("el => el.complete && el.naturalWidth > 0"):
            return
        time.sleep(0.1)
    raise AssertionError("image never decoded")


def test_upload_shows_class_bars_and_overlay(page, smear_image: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    disclaimer = page.locator("#disclaimer")
    expect(disclaimer).to_be_visible()
    assert "not a medical device" in disclaimer.inner_text().lower()
    expect(page.locator("#model-info")).to_contain_text("tiny-test-model")

    page.set_input_files("#file-input", str(smear_image))
    expect(page.locator("#predicted-class")).not_to_be_empty()
    predicted = page.locator("#predicted-class").inner_text()
    assert predicted in CLASSES
    assert page.locator("#result").is_visible()
    # One bar per class, the predicted one highlighted.
    assert page.locator("#bars .bar-row").count() == 4
    assert page.locator("#bars .bar-row.top").get_attribute("data-class") == predicted
    # The uploaded image and the Grad-CAM overlay are both shown, side by side, and actually decoded.
    expect(page.locator("#overlay")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    wait_until_decoded(page.locator("#overlay"))
    wait_until_decoded(page.locator("#preview"))
    preview_box, overlay_box = page.locator("#preview").bounding_box(), page.locator("#overlay").bounding_box()
    assert overlay_box["x"] > preview_box["x"] + preview_box["width"] / 2 and abs(overlay_box["y"] - preview_box["y"]) < 5
    assert disclaimer.is_visible()
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_tiff_upload_is_classified_and_its_preview_explained(page, smear_image: Path, tmp_path: Path) -> None:
    """Chromium cannot show TIFF, which the server reads: the page says so instead of a broken image."""
    from PIL import Image
    from playwright.sync_api import expect

    tiff = tmp_path / "smear.tif"
    Image.open(smear_image).save(tiff)
    page.set_input_files("#file-input", str(tiff))
    expect(page.locator("#predicted-class")).not_to_be_empty()
    assert page.locator("#predicted-class").inner_text() in CLASSES
    expect(page.locator("#preview-caption")).to_contain_text("cannot display this file format")
    wait_until_decoded(page.locator("#overlay"))


def test_drop_and_bad_file_show_errors(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Drag and drop: dispatch a real drop event carrying a file on the drop zone.
    page.evaluate(
        """async () => {
            const bytes = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]);
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "notes.jpg", {type: "image/jpeg"}));
            const zone = document.getElementById("drop-zone");
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }"""
    )
    expect(page.locator("#error")).to_be_visible()
    message = page.locator("#error").inner_text()
    assert "notes.jpg" in message and "not an image" in message
    assert message.count("notes.jpg") == 1  # the API names the file too: the page says it once
    assert not page.locator("#result").is_visible()
    page.screenshot(path=str(tmp_path / "serve-error.png"))
    assert page.locator("#file-input").is_enabled()  # the page stays usable


DROP_FILES = """async ({data, names, big}) => {
    const transfer = new DataTransfer();
    for (const name of names) {
        const bytes = name === "notes.jpg" ? new Uint8Array([1, 2, 3, 4]) : new Uint8Array(data);
        transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
    }
    if (big) transfer.items.add(new File([new Uint8Array(big)], "big.jpg", {type: "image/jpeg"}));
    const zone = document.getElementById("drop-zone");
    zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""


def drop_files(page, image: Path, names: list[str], big: int = 0) -> None:
    """Drop files named ``names`` (copies of ``image``; ``notes.jpg`` is not an image) and ``big`` zero bytes."""
    page.evaluate(DROP_FILES, {"data": list(image.read_bytes()), "names": names, "big": big})


def test_several_files_fill_a_table_and_a_csv_that_match_the_api(page, server_url: str, smear_image: Path, tmp_path: Path) -> None:
    import csv

    import requests
    from playwright.sync_api import expect

    names = ["one.jpg", "notes.jpg", "two,\"quoted\".jpg", "=HYPERLINK(1).jpg"]
    drop_files(page, smear_image, names)
    expect(page.locator("#status")).to_contain_text("4 images: 3 classified (")
    expect(page.locator("#status")).to_contain_text("1 could not be (see the table)")
    rows = page.locator("#batch-rows tr")
    assert rows.count() == 4
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(4)] == names
    assert "could not classify" in rows.nth(1).inner_text() and "not an image" in rows.nth(1).inner_text()
    assert rows.nth(1).get_by_role("button").is_disabled() and rows.nth(0).get_by_role("button").is_enabled()
    expect(page.locator("#result")).to_be_hidden()  # the detail view waits for a row to be chosen

    with page.expect_download() as download_info:
        page.click("#download-csv")
    saved = tmp_path / "results.csv"
    download_info.value.save_as(saved)
    table = list(csv.DictReader(saved.open(newline="")))
    assert list(table[0]) == ["file", "predicted_class", "confidence", *(f"p_{c}" for c in CLASSES), "error"]  # as predict's
    # A name a spreadsheet would run as a formula is written as text (an apostrophe first), as predict does.
    assert [row["file"] for row in table] == [*names[:3], "'=HYPERLINK(1).jpg"]

    # The same files through the API directly: the page shows and writes what the service answers.
    files = [("files", (name, b"\x01\x02\x03\x04" if name == "notes.jpg" else smear_image.read_bytes(), "image/jpeg")) for name in names]
    api = requests.post(server_url + "/v1/predict/batch", files=files, timeout=60).json()["results"]
    for row, expected in zip(table, api, strict=True):
        if expected.get("error"):
            assert row["predicted_class"] == "" and row["error"] == expected["error"]
            continue
        assert row["predicted_class"] == expected["class"] and row["error"] == ""
        assert abs(float(row["confidence"]) - expected["confidence"]) < 1e-6
        assert all(abs(float(row[f"p_{name}"]) - expected["probabilities"][name]) < 1e-6 for name in CLASSES)

    # A row's "Show" opens its detail view with Grad-CAM; the table stays.
    rows.nth(2).get_by_role("button").click()
    expect(page.locator("#predicted-class")).to_have_text(table[2]["predicted_class"])
    wait_until_decoded(page.locator("#overlay"))
    assert page.locator("#batch").is_visible() and "shown" in (rows.nth(2).get_attribute("class") or "")
    # One file again: the table goes, the detail view stays.
    page.set_input_files("#file-input", str(smear_image))
    expect(page.locator("#status")).to_contain_text(f"{smear_image.name}:")
    expect(page.locator("#batch")).to_be_hidden()


def test_many_files_go_in_batches_of_the_server_limit_and_oversized_ones_are_flagged(tiny_model: Path, smear_image: Path) -> None:
    from playwright.sync_api import expect

    with running(create_app(tiny_model, max_batch_files=2, max_upload_bytes=1024 * 1024)) as url, browser_page(url) as page:
        expect(page.locator("#limits")).to_contain_text("up to 1 MiB")  # the limits have arrived
        batches: list[str] = []
        page.on("request", lambda request: batches.append(request.url) if "/v1/predict/batch" in request.url else None)
        drop_files(page, smear_image, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"], big=1024 * 1024 + 1)
        expect(page.locator("#status")).to_contain_text("6 images: 5 classified (")
        expect(page.locator("#status")).to_contain_text("1 could not be")
        assert len(batches) == 3  # 5 images that fit, 2 a request; the oversized one is never sent
        big = page.locator("#batch-rows tr").nth(5)
        assert "big.jpg" in big.inner_text() and "images up to 1 MiB are accepted" in big.inner_text()
        assert page.locator("#download-csv").is_enabled()
        expect(page.locator("#batch-summary")).to_contain_text("6 images: 5 classified")  # stays with the table


def test_an_upload_limit_under_a_mebibyte_is_shown_in_kibibytes(tiny_model: Path, smear_image: Path) -> None:
    """`serve --max-upload-mb 0.04`: the page said "up to 0.0 MiB"; it words sizes as the server does."""
    from playwright.sync_api import expect

    with running(create_app(tiny_model, max_upload_bytes=int(0.04 * 1024 * 1024))) as url, browser_page(url) as page:
        expect(page.locator("#limits")).to_contain_text("up to 41 KiB and")
        drop_files(page, smear_image, [], big=100 * 1024)
        expect(page.locator("#error")).to_contain_text("the file is 100 KiB; images up to 41 KiB are accepted")


def test_without_the_servers_limits_files_go_one_a_request(tiny_model: Path, smear_image: Path) -> None:
    """If /healthz does not answer, the page cannot know the batch limit: one file a request always fits."""
    from playwright.sync_api import expect

    with running(create_app(tiny_model, max_batch_files=2)) as url, browser_page(url) as page:
        page.route("**/healthz", lambda route: route.fulfill(status=503, body="{}"))
        page.reload()
        batches: list[str] = []
        page.on("request", lambda request: batches.append(request.url) if "/v1/predict/batch" in request.url else None)
        drop_files(page, smear_image, ["a.jpg", "b.jpg", "c.jpg"])
        expect(page.locator("#status")).to_contain_text("3 images: 3 classified (")
        assert len(batches) == 3


def test_a_squashed_image_is_noted_with_its_answer(page, smear_image: Path, tmp_path: Path) -> None:
    """The service's warning that resizing to a square squashes an image is shown with its answer; a square
    image's answer shows none (not the last image's)."""
    from PIL import Image
    from playwright.sync_api import expect

    wide = tmp_path / "wide.png"
    Image.open(smear_image).convert("RGB").resize((200, 120)).save(wide)
    page.set_input_files("#file-input", str(wide))
    expect(page.locator("#warnings")).to_be_visible()
    note = page.locator("#warnings").inner_text()
    assert "200x120 pixels, not square" in note and "40 %" in note and "crop it to a square" in note, note
    expect(page.locator("#status")).to_contain_text("See the note under the class.")
    page.set_input_files("#file-input", str(smear_image))
    expect(page.locator("#status")).to_contain_text(f"{smear_image.name}:")
    expect(page.locator("#warnings")).to_be_hidden()
    drop_files(page, wide, ["one.png", "two.png"])
    expect(page.locator("#status")).to_contain_text("2 images: 2 classified")
    assert page.locator("#batch-rows tr td.class .warning").count() == 2
    assert "200x120 pixels" in page.locator("#batch-rows tr td.class").first.inner_text()


def test_limits_are_shown_and_the_answer_is_announced(page, smear_image: Path) -> None:
    """The accepted sizes are on the page before a file is chosen; the live status line carries the answer."""
    from playwright.sync_api import expect

    expect(page.locator("#limits")).to_contain_text("up to 10 MiB and 4096 \u00d7 4096 pixels")
    page.set_input_files("#file-input", str(smear_image))
    expect(page.locator("#predicted-class")).not_to_be_empty()
    predicted = page.locator("#predicted-class").inner_text()
    expect(page.locator("#status")).to_contain_text(f"{smear_image.name}: {predicted}, probability")
    assert page.locator("#status").get_attribute("aria-live") == "polite"


def test_a_slow_earlier_answer_never_lands_beside_a_later_image(page, smear_image: Path, tmp_path: Path) -> None:
    """Two uploads in quick succession: the first answer arrives last, and must be dropped."""
    from playwright.sync_api import expect

    first = tmp_path / "first.jpg"
    shutil.copyfile(smear_image, first)
    held = []

    def hold_the_first(route) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)  # answered only after the second upload's result is shown

    page.route("**/v1/predict*", hold_the_first)
    page.set_input_files("#file-input", str(first))
    for _ in range(200):  # until the first request is held (bounded: 10 s)
        if held:
            break
        page.wait_for_timeout(50)
    assert len(held) == 1
    page.set_input_files("#file-input", str(smear_image))
    expect(page.locator("#status")).to_contain_text(f"{smear_image.name}:")
    try:
        held[0].continue_()  # now the first answer comes, late
    except Exception:  # noqa: BLE001 - the page cancelled that request, as it may
        pass
    page.wait_for_timeout(1500)
    expect(page.locator("#error")).to_be_hidden()  # the cancelled request is no error to show
    assert smear_image.name in page.locator("#status").inner_text()
    assert smear_image.name in page.locator("#preview-caption").inner_text()


def test_bare_onnx_server_classifies_without_overlay(tiny_onnx: Path, smear_image: Path) -> None:
    from playwright.sync_api import expect

    with running(create_app(tiny_onnx, backend="onnx")) as url, browser_page(url) as page:
        expect(page.locator("#limits")).to_contain_text("up to")  # /healthz has answered
        posts: list[str] = []
        page.on("request", lambda request: posts.append(request.url) if "/v1/predict" in request.url else None)
        page.set_input_files("#file-input", str(smear_image))
        expect(page.locator("#predicted-class")).not_to_be_empty()
        assert page.locator("#predicted-class").inner_text() in CLASSES
        expect(page.locator("#overlay-caption")).to_contain_text("No Grad-CAM overlay")
        expect(page.locator("#overlay-caption")).to_contain_text("PyTorch weights")
        assert not page.locator("#overlay").is_visible() and not page.locator("#error").is_visible()
        # /healthz said this server cannot explain: the image is classified once, without asking for Grad-CAM.
        assert [post.split("?")[1] for post in posts] == ["explain=false"]
        # Without /healthz's word the first refusal is remembered: the next upload is sent once.
        page.route("**/healthz", lambda route: route.fulfill(status=503, body="{}"))
        page.reload()
        posts.clear()
        for expected in (["explain=true", "explain=false"], ["explain=false"]):
            with page.expect_response(lambda response: "explain=false" in response.url):  # the last post's
                page.set_input_files("#file-input", str(smear_image))
            expect(page.locator("#overlay-caption")).to_contain_text("PyTorch weights")
            assert [post.split("?")[1] for post in posts] == expected
            posts.clear()


def test_the_api_docs_render_without_the_internet(page, server_url: str) -> None:
    """/docs draws the API from this server alone (FastAPI's own page loads its script from a CDN, and stays
    blank on a machine without the internet, as this test's browser is)."""
    from playwright.sync_api import expect

    page.goto(server_url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("bloodcell")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert "/v1/predict" in page.locator(".swagger-ui").inner_text()
