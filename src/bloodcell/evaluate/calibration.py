"""Temperature scaling (Guo et al. 2017): one scalar that makes predicted probabilities honest.

A network trained to near-zero loss is over-confident; dividing its logits by a temperature T > 1 fitted
on held-out (validation) data fixes most of that without changing any prediction (argmax is unchanged).
The temperature is stored in the model card (``card.temperature``) and every predictor divides the logits
by it before the softmax.

Pure numpy/scipy: a bounded 1-D search on the negative log-likelihood, which for a single parameter is
as exact as LBFGS and cannot diverge.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from bloodcell.models.card import ModelCard, load_card, save_card

log = logging.getLogger(__name__)

#: The search range of log(T): T in [0.05, 20] covers every sane network.
LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))


def nll_at_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_probs[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature that minimises validation NLL.

    Parameters
    ----------
    logits: validation logits ``(N, K)`` of the model (without temperature).
    labels: their true labels ``(N,)``.

    Returns T > 0: 1.0 when there is nothing to fit on, or when every validation image is already read
    right (then the likelihood keeps rising as T falls, and the search would stop at its bound, 0.05,
    sharpening every later prediction twentyfold on no evidence). Raises ``ValueError`` on NaN or infinite
    logits.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    broken = int((~np.isfinite(logits)).any(axis=1).sum())
    if broken:
        raise ValueError(f"{broken} of {len(logits)} validation logits are NaN or infinite; no temperature can be fitted")
    if (logits.argmax(axis=1) == labels).all():
        log.warning("every one of the %d validation images is read right: no temperature can be fitted, T stays 1",
                    len(labels))  # fmt: skip
        return 1.0
    # Searching log(T) keeps T positive and treats "twice as hot" and "twice as cold" alike.
    result = minimize_scalar(
        lambda log_t: nll_at_temperature(logits, labels, float(np.exp(log_t))),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def save_temperature(model_path: str | Path | None, temperature: float, metrics: dict | None = None) -> ModelCard:
    """Store a fitted temperature (and optionally evaluation metrics) in a model's card, atomically.

    Parameters
    ----------
    model_path: anything :func:`bloodcell.models.resolve_model_dir` accepts.
    temperature: the fitted temperature.
    metrics: merged into ``card.metrics`` (e.g. ``{"test": {...}}``) when given.

    Returns the updated card.
    """
    card, directory = load_card(model_path)
    update: dict = {"temperature": float(temperature)}
    if metrics:
        update["metrics"] = {**card.metrics, **metrics}
    card = card.model_copy(update=update)
    save_card(card, directory)
    return card
