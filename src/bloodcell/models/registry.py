"""A registry of architectures: ``create_model(name, num_classes, **kwargs)``, in the manner of timm.

Our own networks register themselves with :func:`register_model`; any name starting with ``timm/`` is
passed to ``timm.create_model`` (random initialisation unless ``pretrained=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about an architecture before building it."""

    name: str
    builder: Callable[..., nn.Module]
    default_input_size: int
    description: str
    default_kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, default_input_size: int, description: str, **default_kwargs: Any):
    """Decorator: register ``builder(num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, builder, default_input_size, description, dict(default_kwargs))
        return builder

    return wrap


def list_models() -> list[ModelSpec]:
    """The registered architectures (timm models are available by ``timm/<name>`` in addition)."""
    _ensure_builtin_models()
    return [ _REGISTRY[name] for name in sorted(_REGISTRY) ]


def get_spec(name: str) -> ModelSpec:
    """Look up a registered architecture, with a clear error listing the known names."""
    _ensure_builtin_models()
    if name.startswith("timm/"):
        return ModelSpec(name, _build_timm, 224, f"timm architecture {name[5:]}")
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown model {name!r}; registered models: {known}, or any timm model as timm/<name>")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with ``num_classes`` outputs; ``kwargs`` override its defaults."""
    spec = get_spec(name)
    if name.startswith("timm/"):
        return _build_timm(num_classes, timm_name=name[5:], **kwargs)
    return spec.builder(num_classes, **{**spec.default_kwargs, **kwargs})


#: timm.create_model arguments that fetch or read weights. A model card's (or a config's) ``kwargs`` must
#: not carry them: loading a card someone hands you would otherwise download from a URL it names, write
#: into a folder it names, or load a checkpoint from a path it names. Weights come from the model's own
#: safetensors, from --pretrained, or from --weights FILE, never from the kwargs.
_TIMM_LOADING_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                                  "checkpoint_path", "cache_dir", "features_only"})  # fmt: skip


def require_timm_model(timm_name: str) -> None:
    """Raise ValueError unless ``timm_name`` is one of timm's own architectures. Checked for configs and for
    model cards alike: timm reads "hf-hub:ORG/NAME" and "local-dir:PATH" as places to fetch a config from,
    and a card someone hands you must not make bloodcell reach out to a URL or folder it names."""
    import timm

    if not timm.is_model(timm_name):
        raise ValueError(f"timm has no model {timm_name!r} (see timm.list_models())")


def _build_timm(num_classes: int, timm_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import timm  # imported lazily: it is slow to import and most runs use our own networks

    require_timm_model(timm_name)
    loading = sorted(k for k in kwargs if k in _TIMM_LOADING_KWARGS or k.endswith(("_path", "_file", "_dir", "_url")))
    if loading:
        raise ValueError(
            f"model kwargs may not set timm's weight-loading options ({', '.join(loading)}); use --pretrained or "
            "--weights FILE"
        )
    return timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def _ensure_builtin_models() -> None:
    # Importing the module registers our architectures; done lazily to avoid an import cycle.
    from bloodcell.models import architectures  # noqa: F401
