"""Every registered architecture builds, runs forward and trains one step; timm models build by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bloodcell.config import RunConfig
from bloodcell.errors import UserError
from bloodcell.models import Classifier, create_model, list_models
from bloodcell.models.architectures import MixStyle
from bloodcell.train.setup import build_classifier, load_initial_weights

REGISTERED = [spec.name for spec in list_models()]


def test_registry_has_the_issue_models() -> None:
    assert {"seed-cnn", "bloodnet", "bloodnet-ir"} <= set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_model_builds_and_trains_one_step(name: str) -> None:
    torch.manual_seed(0)
    model = Classifier(create_model(name, num_classes=4)).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8).float()
    labels = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    logits = model(images.contiguous(memory_format=torch.channels_last))
    assert logits.shape == (4, 4)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed, "one optimiser step changed no weight"


def test_seed_cnn_is_the_keras_shape_at_150px() -> None:
    net = create_model("seed-cnn", num_classes=4)
    features = net.features(torch.zeros(1, 3, 150, 150))
    assert features.shape == (1, 128, 7, 7)  # 150 -> 148/74 -> 72/36 -> 34/17 -> 15/7, as Keras computes
    assert net.head[1].in_features == 128 * 7 * 7


@pytest.mark.parametrize("name", ["bloodnet", "bloodnet-ir"])
def test_bloodnet_width_and_depth_change_the_network(name: str) -> None:
    def count(**kwargs) -> int:
        return sum(p.numel() for p in create_model(name, 4, **kwargs).parameters())

    assert count(width=0.5) < count() < count(width=1.5)
    assert count() < count(depth=2)


def test_mixstyle_swaps_feature_statistics_in_training_only() -> None:
    torch.manual_seed(0)
    # Eight maps whose channels each have their own mean and spread: the "style" MixStyle mixes.
    x = torch.randn(8, 4, 6, 6) * torch.arange(1, 9.0).view(8, 1, 1, 1) + torch.arange(8.0).view(8, 1, 1, 1)
    mix = MixStyle(p=1.0, alpha=0.1)
    y = mix(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    # The content (each map standardised) is kept; only the statistics moved.
    standardise = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(standardise(y), standardise(x), atol=1e-4)
    assert not torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-2)
    mix.eval()
    assert torch.equal(mix(x), x)
    assert torch.equal(MixStyle(p=0.0)(x), x)


def test_bloodnet_with_mixstyle_keeps_the_plain_parameter_names() -> None:
    plain, mixing = create_model("bloodnet", 4).state_dict(), create_model("bloodnet", 4, mixstyle=0.5).state_dict()
    assert list(plain) == list(mixing) and all(plain[k].shape == mixing[k].shape for k in plain)


@pytest.mark.parametrize("pool", ["max", "avgmax", "catavgmax"])
def test_bloodnet_pools_let_one_strong_cell_show(pool: str) -> None:
    """A maximum in the pooling sees one bright spot that an average over a large field dilutes."""
    net = create_model("bloodnet", 4, pool=pool).eval()
    features = torch.zeros(2, net.num_features, 8, 8)
    features[1, :, 3, 3] = 64.0  # one "cell" in an otherwise empty field
    pooled = net.pool(features).flatten(1)
    average = nn.AdaptiveAvgPool2d(1)(features).flatten(1)
    assert pooled.shape[1] == net.head[-1].in_features
    assert (pooled[1] - pooled[0]).max() > 4 * (average[1] - average[0]).max()


def test_bloodnet_rejects_unknown_pool() -> None:
    with pytest.raises(ValueError, match="pool must be one of"):
        create_model("bloodnet", 4, pool="median")


def test_bloodnet_rejects_unknown_block() -> None:
    with pytest.raises(ValueError, match="block"):
        create_model("bloodnet", 4, block="transformer")


@pytest.mark.parametrize("name", ["timm/resnet18", "timm/efficientnet_b0"])
def test_timm_models_build_by_name(name: str) -> None:
    net = create_model(name, num_classes=4)
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


@pytest.mark.parametrize(
    "arch_kwargs",
    [
        {"pretrained": True},
        {"pretrained_cfg_overlay": {"url": "file:///tmp/payload.pth"}, "cache_dir": "/tmp/site-packages"},
        {"checkpoint_path": "/tmp/evil.pth"},
    ],
)
def test_a_card_cannot_make_loading_fetch_or_read_weights(tmp_path: Path, arch_kwargs: dict) -> None:
    """A model card someone hands you must not download, write or read files through timm's loader options."""
    from bloodcell.models.card import ModelCard, build_model

    card = ModelCard(name="handed-over", architecture="timm/resnet18", arch_kwargs=arch_kwargs, classes=["a", "b"],
                     input_size=64)  # fmt: skip
    with pytest.raises(ValueError, match="pretrained|weight-loading options"):
        build_model(card)
    assert not any(tmp_path.iterdir())


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="bloodnet"):
        create_model("no-such-net", 4)


def test_pretrained_own_model_is_a_clear_user_error() -> None:
    config = RunConfig.model_validate({"model": {"name": "bloodnet", "pretrained": True}})
    with pytest.raises(UserError, match="no published pretrained weights"):
        build_classifier(config, 4)


def test_weights_file_initialises_matching_tensors_and_skips_the_head(tmp_path: Path) -> None:
    source = create_model("bloodnet", num_classes=10)  # e.g. a model trained with another class count
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))

    config = RunConfig.model_validate({"model": {"name": "bloodnet", "weights": str(tmp_path / "w.safetensors")}})
    classifier = build_classifier(config, 4)

    assert torch.equal(classifier.net.stem[0].weight, source.stem[0].weight)
    assert not torch.equal(classifier.net.head[2].weight[:4], source.head[2].weight[:4])
    loaded, skipped = load_initial_weights(create_model("bloodnet", 4), tmp_path / "w.safetensors")
    assert skipped == ["head.2.bias", "head.2.weight"] and loaded == len(state) - 2


def test_weights_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    save_file({"unrelated.weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="none of its weight tensors fit"):
        load_initial_weights(create_model("bloodnet", 4), tmp_path / "w.safetensors")


def test_weights_of_another_width_are_refused_though_batchnorm_counters_fit(tmp_path: Path) -> None:
    """Every BatchNorm's num_batches_tracked is a scalar, so it fits any network: it must not count as a fit
    (a width-0.5 file loaded 8 of 44 tensors into a width-1 network, not one convolution, without a word)."""
    narrow = create_model("bloodnet", 4, width=0.5)
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="none of its weight tensors fit"):
        load_initial_weights(create_model("bloodnet", 4, width=1.0), tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [("w.pt", "tensor", "holds no mapping of tensor names"), ("w.pt", "damaged", "not a readable weights file"),
     ("w.safetensors", "damaged", "not a readable weights file")],
    ids=["pt-of-a-tensor", "pt-damaged", "safetensors-damaged"],
)
def test_a_weights_file_that_is_no_state_dict_is_a_user_error(tmp_path: Path, name: str, content: str, words: str) -> None:
    path = tmp_path / name
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(b"\x80\x02not really weights")
    with pytest.raises(UserError, match=words):
        load_initial_weights(create_model("bloodnet", 4), path)


def test_pretrained_timm_weights_unreachable_is_a_clear_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from bloodcell.train import setup

    def offline(name: str, num_classes: int, **kwargs):
        assert kwargs.get("pretrained") is True
        raise RuntimeError("Cannot reach huggingface.co (HF_HUB_OFFLINE=1)")

    monkeypatch.setattr(setup, "create_model", offline)
    config = RunConfig.model_validate({"model": {"name": "timm/resnet18", "pretrained": True}})
    with pytest.raises(UserError, match=r"model.weights=FILE \(--weights FILE\)"):
        build_classifier(config, 4)


def _saved_tiny_model(directory: Path) -> Path:
    from bloodcell.models.card import ModelCard, save_model

    torch.manual_seed(0)
    card = ModelCard(name="tiny", architecture="bloodnet", arch_kwargs={"width": 0.25}, classes=["a", "b", "c", "d"],
                     input_size=32)  # fmt: skip
    return save_model(Classifier(create_model("bloodnet", 4, width=0.25)), card, directory)


def test_the_same_weights_save_to_the_same_bytes(tmp_path: Path) -> None:
    """Reproducibility is checked by hashes (sha256sum, the ONNX cache's folder): identical weights must
    give identical files, which safetensors' unordered metadata broke half the time."""
    import hashlib

    digests = {hashlib.sha256((_saved_tiny_model(tmp_path / str(k)) / "model.safetensors").read_bytes()).hexdigest()
               for k in range(8)}  # fmt: skip
    assert len(digests) == 1


def _truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _nan_weights(directory: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    first = next(name for name, tensor in state.items() if tensor.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(directory / "model.safetensors"))


def _edit_card(**changes):
    def edit(directory: Path) -> None:
        import json

        card = json.loads((directory / "card.json").read_text())
        for key, value in changes.items():
            if value is None:
                del card[key]
            else:
                card[key] = value
        (directory / "card.json").write_text(json.dumps(card))

    return edit


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate_weights, "not readable as safetensors"),
        (_nan_weights, "hold NaN or infinite values"),
        (_edit_card(classes=["a", "b", "c"]), "do not fit the card's 'bloodnet' with 3 classes"),
        (_edit_card(architecture="no-such-net"), "cannot build 'no-such-net'"),
        (_edit_card(architecture="timm/no_such_net"), "cannot build 'timm/no_such_net'"),
        (_edit_card(arch_kwargs={"widht": 0.25}), "cannot build 'bloodnet'"),
        (_edit_card(input_size=None), "not a valid model card"),
        (_edit_card(temperature=-0.05), "not a valid model card"),
        (_edit_card(input_size=60000), "not a valid model card"),
    ],
    ids=["truncated", "nan", "classes", "architecture", "timm-architecture", "kwargs", "missing-key",
         "negative-temperature", "huge-input-size"],
)
def test_a_damaged_or_mismatched_model_is_one_user_error_naming_the_file(tmp_path: Path, damage, words: str) -> None:
    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_model

    directory = _saved_tiny_model(tmp_path / "m")
    damage(directory)
    with pytest.raises(ModelFileError, match=words) as raised:
        load_model(directory)
    assert str(directory) in str(raised.value)


@pytest.mark.parametrize("size", [60000, 0, 7, 1025, 64.5, "160", True])
def test_the_torch_free_card_reader_refuses_an_input_size_out_of_bounds(tmp_path: Path, size) -> None:
    """The ONNX predictor reads the card without pydantic: a card asking for 60000 px a side would make its
    warm-up allocate gigabytes."""
    from bloodcell.errors import ModelFileError
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(input_size=size)(directory)
    with pytest.raises(ModelFileError, match="input_size must be a whole number of pixels from 8 to 1024"):
        read_card_json(directory)


@pytest.mark.parametrize("size", [8, 1024])
def test_both_card_readers_accept_the_input_sizes_at_the_bounds(tmp_path: Path, size: int) -> None:
    from bloodcell.models.card import ModelCard
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(input_size=size)(directory)
    assert read_card_json(directory)["input_size"] == size
    assert ModelCard.model_validate(read_card_json(directory)).input_size == size


@pytest.mark.parametrize("size", ["160", 160.0])
def test_the_pydantic_card_refuses_an_input_size_the_torch_free_reader_refuses(size) -> None:
    """Both readers agree, so a model loads with both backends or with neither."""
    from pydantic import ValidationError

    from bloodcell.models.card import ModelCard

    with pytest.raises(ValidationError, match="input_size"):
        ModelCard(architecture="bloodnet", input_size=size)


def test_a_card_naming_a_timm_hub_or_folder_model_is_refused_before_timm_sees_it(tmp_path: Path, monkeypatch) -> None:
    """timm reads "hf-hub:ORG/NAME" as a config to download: loading a card must not reach out to a URL it names."""
    import timm

    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_model

    def reached(*args, **kwargs):
        raise AssertionError(f"timm.create_model was called with {args}")

    monkeypatch.setattr(timm, "create_model", reached)
    for name in ("timm/hf-hub:attacker/evil-config", "timm/local-dir:/tmp"):
        directory = _saved_tiny_model(tmp_path / name.replace("/", "_").replace(":", "_"))
        _edit_card(architecture=name)(directory)
        with pytest.raises(ModelFileError, match="timm has no model"):
            load_model(directory)


def test_the_torch_free_card_reader_refuses_a_negative_temperature(tmp_path: Path) -> None:
    from bloodcell.errors import ModelFileError
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(temperature=-0.05)(directory)
    with pytest.raises(ModelFileError, match="temperature must be a number from 0.001 to 1000, got -0.05"):
        read_card_json(directory)


def test_a_run_without_its_model_or_a_dataset_named_as_a_model_says_what_to_do(tmp_path: Path) -> None:
    """Both said only "no model found": a run stopped in its holdout stage, and a dataset folder given where
    evaluate takes a model."""
    from bloodcell.config import save_config
    from bloodcell.models.card import resolve_model_dir
    from conftest import draw_cell

    run = tmp_path / "int2"
    (run / "holdout").mkdir(parents=True)
    save_config(RunConfig(), run / "config.yaml")
    with pytest.raises(FileNotFoundError, match=f"finish it with: bloodcell train --resume {run}"):
        resolve_model_dir(run)
    rng = np.random.default_rng(0)
    for index, name in enumerate(["alpha", "beta"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        draw_cell(rng, index, 32).save(tmp_path / "data" / name / "img_001.png")
    with pytest.raises(FileNotFoundError, match="to evaluate on a dataset, pass it as --data"):
        resolve_model_dir(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model found \(expected card.json") as error:
        resolve_model_dir(tmp_path / "empty")
    assert "--data" not in str(error.value) and "--resume" not in str(error.value)
    image = tmp_path / "data" / "alpha" / "img_001.png"  # a file named as a model: no folder to look into
    with pytest.raises(FileNotFoundError, match=r"no model found \(expected card.json") as error:
        resolve_model_dir(image)
    assert "--data" not in str(error.value)


@pytest.mark.parametrize(
    ("classes", "words"),
    [(["a", "a", "b", "c"], "must be distinct"), ("abcd", "must be a list of class names"),
     (4, "must be a list of class names"), ([1, 2, 3, None], "must be a list of class names"),
     ([], "must name 2 to 1000 classes"), (["a", "", "b", "c"], "not blank"),
     (["x" * 256, "b", "c", "d"], "names of 1 to 255 characters")],
    ids=["duplicate", "string", "number", "not-strings", "none", "empty-name", "long-name"],
)
def test_both_card_readers_refuse_class_names_that_are_not_distinct_strings(tmp_path: Path, classes, words: str) -> None:
    """A repeated name let the second class's probability overwrite the first's (confidence 2.8e-06, the
    probabilities summing to 0.084); the torch-free reader took "abcd" for four classes and 4 for a traceback."""
    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_model
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(classes=classes)(directory)
    for reader in (read_card_json, load_model):
        with pytest.raises(ModelFileError, match=words) as raised:
            reader(directory)
        assert str(directory / "card.json") in str(raised.value)


def test_class_names_any_folder_may_have_are_a_card_s(tmp_path: Path) -> None:
    """Class names come from folder names: a rule stricter than training's (control characters, 255 bytes)
    would refuse, after the work, the card of a model trained on such folders."""
    from bloodcell.models.card import load_model
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    classes = ["up\x1b[1A", "x" * 255, "Pré-B", "c"]
    _edit_card(classes=classes)(directory)
    assert list(load_model(directory)[1].classes) == classes
    assert list(read_card_json(directory)["classes"]) == classes


@pytest.mark.parametrize(
    ("text", "words"),
    [('["classes", "input_size"]', "expected a JSON object, got a list"), ('"classes"', "expected a JSON object, got a str"),
     ("[" * 100_000 + "]" * 100_000, "not a valid model card"), (" " * 4_000_001, "too large for a model card")],
    ids=["list", "string", "nested-100000-deep", "over-4-MB"],
)
def test_the_torch_free_card_reader_refuses_a_card_that_is_no_json_object_in_one_line(tmp_path: Path, text: str,
                                                                                       words: str) -> None:  # fmt: skip
    from bloodcell.errors import ModelFileError
    from bloodcell.serve.common import read_card_json

    (tmp_path / "card.json").write_text(text)
    with pytest.raises(ModelFileError, match=words):
        read_card_json(tmp_path)


def test_the_pytorch_card_reader_refuses_a_card_over_its_size_limit(tmp_path: Path) -> None:
    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_card

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(padding="x" * 4_000_000)(directory)
    with pytest.raises(ModelFileError, match="too large for a model card"):
        load_card(directory)


@pytest.mark.parametrize(("onnx", "words"), [("x", "onnx must be an object"), ({"graph_version": "2"}, "graph_version must be a whole number")])
def test_the_torch_free_card_reader_refuses_a_malformed_onnx_section(tmp_path: Path, onnx, words: str) -> None:
    from bloodcell.errors import ModelFileError
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(onnx=onnx)(directory)
    with pytest.raises(ModelFileError, match=words):
        read_card_json(directory)


def test_both_card_readers_refuse_another_card_format(tmp_path: Path) -> None:
    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_card
    from bloodcell.serve.common import read_card_json

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(format="bloodcell-model/2")(directory)
    for reader in (read_card_json, load_card):
        with pytest.raises(ModelFileError, match="format .*must be 'bloodcell-model/1'"):
            reader(directory)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0])
def test_the_pytorch_card_reader_says_what_temperature_it_takes(tmp_path: Path, temperature: float) -> None:
    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_card

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(temperature=temperature)(directory)
    with pytest.raises(ModelFileError, match="temperature .*must be a number from 0.001 to 1000"):
        load_card(directory)


def test_a_non_finite_arch_kwarg_is_refused_when_the_card_is_read(tmp_path: Path) -> None:
    """A NaN dropout loaded and then failed the first prediction (F.dropout raises on NaN even in eval)."""
    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_model

    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(arch_kwargs={"width": 0.25, "dropout": float("nan")})(directory)
    with pytest.raises(ModelFileError, match="arch_kwargs.dropout must be a finite number"):
        load_model(directory)


def test_weights_relabelled_as_integers_are_refused(tmp_path: Path) -> None:
    """The same bytes under an I32 header loaded, cast to nonsense, and predicted without a word."""
    import json
    import struct

    from bloodcell.errors import ModelFileError
    from bloodcell.models.card import load_model

    directory = _saved_tiny_model(tmp_path / "m")
    raw = (directory / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    name = next(key for key, entry in header.items() if key != "__metadata__" and entry["dtype"] == "F32")
    header[name]["dtype"] = "I32"
    encoded = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    with pytest.raises(ModelFileError, match=f"{name} holds I32 numbers where the model takes float32 ones"):
        load_model(directory)


@pytest.mark.parametrize(("arch_kwargs", "words"), [({"width": 50}, "shape .* in the file"),
                                                    ({"width": 0.25, "depth": 1e4}, "far more parameters")])
def test_a_card_describing_a_huge_network_is_refused_before_it_is_built(tmp_path: Path, monkeypatch, arch_kwargs,
                                                                       words: str) -> None:  # fmt: skip
    """width 50 built a 3.7 GB network (11.7 s) and depth 1e4 a 5 GB one (32 s, 40 s even on the meta device)
    before the weights were read: the weights file's header is compared with a meta-device build first."""
    import time

    from bloodcell.errors import ModelFileError
    from bloodcell.models import card as card_module

    built_on: list[str | None] = []
    real_build = card_module.build_model
    monkeypatch.setattr(card_module, "build_model", lambda card, device=None: built_on.append(device) or real_build(card, device))
    directory = _saved_tiny_model(tmp_path / "m")
    _edit_card(arch_kwargs=arch_kwargs)(directory)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=words):
        card_module.load_model(directory)
    assert built_on == ["meta"] and time.perf_counter() - start < 10
