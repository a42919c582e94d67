"""Training on one CUDA GPU with the step's forward and backward replayed as CUDA graphs.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_train_cuda.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bloodcell.train import fit
from synthetic_data import make_synthetic_data
from test_train import final_weights, history_without_timing, interrupted_then_resumed, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")


@pytest.fixture(scope="module")
def data():
    return make_synthetic_data(per_class=16, size=32)


@pytest.fixture(autouse=True)
def deterministic_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN may pick convolution algorithms that sum in a varying order; bit-for-bit checks need fixed ones."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def cuda_config(**train):
    return tiny_config(train={"accelerator": "cuda", "epochs": 3, **train})


def test_graphed_training_learns_like_the_ordinary_loop(tmp_path: Path, data) -> None:
    graphed = fit(cuda_config(), tmp_path / "graphed", prepared=data, progress=False)
    plain = fit(cuda_config(cuda_graph=False), tmp_path / "plain", prepared=data, progress=False)
    # The same kernels run either way; dropout's random stream is drawn differently inside a graph, so
    # the runs agree closely rather than to the bit.
    for a, b in zip(graphed.history, plain.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.1)
    # The returned model has its ordinary forward back: evaluation, copies and export see a plain module.
    assert "forward" not in graphed.model.__dict__
    copy.deepcopy(graphed.model).eval()(torch.zeros(2, 3, 32, 32, device="cuda"))


def test_graphed_training_is_reproducible_and_resumes_exactly(tmp_path: Path, data) -> None:
    config = cuda_config(epochs=4)
    fit(config, tmp_path / "straight", prepared=data, progress=False)
    fit(config, tmp_path / "again", prepared=data, progress=False)
    interrupted_then_resumed(config, tmp_path / "resumed", data)

    straight = final_weights(tmp_path / "straight")
    for other in ("again", "resumed"):
        weights = final_weights(tmp_path / other)
        assert all(torch.equal(straight[k], weights[k]) for k in straight), other
        assert history_without_timing(tmp_path / "straight") == history_without_timing(tmp_path / other)
