"""Architectures (a registry in the manner of timm), the preprocessing wrapper, and model cards."""

from bloodcell.models.card import ModelCard, build_model, load_card, load_model, resolve_model_dir, save_model
from bloodcell.models.classifier import Classifier, Preprocess
from bloodcell.models.registry import create_model, get_spec, list_models, register_model

__all__ = [
    "Classifier",
    "ModelCard",
    "Preprocess",
    "build_model",
    "create_model",
    "get_spec",
    "list_models",
    "load_card",
    "load_model",
    "register_model",
    "resolve_model_dir",
    "save_model",
]
