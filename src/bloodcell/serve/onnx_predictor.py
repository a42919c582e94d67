"""The ONNX Runtime predictor: fast CPU inference with no PyTorch import.

It reads ``card.json`` beside the ``.onnx`` file (written by :func:`bloodcell.serve.export.export_onnx`)
for the class names, input size and temperature. The graph takes uint8 NHWC images and returns logits,
so a predictor feeds it the decoded images as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

from bloodcell.errors import ModelFileError
from bloodcell.io import sha256_file
from bloodcell.machine import available_cores
from bloodcell.notices import warn_once
from bloodcell.serve.common import BasePredictor, read_card_json

log = logging.getLogger(__name__)

#: Names of the graph's input and output (fixed at export).
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: Bumped when the exported graph computes differently from the same weights (2: the per-image norm summed
#: in float64). Recorded in the ONNX card: ``ensure_onnx`` exports again over an older one, and a predictor
#: given an older file says so.
GRAPH_VERSION = 2


class OnnxPredictor(BasePredictor):
    """Predict with an exported ``.onnx`` model on ONNX Runtime's CPU provider.

    Parameters
    ----------
    onnx_path: the ``.onnx`` file; its ``card.json`` must sit beside it.
    threads: intra-op threads (None: the cores available to this process, 2 on the team machines).
    tta: test-time augmentation: False, True (the 8 ``d4`` views) or a view set name (``flips``).
    spin: let idle ONNX Runtime threads busy-wait for work. Off by default: the predictor shares the
        cores with decoding threads (``predict_files``) and HTTP handling (``serve``), and spinning
        threads burn the time those need (measured here: 30 % more CPU per image at 2 threads).

    ``predict`` is thread-safe: ONNX Runtime sessions may be run from several threads at once.
    """

    backend = "onnx"

    def __init__(
        self, onnx_path: str | Path, threads: int | None = None, tta: bool | str | None = None, spin: bool = False
    ) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"{self.onnx_path}: no such ONNX file")
        super().__init__(read_card_json(self.onnx_path.parent), tta)
        recorded = (self.card.get("onnx") or {}).get("onnx_sha256")
        if recorded is not None and recorded != sha256_file(self.onnx_path):
            raise ModelFileError(f"{self.onnx_path} is not the graph its {self.onnx_path.parent / 'card.json'} "
                                 "describes (an interrupted export?); export the model again")  # fmt: skip
        exported = self.card.get("onnx")  # None: a card written by hand, which says nothing of the graph
        version = exported.get("graph_version", 1) if exported else GRAPH_VERSION
        if version < GRAPH_VERSION:
            warn_once(log, "%s was exported by an earlier bloodcell (graph version %d, now %d): its probabilities "
                      "may differ from PyTorch's by up to 1e-3; export the model again (bloodcell export)",
                      self.onnx_path, version, GRAPH_VERSION)  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        # One graph runs at a time per call; parallelism lives inside the operators.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are noise for users
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except (InvalidProtobuf, InvalidGraph, Fail) as error:  # a cut or damaged file: not a traceback
            raise ModelFileError(f"{self.onnx_path}: not a usable ONNX graph ({str(error).strip()[:200]}); "
                                 "export the model again (bloodcell export)") from None  # fmt: skip
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != "tensor(uint8)":
            raise ValueError(
                f"{self.onnx_path}: expected a uint8 input named {INPUT_NAME!r} "
                "(export the model with `bloodcell export`)"
            )
        self._check_card_fits_graph(inputs[INPUT_NAME].shape, {o.name: o.shape for o in self.session.get_outputs()})

    def _check_card_fits_graph(self, input_shape: list, output_shapes: dict[str, list]) -> None:
        """Refuse a card whose classes or input size the graph does not have (a card edited or written by
        hand): the answers would name the wrong classes, or fail on the first image."""
        card = self.onnx_path.parent / "card.json"
        outputs = output_shapes.get(OUTPUT_NAME)
        if outputs is None:
            raise ModelFileError(f"{self.onnx_path}: no output named {OUTPUT_NAME!r} (export the model with `bloodcell export`)")
        if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] != len(self.classes):
            raise ModelFileError(f"{card} names {len(self.classes)} classes, but {self.onnx_path.name} gives "
                                 f"{outputs[1]} scores an image")  # fmt: skip
        sides = [side for side in input_shape[1:3] if isinstance(side, int)]
        if any(side != self.input_size for side in sides):
            raise ModelFileError(f"{card} says input_size {self.input_size}, but {self.onnx_path.name} takes "
                                 f"{'x'.join(map(str, sides))} images")  # fmt: skip

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, K)`` float32 of a uint8 NHWC batch (``predict`` sends at most ``MAX_FORWARD_BATCH``)."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})[0]
