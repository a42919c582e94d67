"""Inference speed of the default model on this machine: PyTorch eager vs ONNX Runtime, end-to-end
``predict`` on a folder of JPEGs vs JPEG decoding alone, and a load test of ``bloodcell serve``.

Usage::

    .venv/bin/python benchmarks/infer_speed.py [--model MODEL] [--images FOLDER] [--duration 5]
        [--load-duration 30] [--clients 16] [--backend onnx] [--skip load] [--json out.json]

Sections (each bounded in time and in count):

1. ``torch`` / ``onnx``: batch-1 latency (median and p99) and batch-64 throughput on decoded images.
2. ``decode``: decoding the JPEGs with the pipeline's own decoder, in as many threads as ``predict``
   decodes in (one per available core): the ceiling for ``predict``. ``predict``: ``predict_files`` on
   the same files (decode + batch + network), and its ratio to that ceiling.
3. ``serve``: ``bloodcell serve`` in a subprocess on 127.0.0.1, ``--clients`` threads each posting an image
   in a loop over one keep-alive connection for ``--load-duration`` seconds: requests/s, p50/p99 latency,
   errors (failed connections and non-200 answers).

MODEL defaults to the bundled default model; without one, the default config's architecture (bloodnet at
160 px) with untrained weights is measured (speed does not depend on the weight values). The images default
to the JPEGs of the team dataset beside the checkout (its Original variant), else synthetic 224 px JPEGs; a
FOLDER given, or a dataset that ``BLOODCELL_DATA`` names, must hold JPEGs. Only loopback traffic, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from benchmark_common import DEFAULT_DATA

REPO = Path(__file__).resolve().parents[1]
#: BLOODCELL_DATA's images, as every benchmark's: the Aria layout's Original variant, or any layout's JPEGs.
DEFAULT_IMAGES = DEFAULT_DATA / "Original" if (DEFAULT_DATA / "Original").is_dir() else DEFAULT_DATA


# -- models and images ---------------------------------------------------------------------------------
def default_model_dir(work: Path) -> tuple[Path, str]:
    """The bundled default model, or the default config's architecture saved untrained into ``work``."""
    from bloodcell.models.card import bundled_model_dir

    bundled = bundled_model_dir()
    if (bundled / "card.json").is_file():
        return bundled, "bundled default model"
    from bloodcell.config import load_config
    from bloodcell.models import ModelCard, build_model, save_model

    config = load_config("default")
    card = ModelCard(
        name="untrained-default",
        architecture=config.model.name,
        arch_kwargs=config.model.kwargs,
        input_size=config.data.image_size,
        normalize=config.normalize,
    )
    model = build_model(card).eval()
    return save_model(model, card, work / "model"), f"untrained {config.model.name} at {config.data.image_size} px (no bundled model)"


def jpeg_files(folder: Path) -> list[Path]:
    """The JPEGs under ``folder`` (recursive); none where it is not a folder."""
    from bloodcell.serve.common import expand_inputs

    if not folder.is_dir():
        return []
    return [p for p in expand_inputs([folder]).files if p.suffix.lower() in {".jpg", ".jpeg"}]


def _no_jpegs(folder: Path) -> str:
    """Why a folder named by hand gives no images."""
    return "holds no JPEGs" if folder.is_dir() else "is not a folder"


def image_files(folder: Path | None, count: int, work: Path) -> tuple[list[Path], str]:
    """Up to ``count`` JPEGs from ``folder`` (recursive), else synthetic 224 px smears written to ``work``."""
    if folder is not None:
        files = jpeg_files(folder)
        if files:
            return files[:count], f"{min(count, len(files))} JPEGs from {folder}"
    from PIL import Image

    from bloodcell.serve.export import synthetic_smears

    target = work / "jpegs"
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(synthetic_smears(min(count, 256), 224, seed=1)):
        path = target / f"smear-{i:04d}.jpg"
        Image.fromarray(array).save(path, quality=90)
        paths.append(path)
    return paths, f"{len(paths)} synthetic 224 px JPEGs"


# -- measurements --------------------------------------------------------------------------------------
def run_for(duration: float, max_iterations: int, step: Callable[[], Any]) -> list[float]:
    """Call ``step`` repeatedly for ``duration`` seconds (at most ``max_iterations`` times); per-call seconds."""
    step()  # warm-up: first calls allocate and pick kernels
    times = []
    deadline = time.perf_counter() + duration
    while len(times) < max_iterations and time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def bench_network(predictor: Any, images: np.ndarray, duration: float) -> dict[str, float]:
    """Batch-1 latency and batch-64 throughput of ``predictor.predict`` on decoded images."""
    batch64 = np.resize(images, (64, *images.shape[1:])) if len(images) < 64 else images[:64]
    singles = itertools.cycle(range(len(images)))
    one = run_for(duration, 5000, lambda: predictor.predict(images[next(singles)][None]))
    many = run_for(duration, 1000, lambda: predictor.predict(batch64))
    return {
        "batch1_ms_p50": percentile(one, 50) * 1000,
        "batch1_ms_p99": percentile(one, 99) * 1000,
        "batch1_images_per_s": len(one) / sum(one),
        "batch64_images_per_s": 64 * len(many) / sum(many),
        "batch64_calls": len(many),
    }


def bench_decode(files: list[Path], size: int, duration: float) -> float:
    """Images/s of decoding (and resizing) the files with the pipeline's decoder, in as many threads as
    ``predict_files`` decodes in (one per available core): the ceiling ``predict`` is measured against."""
    from concurrent.futures import ThreadPoolExecutor

    from bloodcell.data.decode import decode_image
    from bloodcell.machine import available_cores

    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        times = run_for(duration, 50, lambda: list(pool.map(lambda path: decode_image(path, size), files)))
    return len(files) * len(times) / sum(times)


def bench_predict_files(predictor: Any, files: list[Path], duration: float, batch: int = 64) -> float:
    """Images/s of ``predict_files`` (decode + network) over the whole list, repeated within ``duration``."""
    times = run_for(duration, 50, lambda: predictor.predict_files(files, batch=batch))
    return len(files) * len(times) / sum(times)


# -- load test of the HTTP service ---------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``GET /healthz`` until it answers 200; raise after ``timeout`` seconds or if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return
        time.sleep(0.2)
    raise TimeoutError(f"server on port {port} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def serve_process(
    model: str | Path, backend: str = "torch", port: int | None = None, startup_timeout: float = 120, extra: list[str] | None = None
) -> Iterator[int]:
    """Run ``bloodcell serve`` on 127.0.0.1 in a subprocess; yields its port and stops it afterwards."""
    port = port or free_port()
    command = [
        sys.executable, "-m", "bloodcell", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--backend", backend, "--log-level", "warning", *(extra or []),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # The server's log goes to a file: a pipe nobody reads would block the server once it filled up.
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_until_healthy(port, startup_timeout, process)
            except (RuntimeError, TimeoutError) as error:
                log.seek(0)
                raise RuntimeError(f"{error}; server output:\n{log.read()[-3000:]}") from None
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def multipart_body(data: bytes, filename: str = "cell.jpg", field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one file part; returns ``(body, content type)``."""
    boundary = "bloodcell-load-test-boundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load_test(
    port: int,
    images: list[bytes],
    clients: int = 16,
    duration: float = 30.0,
    max_requests: int = 1_000_000,
    path: str = "/v1/predict",
    timeout: float = 30.0,
) -> dict[str, Any]:
    """``clients`` threads post images to ``127.0.0.1:port`` for ``duration`` seconds (or ``max_requests``).

    Each client keeps one connection open and reconnects after an error. Returns requests, errors (by
    kind), requests/s and latency percentiles in milliseconds.
    """
    bodies = [multipart_body(data) for data in images]
    issued = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + duration

    def client(index: int) -> None:
        connection: http.client.HTTPConnection | None = None
        while time.monotonic() < deadline and next(issued) < max_requests:
            body, content_type = bodies[index % len(bodies)]
            start = time.perf_counter()
            try:
                connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                connection.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                kind = None if response.status == 200 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as error:
                kind = type(error).__name__
                if connection is not None:
                    connection.close()
                connection = None
            elapsed = time.perf_counter() - start
            with lock:
                if kind is None:
                    latencies.append(elapsed)
                else:
                    errors[kind] = errors.get(kind, 0) + 1
            index += 1
        if connection is not None:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + timeout + 5)
    wall = time.perf_counter() - started
    n_errors = sum(errors.values())
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(latencies) + n_errors,
        "ok": len(latencies),
        "errors": n_errors,
        "error_kinds": errors,
        "requests_per_s": len(latencies) / wall if wall > 0 else 0.0,
        "latency_ms_p50": percentile(latencies, 50) * 1000,
        "latency_ms_p99": percentile(latencies, 99) * 1000,
        "latency_ms_max": (max(latencies) * 1000) if latencies else float("nan"),
    }


# -- the report ----------------------------------------------------------------------------------------
def _load_average() -> float:
    """The 1-minute load average, where the system keeps one (NaN on Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run or model directory (default: bundled default model)")
    parser.add_argument(
        "--images", type=Path,
        help="folder of JPEGs (recursive; default: BLOODCELL_DATA's or the team dataset's Original variant, "
             "else synthetic JPEGs)",
    )
    parser.add_argument("--n-images", type=int, default=512, help="files for the decode and predict measurements")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per speed measurement")
    parser.add_argument("--load-duration", type=float, default=30.0, help="seconds of the load test")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the load test")
    parser.add_argument("--backend", default="onnx", choices=["torch", "onnx"], help="backend of the served model")
    parser.add_argument("--threads", type=int, help="intra-op threads of both backends (default: the cores)")
    parser.add_argument("--serve-threads", type=int, default=1, help="`bloodcell serve --threads` for the load test")
    parser.add_argument("--skip", action="append", default=[], choices=["torch", "onnx", "predict", "load"], help="skip a section")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.n_images < 1:
        parser.error(f"--n-images must be at least 1, got {args.n_images}")
    for option, value in (("--duration", args.duration), ("--load-duration", args.load_duration)):
        if not value > 0:  # a rate over no time divides by zero
            parser.error(f"{option} must be more than 0 seconds, got {value}")
    for option, count in (("--clients", args.clients), ("--threads", args.threads), ("--serve-threads", args.serve_threads)):
        if count is not None and count < 1:
            parser.error(f"{option} must be at least 1, got {count}")
    # Only the team's default folder may be missing: a folder named by hand (--images, or BLOODCELL_DATA, which
    # every benchmark reads) that holds no JPEGs is a typo, and measuring synthetic images instead would pass
    # for a measurement of the named ones.
    if args.images is not None and not jpeg_files(args.images):
        parser.error(f"--images {args.images} {_no_jpegs(args.images)}")
    if args.images is None and "BLOODCELL_DATA" in os.environ and not jpeg_files(DEFAULT_IMAGES):
        parser.error(f"BLOODCELL_DATA {DEFAULT_DATA} {_no_jpegs(DEFAULT_DATA)} (pass --images FOLDER, or unset "
                     "BLOODCELL_DATA for synthetic JPEGs)")  # fmt: skip

    from rich.console import Console

    from bloodcell.data.decode import decode_image
    from bloodcell.machine import available_cores
    from bloodcell.serve.export import export_onnx
    from bloodcell.serve.onnx_predictor import OnnxPredictor
    from bloodcell.serve.predictor import TorchPredictor

    console = Console(stderr=True)
    results: dict[str, Any] = {"machine": {"cores": available_cores(), "load_average_1m": _load_average()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, model_what = (Path(args.model), args.model) if args.model else default_model_dir(work)
        files, files_what = image_files(args.images or DEFAULT_IMAGES, args.n_images, work)
        results.update({"model": model_what, "images": files_what})
        console.print(f"model: {model_what}; images: {files_what}; load average {results['machine']['load_average_1m']:.2f}")
        torch_predictor = TorchPredictor(model, threads=args.threads)
        size = torch_predictor.input_size
        decoded = np.stack([decode_image(p, size) for p in files[:256]])
        onnx_path = export_onnx(model, work / "onnx" / "model.onnx")  # fresh, and the user's cache is left alone
        onnx_predictor = OnnxPredictor(onnx_path, threads=args.threads)
        results["threads"] = args.threads or available_cores()
        if "torch" not in args.skip:
            results["torch"] = bench_network(torch_predictor, decoded, args.duration)
        if "onnx" not in args.skip:
            results["onnx"] = bench_network(onnx_predictor, decoded, args.duration)
        if "predict" not in args.skip:
            decode_rate = bench_decode(files, size, args.duration)
            predict_rate = bench_predict_files(onnx_predictor, files, args.duration)
            torch_rate = bench_predict_files(torch_predictor, files, args.duration)
            results["predict"] = {
                "decode_only_images_per_s": decode_rate,
                "predict_onnx_images_per_s": predict_rate,
                "predict_torch_images_per_s": torch_rate,
                "onnx_ratio_to_decode": predict_rate / decode_rate,
                "torch_ratio_to_decode": torch_rate / decode_rate,
            }
        if "load" not in args.skip:
            payloads = [p.read_bytes() for p in files[:32]]
            serve_model = onnx_path if args.backend == "onnx" else model
            with serve_process(serve_model, args.backend, extra=["--threads", str(args.serve_threads)]) as port:
                results["serve"] = {
                    "backend": args.backend, "threads": args.serve_threads, **load_test(port, payloads, args.clients, args.load_duration)
                }
    results["machine"]["load_average_1m_end"] = _load_average()
    print_report(results, Console())
    if args.json:
        from bloodcell.io import atomic_write_json

        atomic_write_json(args.json, results)
    return results


def print_report(results: dict[str, Any], console: Any) -> None:
    """One table of every measurement that ran."""
    from rich.table import Table

    table = Table(title=f"inference speed ({results['machine']['cores']} cores, {results['threads']} threads; {results['model']})")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for backend in ("torch", "onnx"):
        if backend in results:
            r = results[backend]
            table.add_row(f"{backend}: batch 1 latency p50 / p99", f"{r['batch1_ms_p50']:.2f} / {r['batch1_ms_p99']:.2f} ms")
            table.add_row(f"{backend}: batch 64 throughput", f"{r['batch64_images_per_s']:,.0f} images/s")
    if "predict" in results:
        r = results["predict"]
        table.add_row("JPEG decode only, in predict's threads", f"{r['decode_only_images_per_s']:,.0f} images/s")
        table.add_row("predict_files, onnx (ratio to decode)", f"{r['predict_onnx_images_per_s']:,.0f} images/s ({r['onnx_ratio_to_decode']:.0%})")
        table.add_row("predict_files, torch (ratio to decode)", f"{r['predict_torch_images_per_s']:,.0f} images/s ({r['torch_ratio_to_decode']:.0%})")
    if "serve" in results:
        r = results["serve"]
        table.add_row(f"serve ({r['backend']}), {r['clients']} clients, {r['seconds']:.0f} s", f"{r['requests_per_s']:,.1f} requests/s")
        table.add_row("serve latency p50 / p99 / max", f"{r['latency_ms_p50']:.0f} / {r['latency_ms_p99']:.0f} / {r['latency_ms_max']:.0f} ms")
        table.add_row("serve errors", f"{r['errors']} of {r['requests']} {r['error_kinds'] or ''}")
    console.print(table)
    console.print(f"load average {results['machine']['load_average_1m']:.2f} at start, {results['machine']['load_average_1m_end']:.2f} at end (machine shared)")


if __name__ == "__main__":
    main()
