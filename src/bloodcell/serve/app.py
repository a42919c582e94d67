"""The web service: a FastAPI app over a predictor, with a single-page UI at ``/``.

Endpoints: ``POST /v1/predict`` (one image, ``?explain=true`` adds a Grad-CAM overlay), ``POST
/v1/predict/batch`` (several images, one result or error per image), ``GET /v1/model`` (the model card),
``GET /healthz``, the OpenAPI schema at ``/openapi.json`` with docs at ``/docs``, and ``GET /``.

Inputs are untrusted. The request body is capped before it is parsed (413), uploads are decoded with the
same validating decoder as every other stage (not an image, truncated, too many pixels or too large a
side: 422), and every error is a JSON object ``{"detail": "what is wrong"}`` with a 4xx status. Decoding
and inference run in worker threads, never on the event loop; a semaphore bounds how many inferences run
at once (one when the network uses every core itself, one per core with ``inference_threads=1``), so the
CPU is never oversubscribed, which on a small machine makes every call slower.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bloodcell import __version__
from bloodcell.data.decode import (
    DEFAULT_MAX_PIXELS,
    MAX_QUIET_SQUASH,
    ImageError,
    open_rgb,
    resize_rgb,
    squashed_warning,
)
from bloodcell.errors import NoFeatureMap
from bloodcell.machine import available_cores
from bloodcell.serve.common import BasePredictor, load_predictor, names_onnx_file, torch_weights_beside

log = logging.getLogger("bloodcell.serve")

MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 10 * MB
DEFAULT_MAX_SIDE = 4096
DEFAULT_MAX_BATCH_FILES = 16
#: Room for multipart boundaries and part headers on top of the file bytes themselves.
MULTIPART_OVERHEAD = 64 * 1024
#: Bodies of any other route (none of them takes one) are capped at this.
OTHER_BODY_LIMIT = 64 * 1024
#: Concurrent image decodes: each may hold a 4096x4096 RGB image (48 MB) in memory.
MAX_CONCURRENT_DECODES = 4
#: Prediction requests past their upload at a time: their files read into memory, decoded and classified.
#: The others wait with their uploads spooled (Starlette keeps a file over 1 MB on disk), so that many
#: concurrent batches (each up to 16 files of 10 MiB) cannot all hold their bytes in memory at once.
MAX_REQUESTS_AT_WORK = 8
#: Text fields a prediction request may carry besides its files (none is read; each may hold 1 MB).
MAX_FORM_FIELDS = 4
#: Open connections ``bloodcell serve`` accepts at once (uvicorn answers 503 beyond them).
MAX_CONNECTIONS = 256
#: Model card sections that GET /v1/model shows: what the model is, what it was trained and scored on.
#: Anything else a card holds stays private (see model_card): an allowlist, so that a key a card gains later
#: is not published by default.
PUBLIC_CARD_KEYS = (
    "format", "name", "version", "architecture", "arch_kwargs", "classes", "input_size", "normalize",
    "temperature", "temperature_source", "manifest_sha256", "data_layout", "split", "metrics", "epoch", "versions",
    "created", "intended_use", "onnx",
)  # fmt: skip
#: Where /docs finds Swagger UI's script and style (served from the fastapi-offline package).
DOCS_ASSETS = "/docs-assets"
DISCLAIMER = "Research use only. Not a medical device; not for diagnosis or treatment decisions."
#: Why explain=true is refused on a bare .onnx file (also /healthz's ``explain_unavailable`` there).
EXPLAIN_NEEDS_WEIGHTS = (
    "explain=true needs the model's PyTorch weights, which are not beside this ONNX file; "
    "serve the model directory instead of the .onnx file"
)
#: What the ``warnings`` of a prediction say (the OpenAPI document shows it).
WARNINGS_HELP = (
    f"caveats to read the answer with: an image more than {100 * MAX_QUIET_SQUASH:.0f} % off square, which "
    "resizing to the model's square input squashes, is named with its size and by how much"
)


# -- response schemas (the OpenAPI document falls out of these) ---------------------------------------
class ModelInfo(BaseModel):
    name: str = Field(description="model name from its card")
    version: str = Field(description="model version from its card")
    architecture: str = Field("", description="network architecture")
    backend: str = Field(description="inference backend: torch or onnx")


class Explanation(BaseModel):
    method: str = Field(description="CAM method (gradcam)")
    target_class: str = Field(description="the class the map explains (the predicted class)")
    overlay_png_base64: str = Field(description="PNG of the heat map over the uploaded image, base64")


class PredictResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    filename: str | None = Field(None, description="name of the uploaded file")
    class_: str = Field(alias="class", description="predicted class")
    confidence: float = Field(description="probability of the predicted class")
    probabilities: dict[str, float] = Field(description="probability of every class (temperature-scaled)")
    warnings: list[str] | None = Field(None, description=WARNINGS_HELP + "; absent when there are none")
    model: ModelInfo
    timing_ms: float = Field(description="server time for this request: decode, inference and explanation")
    explanation: Explanation | None = Field(None, description="present when explain=true")
    disclaimer: str = DISCLAIMER


class BatchItem(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    filename: str | None = None
    class_: str | None = Field(None, alias="class", description="predicted class; null when the file failed")
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    warnings: list[str] | None = Field(None, description=WARNINGS_HELP + "; null when there are none")
    error: str | None = Field(None, description="why this file could not be classified")


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="one entry per uploaded file, in order")
    n_failed: int = Field(description="how many files could not be classified")
    model: ModelInfo
    timing_ms: float
    disclaimer: str = DISCLAIMER


class Limits(BaseModel):
    max_upload_bytes: int = Field(description="largest accepted image file, in bytes (413 above it)")
    max_side: int = Field(description="largest accepted image width or height, in pixels (422 above it)")
    max_batch_files: int = Field(description="most files one /v1/predict/batch request may carry")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: ModelInfo
    version: str = Field(description="bloodcell version")
    limits: Limits = Field(description="what an upload may be (the web page shows them before a file is chosen)")
    explain_unavailable: str | None = Field(
        None,
        description="why /v1/predict?explain=true is refused with a 400 (an ONNX file served without its PyTorch "
        "weights, or a network with no feature map for Grad-CAM); null while it is offered",
    )


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong with the request, in words")
    errors: list[dict[str, Any]] | None = Field(None, description="field-level problems (validation errors)")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "malformed request body"),
        (413, "upload larger than the limit"),
        (422, "missing field, not an image, truncated image, unsupported format or image too large"),
    )
}


# -- limits on the request body, enforced before the multipart parser spools anything ---------------
class UploadTooLarge(HTTPException):
    """An upload (or the whole request body) exceeded its limit."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodySizeLimit:
    """ASGI middleware: refuse bodies over a per-path limit, by Content-Length before reading anything,
    or while streaming when the client sends no length.

    ``limits`` maps a path to ``(largest body in bytes, the message a client gets)``.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, tuple[int, str]], default: tuple[int, str]) -> None:
        self.app = app
        self.limits = limits
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message = self.limits.get(scope["path"].rstrip("/") or "/", self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(message)  # FastAPI re-raises HTTPExceptions from body parsing
            return event

        await self.app(scope, limited_receive, send)


class NoSniff:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every response (JSON answers echo uploaded
    file names; a browser must never read them as anything but the type they are sent as)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_with_header)


#: The names a request to this machine's loopback address carries in its Host header (besides the address
#: the service listens on).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address, an IPv6 one with or without brackets, or a name) is this machine's
    loopback: any of 127.0.0.0/8, ``::1``, an IPv4-mapped 127 address (``::ffff:127.0.0.1``, which Python
    before 3.13 does not count), or the name ``localhost``."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower() == "localhost"
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _canonical_host(name: str) -> str:
    """An address in one spelling (``0:0::1`` and ``::1`` alike), any other name in lower case."""
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return name.lower()


class LoopbackHostsOnly:
    """ASGI middleware: answer 400 to a request whose Host header names anything but this machine.

    For a service listening on a loopback address only: a web page elsewhere can point a name of its own
    at 127.0.0.1 (DNS rebinding) and then read this service's answers as its own origin's; the Host header
    its requests must carry gives them away. Starlette's TrustedHostMiddleware makes the same check, but
    answers in plain text (every error of this service is JSON) and cuts IPv6 hosts at their first colon.
    ``listen_host``, the address listened on (127.0.0.2, say), is accepted besides :data:`LOOPBACK_HOSTS`.
    """

    def __init__(self, app: ASGIApp, listen_host: str | None = None) -> None:
        self.app = app
        self.names = {_canonical_host(name) for name in LOOPBACK_HOSTS | ({listen_host} if listen_host else set())}
        self.named = ", ".join(sorted(self.names - {"localhost", "::1"})) + " or localhost"  # for the error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _canonical_host(host := _host_name(scope)) not in self.names:
            detail = (f"Host {host!r} refused: this service listens on this machine's loopback address and "
                      f"answers only requests addressed to {self.named}")  # fmt: skip
            await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _host_name(scope: Scope) -> str:
    """The host a request's Host header names, without its port (``[::1]:8000`` -> ``::1``), in lower case."""
    value = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "").strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _human_bytes(count: int) -> str:
    return f"{count / MB:.1f} MiB" if count >= MB else f"{count / 1024:.0f} KiB"


# -- the service: predictor, explainer, limits ---------------------------------------------------------
class Service:
    """What the routes share: the predictor, the limits, and the locks that make inference thread-safe."""

    def __init__(
        self,
        predictor: BasePredictor,
        max_upload_bytes: int,
        max_side: int,
        explain_source: str | Path | None | Literal[False],
        inference_slots: int = 1,
    ) -> None:
        self.predictor = predictor
        self.max_upload_bytes = max_upload_bytes
        self.max_side = max_side
        # A --max-side above 8,000 raises the decoder's 64-megapixel guard with it, as asked.
        self.max_pixels = max(DEFAULT_MAX_PIXELS, max_side**2)
        self.model_info = ModelInfo(**predictor.model_info, backend=predictor.backend)
        # Inference runs at most ``inference_slots`` at a time: one when the network uses every core
        # itself, one per core when each call is single-threaded.
        self._inference_slots = threading.BoundedSemaphore(inference_slots)
        self._decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
        # A threading semaphore, taken in the worker thread: it works whatever event loop the request came in
        # on, and a request waiting for it holds a pool thread and its upload as Starlette spooled it (a file
        # over 1 MB on disk, a smaller one in memory), never a second copy or a decoded image.
        self._requests_at_work = threading.BoundedSemaphore(MAX_REQUESTS_AT_WORK)
        self._explain_source = explain_source
        self._explainer: Any = predictor if predictor.backend == "torch" else None
        self._explainer_lock = threading.Lock()
        # Known before any upload is read, so explain=true is refused without decoding or classifying it.
        self.explain_unavailable: str | None = EXPLAIN_NEEDS_WEIGHTS if explain_source is False else None

    def decode(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Validate and decode an upload: ``(the image for display, the model input)``; raises ImageError."""
        with self._decode_slots:
            try:
                image = open_rgb(data, max_pixels=self.max_pixels, max_side=self.max_side)
                return np.asarray(image), resize_rgb(image, self.predictor.input_size)
            except ImageError:
                raise
            except Exception as error:  # a crafted file may trip any decoder plugin in any way
                raise ImageError("<upload>", f"cannot decode image ({type(error).__name__})") from error

    def probabilities(self, batch: np.ndarray, tta: bool | None) -> np.ndarray:
        with self._inference_slots:
            return self.predictor.predict(batch, tta=tta)

    def explainer(self) -> Any:
        """The torch predictor used for Grad-CAM (loaded on first use for the ONNX backend)."""
        with self._explainer_lock:
            if self._explainer is None:
                if self._explain_source is False:
                    raise HTTPException(400, EXPLAIN_NEEDS_WEIGHTS)
                from bloodcell.serve.predictor import TorchPredictor

                self._explainer = TorchPredictor(self._explain_source)
            return self._explainer

    def warm_up(self) -> None:
        """Run one prediction, and one explanation when possible, so the first request is not slow
        (the first Grad-CAM imports its libraries and probes the network: seconds on a small CPU)."""
        size = self.predictor.input_size
        image = np.full((size, size, 3), 200, np.uint8)
        self.probabilities(image[None], None)
        if self._explain_source is not False:
            try:
                self.explainer().explain(image)
            except NoFeatureMap as error:  # the service still classifies; explain=true says why it cannot
                self.explain_unavailable = _no_feature_map(error)
                log.warning("Grad-CAM is not available for this model: %s", error)

    def read_upload(self, upload: UploadFile) -> bytes | None:
        """The upload's bytes, or None when it is over the upload limit (the size Starlette counted while
        parsing is checked first, so an oversize file is not read just to be dropped)."""
        if upload.size is not None and upload.size > self.max_upload_bytes:
            return None
        data = upload.file.read(self.max_upload_bytes + 1)  # in a worker thread: the file may be on disk
        return None if len(data) > self.max_upload_bytes else data

    def predict_upload(self, upload: UploadFile, explain: bool, tta: bool | None) -> dict[str, Any] | None:
        """:meth:`predict_one` on an upload, read once a work slot is free; None when it is over the limit."""
        with self._requests_at_work:
            data = self.read_upload(upload)
            return None if data is None else self.predict_one(data, upload.filename, explain, tta)

    def predict_uploads(self, uploads: list[UploadFile], tta: bool | None) -> dict[str, Any]:
        """:meth:`predict_many` on uploads, read once a work slot is free."""
        with self._requests_at_work:
            return self.predict_many([(upload.filename, self.read_upload(upload)) for upload in uploads], tta)

    def predict_one(self, data: bytes, filename: str | None, explain: bool, tta: bool | None) -> dict[str, Any]:
        """Decode, classify and optionally explain one upload; returns the response as a dict."""
        start = time.perf_counter()
        picture, model_input = self.decode(data)
        probs = self.probabilities(model_input[None], tta)[0]
        result = self.predictor.result(filename or "", probs)
        response: dict[str, Any] = {
            "filename": filename,
            "class": result.label,
            "confidence": result.confidence,
            "probabilities": result.probabilities,
            "warnings": _warnings(picture),
            "model": self.model_info,
        }
        if explain:
            from bloodcell.serve.predictor import overlay_png

            target = self.predictor.classes.index(result.predicted_label)
            try:
                # A forward and backward pass: inference work, bounded by the same slots.
                cam = self.explainer().explain(model_input, target=target, while_computing=self._inference_slots)
            except NoFeatureMap as error:
                self.explain_unavailable = _no_feature_map(error)
                raise HTTPException(400, self.explain_unavailable) from None
            response["explanation"] = {
                "method": "gradcam",
                "target_class": result.label,
                "overlay_png_base64": base64.b64encode(overlay_png(picture, cam)).decode("ascii"),
            }
        response["timing_ms"] = round((time.perf_counter() - start) * 1000.0, 3)
        return response

    def predict_many(self, uploads: list[tuple[str | None, bytes | None]], tta: bool | None) -> dict[str, Any]:
        """Classify several uploads in one batch; a bad file gets an ``error`` and the rest still run."""
        start = time.perf_counter()
        items: list[dict[str, Any]] = []
        inputs: list[np.ndarray] = []
        for filename, data in uploads:
            if data is None:
                items.append({"filename": filename, "error": f"file larger than the limit of {_human_bytes(self.max_upload_bytes)}"})
                continue
            try:
                picture, model_input = self.decode(data)
                inputs.append(model_input)
                items.append({"filename": filename, "warnings": _warnings(picture)})
            except ImageError as error:
                items.append({"filename": filename, "error": error.reason})
        probs = iter(self.probabilities(np.stack(inputs), tta) if inputs else [])
        for item in items:
            if item.get("error") is None:
                result = self.predictor.result(item["filename"] or "", next(probs))
                item.update({"class": result.label, "confidence": result.confidence, "probabilities": result.probabilities})
        return {
            "results": items,
            "n_failed": sum(1 for item in items if item.get("error")),
            "model": self.model_info,
            "timing_ms": round((time.perf_counter() - start) * 1000.0, 3),
        }


def _no_feature_map(error: NoFeatureMap) -> str:
    return f"explain=true is not available for this model: {error}"


def _warnings(picture: np.ndarray) -> list[str] | None:
    """The ``warnings`` of a response for the uploaded picture (``height x width x 3``), None when it needs none."""
    height, width = picture.shape[:2]
    squashed = squashed_warning(width, height)
    return [squashed] if squashed else None


def _explain_source(model_path: str | Path | None, predictor: BasePredictor) -> str | Path | None | Literal[False]:
    """Where Grad-CAM's PyTorch weights come from for an already built predictor."""
    if predictor.backend == "torch" or model_path is None or not names_onnx_file(model_path):
        return model_path
    onnx_path = getattr(predictor, "onnx_path", None)
    return torch_weights_beside(Path(onnx_path)) if onnx_path is not None else False


# -- the app ------------------------------------------------------------------------------------------
def create_app(
    model_path: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_side: int = DEFAULT_MAX_SIDE,
    backend: Literal["torch", "onnx"] = "torch",
    *,
    max_batch_files: int = DEFAULT_MAX_BATCH_FILES,
    tta: bool = False,
    predictor: BasePredictor | None = None,
    warm_up: bool = False,
    inference_threads: int | None = None,
    listen_host: str | None = None,
) -> FastAPI:
    """Build the web app for a saved model.

    Parameters
    ----------
    model_path: a run, model directory, card, ``.onnx`` file (ONNX backend), or None for the bundled default.
    max_upload_bytes: largest accepted image file (413 above it).
    max_side: largest accepted image width or height in pixels (422 above it).
    backend: ``torch`` (PyTorch eager) or ``onnx`` (ONNX Runtime; exported on first use if needed).
    max_batch_files: most files one ``/v1/predict/batch`` request may carry.
    tta: test-time augmentation by default (a request's ``tta`` parameter overrides it).
    predictor: an already built predictor (then ``model_path`` is only used for Grad-CAM weights).
    warm_up: run one prediction and one explanation before returning, so the first request is fast.
    inference_threads: threads per inference call (None: the backend's default, all cores, and one
        call at a time). With 1, up to one call per core runs at once: the better choice for many
        small requests on a small CPU. For the torch backend this sets torch's process-wide thread count.
    listen_host: the address the server listens on (``bloodcell serve`` passes its ``--host``). When it is a
        loopback address (:func:`is_loopback`), only requests whose Host header names this machine (that
        address, 127.0.0.1, localhost, ::1) are answered, against DNS rebinding.

    Returns the FastAPI application (run it with uvicorn, see ``bloodcell serve``).
    """
    if predictor is None:
        predictor, explain_source = load_predictor(model_path, backend, tta, inference_threads)
    else:
        explain_source = _explain_source(model_path, predictor)
    slots = max(1, available_cores() // inference_threads) if inference_threads else 1
    service = Service(predictor, max_upload_bytes, max_side, explain_source, inference_slots=slots)
    if warm_up:
        service.warm_up()
    # FastAPI whose /docs loads Swagger UI from this server, not a CDN (blank without the internet). No
    # /redoc: its script fetches a logo from redocly's CDN, a request to elsewhere on every visit.
    app = FastAPIOffline(
        redoc_url=None,
        title="bloodcell",
        version=__version__,
        summary="B-ALL subtype classification of blood-smear images. " + DISCLAIMER,
        description="Upload a blood-smear image, get the predicted B-ALL subtype, class probabilities and, "
        "on request, a Grad-CAM overlay. " + DISCLAIMER,
        static_url=DOCS_ASSETS,
    )
    app.state.service = service
    too_large = f"upload too large: images up to {_human_bytes(max_upload_bytes)} are accepted"
    app.add_middleware(
        BodySizeLimit,
        limits={
            "/v1/predict": (max_upload_bytes + MULTIPART_OVERHEAD, too_large),
            "/v1/predict/batch": (
                max_batch_files * (max_upload_bytes + MULTIPART_OVERHEAD),
                f"request too large: up to {max_batch_files} images of up to {_human_bytes(max_upload_bytes)} each",
            ),
        },
        default=(OTHER_BODY_LIMIT, f"request body too large (limit {_human_bytes(OTHER_BODY_LIMIT)})"),
    )
    if listen_host is not None and is_loopback(listen_host):
        app.add_middleware(LoopbackHostsOnly, listen_host=listen_host)
    app.add_middleware(NoSniff)  # added last, so outermost: the 413s of the body limit get it too
    _add_error_handlers(app)
    page = _index_page()
    limits = Limits(max_upload_bytes=max_upload_bytes, max_side=max_side, max_batch_files=max_batch_files)

    # The routes that do no work are coroutines: they answer at once, never queued behind predictions for
    # the thread pool (a health check must not time out while the service is busy).
    # HEAD as well as GET on the page and /healthz: uptime checkers and `curl -I` ask with HEAD (the server
    # sends the headers alone).
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        # The page loads nothing from elsewhere; the policy makes sure of it.
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        """Liveness and readiness: the model is loaded and answering."""
        return Health(
            model=service.model_info, version=__version__, limits=limits, explain_unavailable=service.explain_unavailable
        )

    # Not in the OpenAPI document: there it would be a second operation with GET's operation id.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], response_model=Health, include_in_schema=False)

    @app.get("/v1/model", tags=["model"])
    async def model_card() -> dict[str, Any]:
        """The model card: architecture, classes in order, input size, temperature, metrics, versions.

        Only the sections in PUBLIC_CARD_KEYS: without the training command line, config and runtime, which
        name the server's folders (the data's, the run's) and whatever was typed to train, nobody's business
        over HTTP, nor any key a card was given that the list does not name.
        """
        return {key: value for key, value in service.predictor.card.items() if key in PUBLIC_CARD_KEYS}

    # Form limits: Starlette holds each part of up to 1 MB in memory and allows 1,000 of them, so a batch of
    # 160 parts just under 1 MB held 160 MB before its file count was checked (measured: 8 such requests
    # took the server from 1.1 to 2.2 GB). The parser now stops at the count a route takes. A few text
    # fields pass, so an image sent as text still gets the 422 that says how to send it.
    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        tags=["predict"],
        form_limits={"max_files": 1, "max_fields": MAX_FORM_FIELDS},
    )
    async def predict(
        file: Annotated[UploadFile, File(description="a JPEG, PNG, BMP or TIFF image")],
        explain: Annotated[bool, Query(description="add a Grad-CAM overlay of the predicted class")] = False,
        tta: Annotated[bool | None, Query(description="test-time augmentation (8 flips and rotations)")] = None,
    ) -> dict[str, Any]:
        """Classify one blood-smear image."""
        if explain and service.explain_unavailable:
            raise HTTPException(400, service.explain_unavailable)  # before the upload is read, decoded or classified
        if file.size is not None and file.size > service.max_upload_bytes:
            raise UploadTooLarge(too_large)  # at once, without waiting for a work slot
        try:
            response = await run_in_threadpool(service.predict_upload, file, explain, tta)
        except ImageError as error:
            raise HTTPException(422, f"{file.filename or 'upload'}: {error.reason}") from None
        if response is None:
            raise UploadTooLarge(too_large)
        return response

    @app.post(
        "/v1/predict/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        tags=["predict"],
        form_limits={"max_files": max_batch_files, "max_fields": MAX_FORM_FIELDS},
    )
    async def predict_batch(
        files: Annotated[list[UploadFile], File(min_length=1, description="JPEG, PNG, BMP or TIFF images (see the limits)")],
        tta: Annotated[bool | None, Query(description="test-time augmentation (8 flips and rotations)")] = None,
    ) -> dict[str, Any]:
        """Classify several images; each result carries its class or the reason that file failed."""
        return await run_in_threadpool(service.predict_uploads, files, tta)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"detail": "..."}`` JSON; nothing a client sends produces a bare 500 page."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in error.errors()
        ]
        summary = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems)
        hint = ""
        # Anywhere in loc: a batch's text part is at ["body", "files", "0"].
        if any({"file", "files"} & set(p["loc"]) for p in problems):
            hint = " (send the image as multipart/form-data: field 'file' for /v1/predict, 'files' for /v1/predict/batch)"
        return JSONResponse({"detail": f"invalid request: {summary}{hint}", "errors": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); the server keeps running"}, status_code=500)


_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _index_page() -> str:
    """The single-page UI, read once from the package."""
    return (resources.files("bloodcell") / "serve" / "static" / "index.html").read_text(encoding="utf-8")
