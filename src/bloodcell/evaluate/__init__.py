"""Evaluation: metrics with block-bootstrap intervals, temperature scaling, the acquisition-shift suite,
test-time augmentation and the ``evaluate_model`` runner that writes ``metrics.json``.

Submodules are imported on use (``from bloodcell.evaluate.metrics import ...``): ``metrics``, ``shifts``,
``tta`` and ``calibration`` need no torch, so the ONNX predictor can use them.
"""
