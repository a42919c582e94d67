"""Class probabilities from logits: the one softmax every stage uses (evaluation, predictors, benchmarks).

Plain numpy, so the ONNX Runtime predictor can use it without torch or scipy.
"""

from __future__ import annotations

import numpy as np


def softmax_with_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable ``softmax(logits / temperature)`` over the last axis, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled -= scaled.max(axis=-1, keepdims=True)  # exp of at most 0: no overflow
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)
