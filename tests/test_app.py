"""The web service: every endpoint, every kind of bad request, both backends, concurrent requests."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bloodcell.data.decode import decode_image
from bloodcell.serve.app import create_app
from bloodcell.serve.predictor import TorchPredictor
from serve_support import TINY_SIZE, cell_jpeg, png_bytes

MAX_UPLOAD = 256 * 1024
MAX_SIDE = 1024


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> TestClient:
    return TestClient(create_app(tiny_model, max_upload_bytes=MAX_UPLOAD, max_side=MAX_SIDE, max_batch_files=4))


def post_file(client: TestClient, data: bytes, name: str = "cell.jpg", field: str = "file", query: str = "") -> object:
    return client.post(f"/v1/predict{query}", files={field: (name, data, "application/octet-stream")})


def assert_error(response, status: int, *words: str) -> None:
    """A 4xx JSON error whose ``detail`` says what is wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word.lower() in detail.lower(), detail


def test_healthz_and_model_card(client: TestClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["model"] == {"name": "tiny-test-model", "version": "1.2", "architecture": "bloodnet", "backend": "torch"}
    assert health.json()["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_side": MAX_SIDE, "max_batch_files": 4}
    response = client.get("/v1/model")
    card = response.json()
    assert card["classes"] == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    assert card["input_size"] == TINY_SIZE and card["temperature"] == pytest.approx(1.3)
    assert not {"command", "config", "runtime"} & set(card)  # server folders and command lines stay private
    assert response.headers["x-content-type-options"] == "nosniff"
    too_large = post_file(client, b"\xff" * (MAX_UPLOAD + 200_000))
    assert too_large.status_code == 413 and too_large.headers["x-content-type-options"] == "nosniff"


def test_the_model_card_over_http_shows_listed_sections_only(tiny_model: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """An allowlist: every section the card format defines, and every one bloodcell adds (a refit's temperature
    source, an export's record), is classified, and a key a card gains otherwise is private."""
    from bloodcell.models import ModelCard
    from bloodcell.serve.app import PUBLIC_CARD_KEYS

    private = {"command", "config", "runtime"}  # server folders and command lines
    added = {"temperature_source", "onnx"}  # written by train_run and by export
    assert set(ModelCard.model_fields) | added == set(PUBLIC_CARD_KEYS) | private
    onnx_card = TestClient(create_app(tiny_onnx, backend="onnx")).get("/v1/model").json()
    assert onnx_card["onnx"]["opset"] and not private & set(onnx_card)  # the export's record, over either backend
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    card = json.loads((model / "card.json").read_text(encoding="utf-8"))
    card |= {"command": "bloodcell train --data /srv/lab", "temperature_source": "validation", "lab_notes": "x"}
    (model / "card.json").write_text(json.dumps(card), encoding="utf-8")
    shown = TestClient(create_app(model)).get("/v1/model").json()
    assert shown["temperature_source"] == "validation" and shown["classes"] == card["classes"]
    assert not {"command", "lab_notes"} & set(shown)


def test_index_page_is_self_contained_with_disclaimer(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="file-input"' in html and 'type="file"' in html and "drop" in html.lower()
    assert "not a medical device" in html.lower() and "research use only" in html.lower()
    # Nothing is loaded from elsewhere: no external scripts, styles, fonts or images.
    for marker in ('src="http', "src='http", 'href="http', "@import", "url(http", "cdn"):
        assert marker not in html.lower()
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/v1/predict"]["post"]["responses"]
    html = client.get("/docs")  # its script and style come from this server: the page works offline
    assert html.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert len(assets) >= 2 and all(url.startswith("/docs-assets/") for url in assets), assets
    assert "https://" not in html.text
    for url in assets:
        assert client.get(url).status_code == 200, url
    assert client.get("/redoc").status_code == 404  # its script fetches a logo from a CDN


def test_predict_matches_the_predictor(client: TestClient, tiny_model: Path) -> None:
    data = cell_jpeg(seed=3)
    response = post_file(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = TorchPredictor(tiny_model).predict(decode_image(data, TINY_SIZE)[None])[0]
    probabilities = body["probabilities"]
    assert list(probabilities) == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    assert np.allclose(list(probabilities.values()), expected, atol=1e-6)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert body["class"] == max(probabilities, key=probabilities.get)
    assert body["confidence"] == pytest.approx(max(probabilities.values()))
    assert body["model"]["name"] == "tiny-test-model" and body["model"]["version"] == "1.2"
    assert body["timing_ms"] > 0 and body["filename"] == "cell.jpg"
    assert "explanation" not in body and "medical device" in body["disclaimer"]


def test_predict_with_explanation_returns_overlay_png(client: TestClient) -> None:
    response = post_file(client, cell_jpeg(seed=4, size=120), query="?explain=true")
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    assert explanation["method"] == "gradcam" and explanation["target_class"] == response.json()["class"]
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (120, 120)  # drawn over the uploaded picture
    pixels = np.asarray(overlay.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 5  # a heat map, not a blank image


def test_tta_query_averages_the_eight_views(client: TestClient, tiny_model: Path) -> None:
    """?tta=true gives the model's probabilities averaged over the 8 flips and quarter turns of the image."""
    from bloodcell.data.decode import open_rgb, resize_rgb
    from bloodcell.evaluate.tta import tta_views
    from bloodcell.probabilities import softmax_with_temperature

    data = cell_jpeg(seed=5)
    plain = post_file(client, data).json()["probabilities"]
    tta = post_file(client, data, query="?tta=true").json()["probabilities"]
    assert plain != tta and sum(tta.values()) == pytest.approx(1.0, abs=1e-5)
    predictor = TorchPredictor(tiny_model)
    model_input = resize_rgb(open_rgb(data), predictor.input_size)[None]
    logits = np.mean([predictor.predict_logits(view, False) for view in tta_views(model_input, "d4")], axis=0)
    expected = softmax_with_temperature(logits, predictor.temperature)[0]
    assert [tta[name] for name in predictor.classes] == pytest.approx(expected.tolist(), abs=1e-5)


def test_batch_reports_each_file(client: TestClient) -> None:
    files = [
        ("files", ("a.jpg", cell_jpeg(seed=1), "image/jpeg")),
        ("files", ("broken.jpg", b"not an image at all", "image/jpeg")),
        ("files", ("c.png", png_bytes(64, 48), "image/png")),
    ]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["filename"] for r in body["results"]] == ["a.jpg", "broken.jpg", "c.png"]
    assert body["n_failed"] == 1
    assert "not an image" in body["results"][1]["error"] and body["results"][1]["class"] is None
    assert body["results"][0]["class"] in body["results"][0]["probabilities"]
    single = post_file(client, cell_jpeg(seed=1)).json()["probabilities"]
    assert np.allclose(list(single.values()), list(body["results"][0]["probabilities"].values()), atol=1e-6)


def test_a_squashed_upload_is_named_in_its_warnings(client: TestClient) -> None:
    """Resizing 200 x 120 to the model's square squashes the cells by 40 %: the answer says so, alone and in a
    batch; a square image, or one a few rows short of square, gets no warning."""
    squashed = (
        "the image is 200x120 pixels, not square: resizing it to the model's square input squashes the cells along "
        "its longer side by 40 %; crop it to a square to keep the cells' shape"
    )
    wide = post_file(client, png_bytes(200, 120), "wide.png")
    assert wide.status_code == 200, wide.text
    assert wide.json()["warnings"] == [squashed]
    assert "40 %" in post_file(client, png_bytes(120, 200), "tall.png").json()["warnings"][0]
    for width in (120, 124):  # 124 x 120 is 3 % off square: under MAX_QUIET_SQUASH
        body = post_file(client, png_bytes(width, 120), "square.png").json()
        assert "warnings" not in body and body["class"] in body["probabilities"]  # omitted, not null
    files = [
        ("files", ("wide.png", png_bytes(200, 120), "image/png")),
        ("files", ("square.png", png_bytes(120, 120), "image/png")),
    ]
    results = client.post("/v1/predict/batch", files=files).json()["results"]
    assert [item["warnings"] for item in results] == [[squashed], None]
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("PredictResponse", "BatchItem"):
        assert "off square" in schema[name]["properties"]["warnings"]["description"]  # documented


def jpeg_of(size: int) -> bytes:
    """A valid JPEG of exactly ``size`` bytes: a cell, then zeros after its end-of-image marker (as a phone's
    trailer, which is not read)."""
    image = cell_jpeg(1)
    return image + b"\0" * (size - len(image))


def test_batch_limits(client: TestClient) -> None:
    too_many = [("files", (f"{i}.jpg", cell_jpeg(seed=i), "image/jpeg")) for i in range(5)]
    # The parser stops at the fifth part: a request of many small parts never holds them all in memory.
    assert_error(client.post("/v1/predict/batch", files=too_many), 400, "Too many files", "4")
    two = [("file", (f"{i}.jpg", cell_jpeg(seed=i), "image/jpeg")) for i in range(2)]
    assert_error(client.post("/v1/predict", files=two), 400, "Too many files", "1")
    fields = {f"note{i}": "hello" for i in range(5)}
    assert_error(client.post("/v1/predict", files=two[:1], data=fields), 400, "Too many fields")
    # The limit is the largest size accepted: a file of exactly MAX_UPLOAD bytes is classified, one more is not.
    oversize = [("files", ("a.jpg", jpeg_of(MAX_UPLOAD), "image/jpeg")),
                ("files", ("big.jpg", jpeg_of(MAX_UPLOAD + 1), "image/jpeg"))]  # fmt: skip
    body = client.post("/v1/predict/batch", files=oversize).json()
    assert body["n_failed"] == 1 and "larger than the limit" in body["results"][1]["error"]
    assert body["results"][0]["class"] in body["results"][0]["probabilities"]
    assert_error(client.post("/v1/predict/batch", files={"file": ("a.jpg", cell_jpeg(1), "image/jpeg")}), 422, "files")


def test_oversize_upload_is_413(client: TestClient) -> None:
    assert_error(post_file(client, jpeg_of(MAX_UPLOAD + 1)), 413, "too large", "256 KiB")  # a valid image
    # Far over the limit: refused from Content-Length, before the body is read.
    assert_error(post_file(client, b"\xff" * (MAX_UPLOAD + 200_000)), 413, "too large")


def test_an_upload_at_the_limits_is_accepted(client: TestClient) -> None:
    """The limits are the largest accepted: a file of exactly MAX_UPLOAD bytes, an image MAX_SIDE pixels long."""
    response = post_file(client, jpeg_of(MAX_UPLOAD))
    assert response.status_code == 200, response.text
    for width, height in ((MAX_SIDE, 16), (16, MAX_SIDE)):
        response = post_file(client, png_bytes(width, height), "long.png")
        assert response.status_code == 200, response.text


def test_oversize_streamed_without_length_is_413(client: TestClient) -> None:
    boundary = "bloodcellboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()

    def chunks():  # no Content-Length: the server must count bytes as they arrive
        yield head
        for _ in range(40):
            yield b"\xff" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 413, "too large")


def grey16_png() -> bytes:
    """A 16-bit greyscale PNG, which PIL would clip to a blank white field if converted to RGB."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 40_000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", ("empty",)),
        (b"%PDF-1.4 definitely not an image", ("not an image",)),
        (cell_jpeg(seed=2)[:1500], ("truncated",)),
        (png_bytes(MAX_SIDE + 1, 16), ("dimensions", f"{MAX_SIDE}")),
        (png_bytes(4, 4), ("too small",)),
        (grey16_png(), ("16-bit greyscale", "convert it to 8-bit RGB")),
        (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dXXXX" + bytes(40), ("a broken PNG file",)),
    ],
    ids=["empty", "not-an-image", "truncated", "huge-dimensions", "tiny", "16-bit", "broken-png-header"],
)
def test_bad_images_are_422_with_a_reason(client: TestClient, data: bytes, words: tuple[str, ...]) -> None:
    assert_error(post_file(client, data), 422, *words)


def test_a_max_side_above_8000_raises_the_pixel_guard_with_it(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bloodcell.serve import app as app_module

    limits: dict[str, int] = {}
    real_open = app_module.open_rgb

    def recording_open(data: bytes, **kwargs: int):
        limits.update(kwargs)
        return real_open(data, **kwargs)

    monkeypatch.setattr(app_module, "open_rgb", recording_open)
    response = post_file(TestClient(create_app(tiny_model, max_side=9000)), cell_jpeg(1))
    assert response.status_code == 200, response.text
    assert limits == {"max_pixels": 9000 * 9000, "max_side": 9000}


def test_unsupported_format_is_422(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="GIF")
    assert_error(post_file(client, buffer.getvalue(), name="a.gif"), 422, "unsupported image format 'GIF'")


def test_only_the_accepted_formats_plugins_parse_an_upload(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GIF (or EPS, ICO, ...) is refused without its decoder plugin ever reading the bytes."""
    from PIL import GifImagePlugin

    def reached(*args, **kwargs):
        raise AssertionError("the GIF plugin parsed an upload")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", reached)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="GIF")
    assert_error(post_file(client, buffer.getvalue(), name="a.gif"), 422, "unsupported image format 'GIF'")


def test_a_bigtiff_or_odd_tiff_header_is_refused_before_decoding(client: TestClient) -> None:
    """BigTIFF's 8-byte offsets would slip past the strip count that guards ordinary TIFFs."""
    for header in (b"II+\x00", b"MM\x00+", b"II\x00*", b"MM*\x00"):  # BigTIFF, and the non-standard byte orders
        tiff = header + (8).to_bytes(4, "little") + bytes(64)
        assert_error(post_file(client, tiff, name="slide.tif"), 422, "slide.tif", "BigTIFF, or a TIFF with a non-standard header")


def test_predictions_past_their_upload_are_bounded(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many requests arrive, at most MAX_REQUESTS_AT_WORK read their files into memory and work at
    once (every read happens inside a work slot); the others wait, and all are answered."""
    import threading

    from bloodcell.serve import app as app_module

    monkeypatch.setattr(app_module, "MAX_REQUESTS_AT_WORK", 2)
    client = TestClient(create_app(tiny_model, inference_threads=1))
    service = client.app.state.service
    slots, inside = service._requests_at_work, threading.local()
    holders, peak, lock = [0], [0], threading.Lock()
    # The two requests that hold the slots wait for each other, so the peak is reached whatever the timing.
    meet = threading.Barrier(2, timeout=10)

    class CountedSlots:
        def __enter__(self) -> None:
            slots.acquire()
            inside.holding = True
            with lock:
                holders[0] += 1
                peak[0] = max(peak[0], holders[0])
            meet.wait()

        def __exit__(self, *exc: object) -> None:
            with lock:
                holders[0] -= 1
            inside.holding = False
            slots.release()

    real_read = app_module.Service.read_upload

    def read_inside_a_slot(self, upload):
        assert getattr(inside, "holding", False), "an upload was read outside a work slot"
        return real_read(self, upload)

    monkeypatch.setattr(service, "_requests_at_work", CountedSlots())
    monkeypatch.setattr(app_module.Service, "read_upload", read_inside_a_slot)

    def send(k: int):
        if k % 2:
            return client.post("/v1/predict/batch", files=[("files", ("a.jpg", cell_jpeg(1), "image/jpeg"))])
        return post_file(client, cell_jpeg(1))

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert peak[0] == 2


def test_the_routes_that_do_no_work_never_wait_for_the_thread_pool(client: TestClient) -> None:
    """The page, the health check and the model card are coroutines: a busy service (every worker thread
    inside a prediction) still answers them at once."""
    import inspect

    endpoints = {route.path: route.endpoint for route in client.app.routes if hasattr(route, "endpoint")}
    for path in ("/", "/healthz", "/v1/model"):
        assert inspect.iscoroutinefunction(endpoints[path]), path


def test_wrong_field_and_wrong_encoding_are_422(client: TestClient) -> None:
    assert_error(post_file(client, cell_jpeg(1), field="image"), 422, "file", "required")
    assert_error(client.post("/v1/predict", json={"file": "abc"}), 422, "file")
    assert_error(client.post("/v1/predict", data={"file": "just text"}), 422, "file")
    assert_error(client.post("/v1/predict"), 422, "file")
    assert_error(post_file(client, cell_jpeg(1), query="?explain=maybe"), 422, "explain")
    # A batch's text part is at ["body", "files", "0"]: it says how to send the images too.
    how = "send the image as multipart/form-data"
    assert_error(client.post("/v1/predict/batch", data={"files": "hello"}), 422, "files", how)
    assert_error(client.post("/v1/predict", data={"file": "just text"}), 422, how)


def test_other_errors_are_json(client: TestClient) -> None:
    assert_error(client.get("/v1/nope"), 404, "not found")
    assert_error(client.get("/v1/predict"), 405, "not allowed")
    assert_error(client.post("/healthz", content=b"x" * (128 * 1024)), 413, "too large")


def test_server_survives_bad_requests_and_concurrency(client: TestClient) -> None:
    jobs = [cell_jpeg(seed=i % 3) for i in range(12)] + [b"junk", b""]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda data: post_file(client, data), jobs))
    assert [r.status_code for r in responses] == [200] * 12 + [422, 422]
    by_seed = {i % 3: responses[i].json()["probabilities"] for i in range(12)}
    for i in range(12):  # the same image gives the same answer whichever thread ran it
        assert responses[i].json()["probabilities"] == by_seed[i % 3]
    assert client.get("/healthz").status_code == 200


def test_grad_cam_counts_against_the_inference_limit(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Grad-CAM is a forward and backward pass: it takes an inference slot like a prediction does, so
    explained and plain requests together never run more network passes at once than the slots allow."""
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    def counted(method):
        def wrapper(*args, **kwargs):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                time.sleep(0.05)  # long enough for the threads to overlap if nothing stopped them
                return method(*args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1
        return wrapper

    from bloodcell.explain import gradcam

    monkeypatch.setattr(TorchPredictor, "predict", counted(TorchPredictor.predict))
    monkeypatch.setattr(gradcam, "explain_images", counted(gradcam.explain_images))  # the Grad-CAM's passes
    client = TestClient(create_app(tiny_model))  # one slot: the network uses every core itself
    queries = ["?explain=true", ""] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda query: post_file(client, cell_jpeg(seed=1), query=query), queries))
    assert [r.status_code for r in responses] == [200] * 8
    assert peak[0] == 1


def test_onnx_backend_matches_torch(tiny_model: Path, tiny_onnx: Path) -> None:
    torch_client = TestClient(create_app(tiny_model))
    onnx_client = TestClient(create_app(tiny_onnx, backend="onnx"))
    assert onnx_client.get("/healthz").json()["model"]["backend"] == "onnx"
    data = cell_jpeg(seed=9)
    expected = post_file(torch_client, data).json()["probabilities"]
    got = post_file(onnx_client, data).json()["probabilities"]
    assert max(abs(expected[k] - got[k]) for k in expected) <= 1e-4
    # A bare .onnx file carries no PyTorch weights for Grad-CAM: a clear 400, not a crash, before the upload is
    # decoded (a file that is no image is refused for the explanation, not the image), and /healthz says so.
    assert_error(post_file(onnx_client, data, query="?explain=true"), 400, "pytorch weights")
    assert_error(post_file(onnx_client, b"not an image", query="?explain=true"), 400, "pytorch weights")
    assert "pytorch weights" in onnx_client.get("/healthz").json()["explain_unavailable"].lower()
    assert torch_client.get("/healthz").json()["explain_unavailable"] is None


def test_onnx_backend_from_model_dir_explains(tiny_model: Path) -> None:
    client = TestClient(create_app(tiny_model, backend="onnx"))
    response = post_file(client, cell_jpeg(seed=6), query="?explain=true")
    assert response.status_code == 200, response.text
    assert response.json()["model"]["backend"] == "onnx"
    assert response.json()["explanation"]["overlay_png_base64"]


def test_a_model_without_grad_cam_is_still_served(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network with no feature map to explain still classifies; explain=true says why it cannot."""
    from bloodcell.errors import NoFeatureMap

    def no_feature_map(self, image, target=None, method="gradcam", while_computing=None):
        raise NoFeatureMap("Net: no convolutional feature map found for Grad-CAM; name a layer with --target-layer")

    monkeypatch.setattr(TorchPredictor, "explain", no_feature_map)
    with TestClient(create_app(tiny_model)) as client:  # the context runs the warm-up, which explains once
        assert post_file(client, cell_jpeg(seed=7)).status_code == 200
        assert_error(post_file(client, cell_jpeg(seed=7), query="?explain=true"), 400, "not available", "feature map")
        assert "feature map" in client.get("/healthz").json()["explain_unavailable"]


def test_the_body_limit_stops_reading_at_the_limit() -> None:
    """The middleware itself, not the route's own check behind it: a declared length over the limit is
    refused before any byte is read, and a body without one stops being read once past the limit."""
    import asyncio

    from bloodcell.serve.app import BodySizeLimit, UploadTooLarge

    limit, chunk = 100_000, 10_000
    pulled: list[int] = []

    async def receive():
        pulled.append(chunk)
        return {"type": "http.request", "body": b"\xff" * chunk, "more_body": len(pulled) < 500}

    async def reads_everything(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    middleware = BodySizeLimit(reads_everything, {}, (limit, "too large"))
    declared = {"type": "http", "path": "/v1/predict", "headers": [(b"content-length", str(5 * limit).encode())]}
    asyncio.run(middleware(declared, receive, send))
    assert pulled == [] and sent[0]["status"] == 413
    with pytest.raises(UploadTooLarge):
        asyncio.run(middleware({"type": "http", "path": "/v1/predict", "headers": []}, receive, send))
    assert sum(pulled) <= limit + chunk  # 5 MB offered, about the limit read


def test_a_loopback_service_answers_only_requests_addressed_to_this_machine(tiny_model: Path) -> None:
    """DNS rebinding: a page elsewhere pointing its own name at 127.0.0.1 sends its name as the Host."""
    client = TestClient(create_app(tiny_model, listen_host="127.0.0.1"))
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:8000", "[::1]:8000", "127.0.0.1", "[0:0::1]"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    assert post_file(client, cell_jpeg(1)).status_code == 400  # TestClient's own Host, "testserver"
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:8000", "127.0.0.2", ""):
        assert_error(client.get("/healthz", headers={"host": host}), 400, "refused", "127.0.0.1 or localhost")
    open_client = TestClient(create_app(tiny_model, listen_host="0.0.0.0"))  # on the network: any name reaches it
    assert open_client.get("/healthz", headers={"host": "bloodcell.lab.example"}).status_code == 200


@pytest.mark.parametrize("listen_host", ["127.0.0.2", "127.255.0.9", "::ffff:127.0.0.1", "[::1]", "LocalHost"])
def test_every_loopback_address_is_guarded_and_answers_to_its_own_name(tiny_model: Path, listen_host: str) -> None:
    """Not only 127.0.0.1, localhost and ::1: any of 127.0.0.0/8 and its IPv4-mapped form are this machine."""
    client = TestClient(create_app(tiny_model, listen_host=listen_host))
    assert_error(client.get("/healthz", headers={"host": "rebound.example:8000"}), 400, "refused")
    bare = listen_host.strip("[]")
    own = f"[{bare}]:8000" if ":" in bare else f"{bare}:8000"
    for host in (own, "127.0.0.1:8000", "localhost"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host


def test_is_loopback_knows_the_whole_loopback_range() -> None:
    from bloodcell.serve.app import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.5", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "128.0.0.1", "::ffff:10.0.0.1", "localhost.example", "", "my-laptop"):
        assert not is_loopback(host), host


def test_the_page_and_healthz_answer_head_as_uptime_checkers_ask(client: TestClient) -> None:
    """``curl -I`` and uptime checkers send HEAD: the headers of a GET, no body, not 405."""
    for path in ("/", "/healthz"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == 200, (path, head.text)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert "Content-Security-Policy" in client.head("/").headers
    schema = client.get("/openapi.json").json()
    assert list(schema["paths"]["/healthz"]) == ["get"]  # one operation in the document, as before

