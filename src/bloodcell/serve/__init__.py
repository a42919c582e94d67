"""Serving: ONNX export, the PyTorch and ONNX Runtime predictors, and the web app.

Nothing is imported here, so ``import bloodcell.serve.onnx_predictor`` stays free of PyTorch.
"""
