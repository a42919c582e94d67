"""Typed configuration for a training run: YAML in, YAML out, unknown keys rejected.

A config is built from a named file in ``bloodcell/configs`` (or any YAML path) and then ``--set
key.sub=value`` overrides. Every field is validated by pydantic, so a typo or a bad value stops the run
with a message naming the field before any work starts.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Hashable
from importlib import resources
from pathlib import Path
from types import NoneType
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bloodcell.io import atomic_write_text

#: Keys that say where and how a run computes, not what: they may differ between a run and its resumption,
#: and between the workers of one tuning study.
RUNTIME_KEYS = frozenset({"data.root", "train.devices", "train.accelerator", "train.num_threads", "train.cuda_graph"})


class Strict(BaseModel):
    """Base for config sections: unknown keys are an error, assignments are validated, and no number may be
    NaN or infinite (``optimizer.lr: .inf`` used to pass, and diverge at the first step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1 in a number field, so `train.epochs=true` trained one epoch without a word.
        types = _leaf_types(cls.model_fields[info.field_name or ""].annotation)
        items = value if isinstance(value, list | tuple) else [value]
        if types & {int, float} and bool not in types and any(isinstance(item, bool) for item in items):
            raise ValueError(f"must be a number, not {json.dumps(value)}")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types a field's annotation is made of: ``{int, str}`` for ``Annotated[int, ...] | Literal["auto"]``,
    ``{float}`` for ``tuple[PositiveFloat, ...]``, ``{str, NoneType}`` for ``list[str] | None``."""
    origin = get_origin(annotation)
    if origin is None:
        return {annotation}
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return {type(choice) for choice in get_args(annotation)}
    return set().union(*(_leaf_types(arg) for arg in get_args(annotation) if arg is not Ellipsis))


def _is_text(annotation: Any) -> bool:
    """Whether a field takes text only (``str``, ``list[str] | None``, a ``Literal`` of strings)."""
    return annotation is not None and _leaf_types(annotation) - {NoneType} == {str}


#: The largest ``data.image_size``.
LARGEST_IMAGE_SIZE = 512


class DataConfig(Strict):
    """Where the images come from and how they are split."""

    root: str | None = None  # dataset folder (relative to the working directory); train's --data overrides it
    variant: Literal["Original", "Segmented"] = "Original"
    class_names: list[str] | None = None  # for plain class-per-folder layouts; None takes folder names
    image_size: int = Field(128, ge=32, le=LARGEST_IMAGE_SIZE)
    protocol: Literal["session", "random", "kfold"] = "session"
    split_seed: int = Field(0, ge=0)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    block_size: int = Field(40, ge=1)  # images per capture-order block (session protocol)
    embargo: int = Field(12, ge=0)  # images left out of training next to each held-out block
    folds: int = Field(5, ge=2)  # kfold protocol
    fold: int = Field(0, ge=0)  # which kfold fold is validation
    mix_segmented: float = Field(0.0, ge=0, le=1)  # chance a training image is drawn from the Segmented variant
    # Which parts the shipped model learns from. "train+val": `bloodcell train` first trains on train alone
    # (the "holdout" stage: validation scores and the fitted temperature), then refits the same recipe on
    # train + val for the same schedule. The test part is never trained on either way.
    train_on: Literal["train", "train+val"] = "train"

    @model_validator(mode="after")
    def _fold_is_one_of_the_folds(self) -> DataConfig:
        if self.fold >= self.folds:
            raise ValueError(f"data.fold ({self.fold}) must be less than data.folds ({self.folds})")
        return self


class ModelConfig(Strict):
    """Which architecture, and how it is initialised."""

    name: str = "bloodnet"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # architecture arguments (width, depth, dropout ...)
    pretrained: bool = False  # timm/<name> models: start from timm's published weights
    weights: str | None = None  # a safetensors (or weights-only .pth) file to initialise from

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        # Imported here, not at the top: bloodcell.models imports this module (a cycle at import time).
        from bloodcell.models.registry import get_spec, require_timm_model

        if value.startswith("timm/"):
            require_timm_model(value[5:])
            return value
        get_spec(value)  # raises ValueError listing the registered names
        return value

    @model_validator(mode="after")
    def _kwargs_fit_the_network(self) -> ModelConfig:
        """Build the network on the meta device (no memory; a few ms, and timm's import for its networks), so
        that a misspelled or mistyped ``model.kwargs`` entry is refused with the config, not by a traceback
        once the data are prepared and the run folder made."""
        if not self.kwargs:
            return self
        import torch

        from bloodcell.models.registry import create_model

        timm = self.name.startswith("timm/")
        try:
            with torch.device("meta"):
                create_model(self.name, 2, **self.kwargs)
        except TypeError as error:  # an argument the network does not take, or of the wrong type
            raise ValueError(f"model.kwargs {self.kwargs} do not fit {self.name}: {error}") from None
        except ValueError as error:
            if not timm:
                raise ValueError(f"model.kwargs {self.kwargs} do not fit {self.name}: {error}") from None
            if "weight-loading" in str(error) or "has no model" in str(error):
                raise
        except Exception:  # noqa: BLE001 - a timm network that cannot be built on the meta device: built later
            if not timm:
                raise
        return self


class NormalizeConfig(Strict):
    """Input normalisation, baked into the model so every predictor applies it identically."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.25, 0.25, 0.25)  # a 0 divides by zero
    per_image: bool = False  # standardise each image's channels by its own statistics (stain invariance)
    grayscale: bool = False  # collapse colour to luminance before the network


class AugmentConfig(Strict):
    """Batch augmentation applied to training only. A strength of 0 switches a transform off.

    The field defaults are the flips, quarter turns and colour / stain jitter of the ``default`` config;
    blur, noise and JPEG default to off here and are switched on by that config (``configs/default.yaml``,
    see docs/TRAINING.md for how they were chosen).
    """

    crop: int = Field(0, ge=0)  # side of a random square crop in pixels (0: off); evaluation sees whole images
    flip: bool = True  # horizontal and vertical
    rot90: bool = True  # quarter turns
    affine_degrees: float = Field(0.0, ge=0, le=180)  # random rotation +/-
    affine_scale: float = Field(0.0, ge=0, lt=1)  # zoom range +/-
    affine_translate: float = Field(0.0, ge=0, lt=0.5)  # fraction of the image size
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    saturation: float = Field(0.1, ge=0, le=1)
    hue: float = Field(0.03, ge=0, le=0.5)  # fraction of a full turn
    gamma: float = Field(0.2, ge=0, le=1)  # per-channel gamma in [1-g, 1+g] (stain intensity)
    stain: float = Field(0.1, ge=0, le=1)  # HED stain-space jitter strength
    stain_vectors: float = Field(0.0, ge=0, le=0.5)  # std of the per-image noise on the H and E stain vectors (colour)
    stain_clip: float = Field(0.0, ge=0, le=1)  # probability an image's negative stain densities are clipped to 0
    blur: float = Field(0.0, ge=0, le=1)  # probability of a small Gaussian blur
    noise: float = Field(0.0, ge=0, le=0.2)  # Gaussian noise std (in [0,1] pixel units)
    jpeg: float = Field(0.0, ge=0, le=1)  # probability of a JPEG re-compression round trip
    jpeg_quality: tuple[int, int] = (30, 95)  # its quality, drawn once per batch from this range

    @field_validator("jpeg_quality")
    @classmethod
    def _quality_range_is_ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 100:
            raise ValueError("must be [low, high] with 1 <= low <= high <= 100")
        return value
    consistency: float = Field(0.0, ge=0)  # weight of the two-colour-view consistency loss


class OptimizerConfig(Strict):
    """The optimiser: AdamW (the default), Adam (the seed replica's) or SGD with Nesterov momentum."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = 3e-3  # above 3e37 Adam overflowed in float
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only


class ScheduleConfig(Strict):
    """Learning-rate schedule over the whole run."""

    name: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.2, ge=0, lt=1)


class TrainConfig(Strict):
    """The loop itself."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_weights: bool = True  # weight the loss by inverse class frequency
    early_stopping_patience: int = Field(0, ge=0)  # 0: off; else validations (epochs at eval_every 1) without improvement
    grad_clip: float = Field(2.0, ge=0)  # 0: off
    seed: int = Field(0, ge=0)
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "auto"] = "auto"
    num_threads: int = Field(0, ge=0)  # 0: automatic (idle cores, shared among processes); else this many
    channels_last: bool = True
    cuda_graph: bool = True  # one CUDA GPU: replay forward + backward as CUDA graphs (fewer launches)
    eval_every: int = Field(1, ge=1)


class RunConfig(Strict):
    """A whole training run."""

    name: str = "default"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(ch in value for ch in "/\\\0") or value.startswith("."):
            raise ValueError("run name must be a plain folder name")
        return value

    @model_validator(mode="after")
    def _refit_has_a_fixed_schedule(self) -> RunConfig:
        # Without validation images there is nothing to stop early on; the holdout stage's schedule is refit as is.
        if self.data.train_on == "train+val" and self.train.early_stopping_patience:
            raise ValueError(
                "data.train_on=train+val trains without validation images, so train.early_stopping_patience "
                "must be 0 (a fixed schedule)"
            )
        return self

    @model_validator(mode="after")
    def _crop_fits_the_images(self) -> RunConfig:
        if self.augment.crop > self.data.image_size:
            raise ValueError(
                f"augment.crop ({self.augment.crop}) must be at most data.image_size ({self.data.image_size})"
            )
        return self

    @model_validator(mode="after")
    def _network_runs_at_the_image_size(self) -> RunConfig:
        """Run the network on two images of each size it will see (a forward on the meta device: shapes only,
        a few ms), so that a size it cannot take is refused with the config, not by a traceback once the data
        are prepared and the run folder made (seed-cnn's unpadded convolutions need 46 px, a ViT its own)."""
        name, kwargs = self.model.name, self.model.kwargs
        training_key = "augment.crop" if self.augment.crop else "data.image_size"
        sizes = {"data.image_size": self.data.image_size, training_key: self.augment.crop or self.data.image_size}
        areas: dict[str, list[int]] = {}
        for key, size in sizes.items():
            try:
                areas[key] = _batch_norm_areas(name, kwargs, size)
            except _NetworkNotBuilt:  # judged by ModelConfig: a timm network built only when the run starts
                return self
            except Exception as error:  # noqa: BLE001 - whatever the network raises for a size it cannot take
                reason = " ".join(str(error).split()) or type(error).__name__
                smallest = _smallest_size_above(name, kwargs, size)
                hint = f"; {name} needs {key} >= {smallest}" if smallest else ""
                raise ValueError(f"model {name} cannot run at {key}={size} ({reason}){hint}") from None
        # BatchNorm in training needs two values per channel: a batch of one image fails where a layer's
        # feature map is 1x1 (bloodnet at 32 px). The consistency loss trains on two views of each image.
        batch = self.train.batch_size * (2 if self.augment.consistency > 0 else 1)
        if batch * min(areas[training_key], default=2) < 2:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} cannot train {name} at {training_key}="
                f"{sizes[training_key]}: a BatchNorm layer there gets a 1x1 feature map, one value per channel "
                f"from a batch of one image; use train.batch_size >= 2 or a larger {training_key}"
            )
        return self


class _NetworkNotBuilt(Exception):
    """The network could not be built at all (not a matter of the image size)."""


def _batch_norm_areas(name: str, kwargs: dict[str, Any], size: int) -> list[int]:
    """Run network ``name`` (built with ``kwargs``) in evaluation mode on two ``size`` px images; return the
    area of the feature map each of its BatchNorm layers is given (1 for a flattened one).

    On the meta device (shapes only: milliseconds, no memory); a network that fails there runs on the CPU,
    which decides, as a layer may have no meta kernel. Raises :class:`_NetworkNotBuilt` where the network
    cannot be built on the meta device (ModelConfig lets some timm networks pass so), else what the network
    raises for the size."""
    import torch

    try:
        return _batch_norm_areas_on("meta", name, kwargs, size)
    except _NetworkNotBuilt:
        raise
    except Exception:  # noqa: BLE001 - the CPU run says whether the size or the meta device was at fault
        with torch.random.fork_rng(devices=[]):  # its initialisation must not move a seeded run's draws
            return _batch_norm_areas_on("cpu", name, kwargs, size)


def _batch_norm_areas_on(device: str, name: str, kwargs: dict[str, Any], size: int) -> list[int]:
    import torch
    from torch import nn

    from bloodcell.models.registry import create_model

    areas: list[int] = []
    with torch.device(device), torch.no_grad():
        try:
            net = create_model(name, 2, **kwargs).eval()
        except Exception as error:  # noqa: BLE001 - any failure to build is ModelConfig's to judge
            raise _NetworkNotBuilt from error
        for module in net.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
                module.register_forward_pre_hook(lambda _, inputs: areas.append(inputs[0][0, 0].numel()))
        net(torch.zeros(2, 3, size, size))
    return areas


def _smallest_size_above(name: str, kwargs: dict[str, Any], size: int) -> int | None:
    """The smallest image size above ``size`` (which the network cannot take) that it runs at on the meta
    device, found by bisection up to the largest ``data.image_size``; None where that fails too (a ViT takes
    one size). Bisection assumes that a size that runs keeps running when larger, as for stacks of
    convolutions and pools."""

    def runs(side: int) -> bool:
        try:
            _batch_norm_areas_on("meta", name, kwargs, side)
        except Exception:  # noqa: BLE001 - any failure is "does not run"
            return False
        return True

    low, high = size, LARGEST_IMAGE_SIZE
    if not runs(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if runs(middle) else (middle, high)
    return high


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the problem."""


def named_configs() -> list[str]:
    """Names of the configs shipped with the package (``default``, ``seed-replica`` ...)."""
    folder = resources.files("bloodcell") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and every reader) does.

    PyYAML follows YAML 1.1, where a float needs a dot, so ``1e-3`` would stay the string "1e-3" (fine for
    a typed field, which pydantic converts, but not for the untyped ``model.kwargs``), a leading zero means
    octal (``split_seed: 010`` was 8: another split) and ``1:30`` is 90 in base 60. Here ``010`` is 10,
    ``0o10`` octal, ``0x10`` hexadecimal, and ``1:30`` the text it looks like. A key given twice in one
    mapping is refused: PyYAML keeps the last silently, so a second ``train:`` section dropped the first.
    """

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked before PyYAML flattens a merge into the node (it does so in place, for a merge's own value
        # too, so an anchored mapping met again through an alias holds its merged keys beside its own).
        if not getattr(node, "_keys_checked", False):
            node._keys_checked = True
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": merged, not given twice
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, Hashable):
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, "a key cannot be a list or a mapping",
                        key_node.start_mark,
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                    )
                seen.add(key)
        super().flatten_mapping(node)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {  # YAML 1.1's numbers left out, YAML 1.2's added below
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in {_INT, _FLOAT}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)
_YamlLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text.replace("_", ""), 10)  # a leading zero is decimal, as in YAML 1.2
    except ValueError:  # an explicit `!!int 1:30`
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_YamlLoader.add_constructor(_INT, _construct_int)

#: What a plain scalar may be read as besides text: where the config takes text, it stays the text it was.
_NOT_TEXT = frozenset({"tag:yaml.org,2002:bool", _INT, _FLOAT, "tag:yaml.org,2002:timestamp"})


def _load_yaml(text: str, annotation: Any = None) -> Any:
    """Read YAML ``text`` as a value of type ``annotation`` (a config section, a field's type, or None for
    any): a plain scalar where text is taken keeps its text, so ``name: 2024``, ``description: yes`` and
    ``class_names: [01, 02]`` are the strings "2024", "yes", "01" and "02", not a number or True."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _keep_text(node, annotation)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _keep_text(node: yaml.Node, annotation: Any) -> None:
    """Retag, in place, the scalars under ``node`` that stand for text in a config of type ``annotation``."""
    if _is_text(annotation):
        for scalar in node.value if isinstance(node, yaml.SequenceNode) else [node]:
            if isinstance(scalar, yaml.ScalarNode) and scalar.tag in _NOT_TEXT:
                scalar.tag = "tag:yaml.org,2002:str"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": its keys are this section's
                for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    _keep_text(merged, annotation)
            elif isinstance(key_node, yaml.ScalarNode) and key_node.value in annotation.model_fields:
                _keep_text(value_node, annotation.model_fields[key_node.value].annotation)


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    # A shipped config's bare name wins over a file or folder of that name in the working directory: the
    # README's `runs/default` must not turn `--config default`, run from `runs/`, into a path.
    shipped = resources.files("bloodcell") / "configs" / f"{name_or_path}.yaml"
    # A name with a separator or a YAML suffix is a path, even where it is missing: `--config ./default`
    # must not load the shipped `default`. A bare name is a shipped config, else a file of that name.
    bare = not any(separator in name_or_path for separator in {"/", os.sep})  # Path("./x") would drop the "./"
    is_path = not bare or path.suffix in {".yaml", ".yml"} or (path.exists() and not shipped.is_file())
    if is_path:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; --config takes a YAML file or a named config")
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    else:
        if not shipped.is_file():
            raise ConfigError(f"unknown config {name_or_path!r}; named configs: {', '.join(named_configs())}")
        source, text = f"config {name_or_path!r}", shipped.read_text(encoding="utf-8")
    try:
        loaded = _load_yaml(text, RunConfig) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {name_or_path!r} must be a mapping of sections")
    return loaded


def _parse_value(text: str, annotation: Any = None) -> Any:
    """Parse an override value as YAML so ``1e-3``, ``true``, ``[1,2]`` and ``auto`` all work; for a key that
    takes text (of type ``annotation``), ``name=2024`` and ``data.class_names=[0,1]`` are the text as typed."""
    try:
        return _load_yaml(text, annotation)
    except yaml.YAMLError:
        return text


def _annotation_at(keys: list[str] | tuple[int | str, ...], root: type[BaseModel] | None = None) -> Any:
    """The type of the config key at ``keys`` (a section's model for a section), or None where unknown;
    ``root`` is the model the keys start from (default :class:`RunConfig`)."""
    annotation: Any = root or RunConfig
    for key in keys:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        field = annotation.model_fields.get(str(key))
        annotation = field.annotation if field is not None else None
    return annotation


def override(key: str, value: Any) -> str:
    """A ``key=value`` override that sets ``value`` exactly, whatever it holds: a path with ``" #"`` (a YAML
    comment) or ``": "`` (a mapping) in it must not be cut short or read as something else."""
    return f"{key}={_exact_yaml(value)}"


def _exact_yaml(value: Any) -> str:
    """YAML text that reads back as ``value``: strings (and paths) as double-quoted scalars, lists item by
    item, numbers and booleans as JSON."""
    if isinstance(value, str | Path):
        # Written by PyYAML itself: it escapes what its reader refuses raw (DEL, C1 controls, lone surrogates
        # from undecodable file names), which a JSON string leaves in, and keeps "1e3" or "yes" a string. A
        # JSON string would also write an emoji as two surrogate escapes, read back as two broken characters.
        return yaml.safe_dump(str(value), default_style='"', allow_unicode=True, width=2**31).strip()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_exact_yaml(item) for item in value) + "]"
    return json.dumps(value)  # numbers, booleans, None, plain mappings: JSON is YAML


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping (a new mapping is returned).

    A mapping given for a whole section (``augment={hue: 0.05}``) updates that section's keys and keeps its
    others; anywhere deeper (``model.kwargs={width: 1.5}``) it replaces what was there.
    """
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        parsed = _parse_value(value, _annotation_at(keys))
        if len(keys) == 1 and isinstance(parsed, dict) and isinstance(node.get(keys[0]), dict):
            node[keys[0]].update(parsed)
        else:
            node[keys[-1]] = parsed
    return result


def format_validation_error(error: ValidationError, root: type[BaseModel] | None = None, noun: str = "config key") -> str:
    """One line naming each bad key of ``root`` (default :class:`RunConfig`; the search space's model for
    ``bloodcell tune --space``), each called a ``noun``, with a close key for a misspelt one."""
    parts: dict[str, list[str]] = {}  # by key: the alternatives of a union field are said in one sentence
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"] if not _is_union_member(p))
        message = str(problem["msg"]).removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            parts.setdefault(where, []).append(f"unknown {noun} {where!r}{did_you_mean(problem['loc'], root)}")
        elif problem["type"] == "value_error" and (not where or where in message):  # a rule of ours, naming its keys
            parts.setdefault(where, []).append(message)
        elif problem["type"] == "value_error":
            parts.setdefault(where, []).append(f"{noun} {where!r}: {message}")
        else:
            parts.setdefault(where, []).append(f"{noun} {where!r}: {message} (got {problem.get('input')!r})")
    return "; ".join(" or ".join(_merge_union_messages(messages)) for messages in parts.values())


def did_you_mean(location: tuple[int | str, ...], root: type[BaseModel] | None = None) -> str:
    """`` (did you mean 'train.epochs'?)`` for an unknown key: the key of that name in the other sections
    (``epochs`` and ``optimizer.epochs`` mean ``train.epochs``, ``train.lr`` means ``optimizer.lr``), else a
    close spelling among the keys its section has (``train.epoch``); else ``""``."""
    section, leaf = tuple(map(str, location[:-1])), str(location[-1])
    model = _annotation_at(section, root)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    elsewhere = [".".join(key) for key in _all_keys(root or RunConfig) if key[-1] == leaf and key[:-1] != section]
    # A close spelling only: at difflib's default cutoff of 0.6, augment.colour was taken for augment.blur.
    close = difflib.get_close_matches(leaf, list(model.model_fields), n=1, cutoff=0.75)
    guesses = [repr(key) for key in elsewhere or [".".join([*section, match]) for match in close]]
    said = f"{', '.join(guesses[:-1])} or {guesses[-1]}" if len(guesses) > 1 else "".join(guesses)
    return f" (did you mean {said}?)" if said else ""


def _all_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key of ``model`` and of its sections, as paths: ``("name",)``, ``("train", "epochs")`` ..."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append((*prefix, name))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _all_keys(field.annotation, (*prefix, name))
    return keys


def _is_union_member(part: object) -> bool:
    """Whether a pydantic error location part names a member of a union type (``int``, ``literal['auto']``)."""
    text = str(part)
    return text in {"int", "float", "str", "bool"} or text.startswith(("literal[", "constrained-", "function-"))


def _merge_union_messages(messages: list[str]) -> list[str]:
    """``key: A (got x)`` and ``key: B (got x)`` -> ``key: A, or B (got x)``."""
    if len(messages) < 2:
        return messages
    head, _, _ = messages[0].partition(": ")
    tail = messages[0][messages[0].rfind(" (got "):]
    reasons = [m.removeprefix(f"{head}: ").removesuffix(tail) for m in messages]
    return [f"{head}: {', or '.join(reasons)}{tail}"]


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`, raising :class:`ConfigError` naming bad keys."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(name_or_path: str = "default", overrides: list[str] | None = None) -> RunConfig:
    """Load a named config or a YAML file, apply ``key=value`` overrides and validate.

    Parameters
    ----------
    name_or_path: a shipped config name (see :func:`named_configs`) or a path to a YAML file.
    overrides: ``section.key=value`` strings, applied in order.

    Returns the validated config; raises :class:`ConfigError` with a message naming the bad key.
    """
    return config_from_dict(apply_overrides(_read_yaml(name_or_path), overrides or []))


def config_to_yaml(config: RunConfig) -> str:
    """Serialise a config to YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: RunConfig, path: str | Path) -> Path:
    """Write a config as YAML, atomically."""
    return atomic_write_text(path, config_to_yaml(config))
