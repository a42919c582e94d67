"""The PyTorch predictor: a saved model (run, model directory or the bundled default) on CPU or GPU.

It applies exactly what the model card records: the input size (images are decoded with the same
:func:`~bloodcell.data.decode.decode_image` as the training cache), the normalisation (inside the model)
and the temperature (on the logits).
"""

from __future__ import annotations

import contextlib
import copy
import io
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bloodcell.models.card import load_model
from bloodcell.models.classifier import Classifier, as_batch_tensor
from bloodcell.serve.common import BasePredictor


class TorchPredictor(BasePredictor):
    """Predict with a saved :class:`~bloodcell.models.Classifier` in PyTorch eager mode.

    Parameters
    ----------
    model_path: a run directory, model directory, ``card.json`` path, or None for the bundled default.
    device: ``cpu``, ``cuda``, ``cuda:1`` ...
    tta: test-time augmentation: False, True (the 8 ``d4`` views) or a view set name (``flips``).
    threads: if given, ``torch.set_num_threads(threads)``: process-wide, so only where this process is
        the predictor's (``bloodcell serve``). One thread per single-image call is the fastest choice on
        a busy small CPU: a second intra-op thread waits at every layer for a core (measured here under
        load: batch-1 latency 1.5 ms with 1 thread, 24 ms with 2).

    ``predict`` is thread-safe (inference mode touches no module state); :meth:`explain` runs on a private
    copy of the network under a lock, because Grad-CAM attaches hooks to it.
    """

    backend = "torch"

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "cpu",
        tta: bool | str | None = None,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model, card = load_model(model_path, device=str(self.device))
        super().__init__(card.model_dump(mode="json"), tta)
        self._explain_model: Classifier | None = None
        self._explain_lock = threading.Lock()

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, K)`` float32 of a uint8 NHWC batch (``predict`` sends at most ``MAX_FORWARD_BATCH``)."""
        with torch.inference_mode():
            # NHWC -> NCHW as a view: the memory stays channels-last, which CPU convolutions prefer.
            batch = as_batch_tensor(images).to(self.device).permute(0, 3, 1, 2)
            return self.model(batch).float().cpu().numpy()

    def explain(
        self, image: np.ndarray, target: int | None = None, method: str = "gradcam",
        while_computing: AbstractContextManager[Any] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Grad-CAM heat map ``(input_size, input_size)`` in [0, 1] of one uint8 HWC image.

        ``target`` is the class index to explain (None: the predicted class). ``while_computing`` is held
        around the computation only, once this explainer's turn has come (the service's inference slot: a
        request queued for the explainer must not hold a slot that a prediction could use meanwhile).
        """
        from bloodcell.explain.gradcam import explain_images

        batch = self.check_batch(image[None])
        targets = None if target is None else np.asarray([target])
        with self._explain_lock, while_computing or contextlib.nullcontext():
            if self._explain_model is None:
                self._explain_model = copy.deepcopy(self.model).eval()
            return explain_images(self._explain_model, batch, method=method, targets=targets).cams[0]


def overlay_png(image: np.ndarray, cam: np.ndarray, max_side: int = 512) -> bytes:
    """PNG bytes of a CAM overlaid on ``image`` (any size RGB uint8; the CAM is resized to fit).

    The overlay is drawn at the image's own resolution (capped at ``max_side``) so it lines up with the
    picture a user uploaded, not only with the small model input.
    """
    from PIL import Image

    from bloodcell.explain.gradcam import overlay

    picture = Image.fromarray(image)
    scale = min(1.0, max_side / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.clip(cam * 255.0, 0, 255).astype(np.uint8)).resize(picture.size, Image.Resampling.BILINEAR)
    blended = overlay(np.asarray(picture, dtype=np.uint8), np.asarray(heat, dtype=np.float32) / 255.0)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
