"""The run config's cross-field checks and its answers to unknown keys."""

from __future__ import annotations

import pytest

from bloodcell.config import ConfigError, did_you_mean, load_config


def test_a_size_the_network_cannot_take_is_refused_with_the_config() -> None:
    """It was a traceback once the data were prepared and the run folder made."""
    message = r"model seed-cnn cannot run at data\.image_size=45 \(.*\); seed-cnn needs data\.image_size >= 46$"
    with pytest.raises(ConfigError, match=message):
        load_config("seed-replica", ["data.image_size=45"])
    assert load_config("seed-replica", ["data.image_size=46"]).data.image_size == 46
    with pytest.raises(ConfigError, match=r"cannot run at augment\.crop=40 .* needs augment\.crop >= 46"):
        load_config("seed-replica", ["data.image_size=64", "augment.crop=40"])  # training sees the crops
    with pytest.raises(ConfigError, match=r"model timm/vit_tiny_patch16_224 cannot run at data\.image_size=48 \("
                       r"Input height \(48\) doesn't match model \(224\)\.\)$"):  # fmt: skip
        load_config("default", ["model.name=timm/vit_tiny_patch16_224", "data.image_size=48"])


def test_a_batch_of_one_is_refused_where_batch_norm_would_see_a_single_value() -> None:
    """bloodnet's last feature map is 1x1 at 32 px: a batch of one image failed at the first training step."""
    with pytest.raises(ConfigError, match=r"train\.batch_size=1 cannot train bloodnet at data\.image_size=32: "
                       r".*use train\.batch_size >= 2 or a larger data\.image_size"):  # fmt: skip
        load_config("default", ["data.image_size=32", "train.batch_size=1"])
    with pytest.raises(ConfigError, match=r"at augment\.crop=32: "):
        load_config("default", ["data.image_size=64", "augment.crop=32", "train.batch_size=1"])
    assert load_config("default", ["data.image_size=48", "train.batch_size=1"]).train.batch_size == 1
    assert load_config("default", ["data.image_size=32", "train.batch_size=2"]).train.batch_size == 2
    # The consistency loss trains on two views of each image: two values per channel.
    assert load_config("default", ["data.image_size=32", "train.batch_size=1", "augment.consistency=1"])


@pytest.mark.parametrize(
    "typed,meant",
    [
        ("epochs=5", "train.epochs"),  # no section: the one key of that name
        ("lr=0.01", "optimizer.lr"),
        ("image_size=64", "data.image_size"),
        ("train.lr=0.01", "optimizer.lr"),  # a key of another section
        ("train.epoch=3", "train.epochs"),  # a close spelling in its own section
    ],
)
def test_an_unknown_key_is_answered_with_the_key_meant(typed: str, meant: str) -> None:
    key = typed.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}' \(did you mean '{meant}'\?\)$"):
        load_config("default", [typed])


def test_a_key_of_several_sections_is_answered_with_each_and_an_unrelated_one_with_none() -> None:
    assert did_you_mean(("data", "name")) == " (did you mean 'name', 'model.name', 'optimizer.name' or 'schedule.name'?)"
    with pytest.raises(ConfigError, match=r"unknown config key 'augment\.colour'$"):  # was "augment.blur"
        load_config("default", ["augment.colour=0.1"])
