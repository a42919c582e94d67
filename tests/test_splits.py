"""Split protocols: no overlap, embargo, duplicate groups on one side, classes present, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bloodcell import CLASSES
from bloodcell.data.splits import (
    SPLIT_RULES,
    LeakageError,
    check_leakage,
    effective_embargo,
    make_split,
    save_split,
    session_blocks,
    split_counts,
    split_summary,
)
from bloodcell.errors import UserError

PROTOCOLS = ["session", "random", "kfold"]


def synthetic_manifest(
    per_class: tuple[int, ...] = (120, 200, 180, 150), duplicates: list[tuple[int, int]] = ()
) -> pd.DataFrame:
    """A manifest without images: capture numbers 1..n per class; ``duplicates`` joins row pairs into groups."""
    rows = []
    for label, n in enumerate(per_class):
        for capture in range(1, n + 1):
            rows.append(
                {
                    "path": f"{CLASSES[label]}/img-{capture:04d}.jpg",
                    "class": CLASSES[label],
                    "label": label,
                    "sha256": f"{label:02d}{capture:062d}",
                    "phash": f"{len(rows):016x}",
                    "capture": capture,
                    "copy": 0,
                    "rejected": False,
                    "reason": "",
                }
            )
    manifest = pd.DataFrame(rows)
    manifest["exact_group"] = np.arange(len(manifest))
    manifest["dup_group"] = np.arange(len(manifest))
    for a, b in duplicates:
        manifest.loc[manifest["dup_group"] == manifest.at[b, "dup_group"], "dup_group"] = manifest.at[
            a, "dup_group"
        ]
    return manifest


def capture_distance_to_held_out(split: pd.DataFrame) -> pd.Series:
    """For each row, the capture-order distance to the nearest val/test row of its class (inf if none)."""
    distances = pd.Series(np.inf, index=split.index)
    for _, rows in split.groupby("label"):
        order = rows.sort_values(["capture", "copy", "path"])
        position = pd.Series(np.arange(len(order)), index=order.index)
        held = position[order["split"].isin(["val", "test"])].to_numpy()
        if len(held):
            distances[order.index] = [np.abs(held - p).min() for p in position]
    return distances


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_accepted_row_once_and_parts_disjoint(protocol: str) -> None:
    manifest = synthetic_manifest()
    manifest.loc[3, ["rejected", "reason"]] = (True, "empty file (0 bytes)")
    split = make_split(manifest, protocol, seed=1)
    assert split["path"].is_unique
    assert list(split["path"]) == list(manifest.loc[~manifest["rejected"], "path"])  # manifest order kept
    assert set(split["split"]) <= {"train", "val", "test", "embargo"}
    check_leakage(split)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_all_classes_present_in_every_used_part(protocol: str) -> None:
    split = make_split(synthetic_manifest(), protocol, seed=3)
    parts = ["train", "val"] + (["test"] if protocol != "kfold" else [])
    for part in parts:
        assert set(split.loc[split["split"] == part, "class"]) == set(CLASSES), part
    if protocol == "kfold":
        assert not (split["split"] == "test").any()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deterministic_per_seed(protocol: str) -> None:
    manifest = synthetic_manifest()
    first = make_split(manifest, protocol, seed=7)
    pd.testing.assert_frame_equal(first, make_split(manifest, protocol, seed=7))
    assert not first["split"].equals(make_split(manifest, protocol, seed=8)["split"])


def test_session_blocks_are_contiguous_and_named() -> None:
    blocked = session_blocks(synthetic_manifest(), block_size=40)
    assert blocked.loc[0, "block"] == "Benign:00"
    for _, rows in blocked.groupby("label"):
        ordered = rows.sort_values("capture")
        assert ordered["block_index"].is_monotonic_increasing
        assert ordered.groupby("block_index").size().between(35, 45).all()
    assert blocked.groupby("label")["block_index"].max().tolist() == [2, 4, 4, 3]  # round(n / 40) blocks - 1


def test_session_holds_out_whole_blocks_with_embargo() -> None:
    embargo = 5
    split = make_split(synthetic_manifest(), "session", seed=2, embargo=embargo)
    # Whole blocks: every block is held out entirely or not at all (no duplicates here to move rows).
    parts_per_block = split.groupby("block")["split"].agg(lambda s: set(s) & {"val", "test"})
    for block, held in parts_per_block.items():
        members = split[split["block"] == block]
        if held:
            assert len(held) == 1 and set(members["split"]) == held, block
    distance = capture_distance_to_held_out(split)
    assert (distance[split["split"] == "train"] > embargo).all()
    # The embargo is exactly the training candidates within reach: nothing more is thrown away.
    assert (distance[split["split"] == "embargo"] <= embargo).all()
    assert (split["split"] == "embargo").sum() > 0


def test_session_fractions_roughly_respected() -> None:
    counts = split_counts(make_split(synthetic_manifest(), "session", seed=0), CLASSES)
    total = 650
    assert 0.08 < counts["test"]["total"] / total < 0.25
    assert 0.08 < counts["val"]["total"] / total < 0.25


def test_embargo_zero_keeps_everything_else_in_training() -> None:
    split = make_split(synthetic_manifest(), "session", seed=0, embargo=0)
    assert not (split["split"] == "embargo").any()


def test_embargo_is_capped_at_half_a_block_for_small_datasets() -> None:
    manifest = synthetic_manifest(per_class=(24, 24, 24, 24))
    split = make_split(manifest, "session", seed=0)
    blocked = session_blocks(manifest[~manifest["rejected"]], 40, min_blocks=7)
    assert effective_embargo(12, blocked) == 1
    counts = split_counts(split, CLASSES)
    assert all(counts["train"][name] >= 10 for name in CLASSES)


def test_a_class_of_few_images_caps_only_its_own_embargo(caplog: pytest.LogCaptureFixture) -> None:
    """One class of 24 images (blocks of 3-4) must not take the other classes' embargo with it."""
    manifest = synthetic_manifest(per_class=(200, 200, 200, 24))
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        split = make_split(manifest, "session", seed=0, embargo=12)
    distance = capture_distance_to_held_out(split)
    for name in CLASSES[:3]:  # the full embargo: every image within 12 of a held-out block left out
        rows = (split["class"] == name) & (distance <= 12) & ~split["split"].isin(["val", "test"])
        assert rows.any() and (split.loc[rows, "split"] == "embargo").all(), name
    assert "less than 12 images" in caplog.text and "Pro-B 1" in caplog.text and "Benign" not in caplog.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_duplicate_groups_never_straddle(protocol: str, seed: int) -> None:
    # Far-apart re-captures (as found in the real data) and a consecutive pair, in several classes.
    pairs = [(5, 100), (10, 11), (130, 300), (200, 201), (330, 480), (500, 640), (520, 521)]
    manifest = synthetic_manifest(duplicates=pairs)
    split = make_split(manifest, protocol, seed=seed)
    used = split[split["split"].isin(["train", "val", "test"])]
    assert (used.groupby("dup_group")["split"].nunique() == 1).all()
    check_leakage(split)


def test_kfold_folds_partition_blocks() -> None:
    manifest = synthetic_manifest()
    folds = 4
    vals = []
    for fold in range(folds):
        split = make_split(manifest, "kfold", seed=0, folds=folds, fold=fold)
        assert split["fold"].between(0, folds - 1).all()
        assert (split.groupby("block")["fold"].nunique() == 1).all()  # a session block is never cut
        assert set(split.loc[split["split"] == "val", "fold"]) == {fold}
        vals.append(set(split.loc[split["split"] == "val", "path"]))
        distance = capture_distance_to_held_out(split)
        assert (distance[split["split"] == "train"] > effective_embargo(12, split)).all()
    assert set().union(*vals) == set(manifest["path"])
    assert sum(len(v) for v in vals) == len(manifest)


def test_random_split_is_stratified() -> None:
    split = make_split(synthetic_manifest(), "random", seed=0)
    share = split.groupby("class")["split"].apply(lambda s: (s == "test").mean())
    assert share.between(0.10, 0.20).all()
    assert not (split["split"] == "embargo").any()


def test_check_leakage_catches_identical_files() -> None:
    split = make_split(synthetic_manifest(), "session", seed=0)
    train_row = split.index[split["split"] == "train"][0]
    test_row = split.index[split["split"] == "test"][0]
    split.loc[test_row, "sha256"] = split.loc[train_row, "sha256"]
    with pytest.raises(LeakageError, match="identical files in two parts"):
        check_leakage(split)


def test_check_leakage_catches_near_duplicates_and_repeated_paths() -> None:
    split = make_split(synthetic_manifest(), "session", seed=0)
    train_row = split.index[split["split"] == "train"][0]
    val_row = split.index[split["split"] == "val"][0]
    leaky = split.copy()
    leaky.loc[val_row, "dup_group"] = leaky.loc[train_row, "dup_group"]
    with pytest.raises(LeakageError, match="near duplicates"):
        check_leakage(leaky)
    repeated = pd.concat([split, split.loc[[train_row]].assign(split="test")])
    with pytest.raises(LeakageError, match="appears twice"):
        check_leakage(repeated)
    # An embargoed copy is used by nothing, so it is not a leak.
    harmless = split.copy()
    embargo_row = split.index[split["split"] == "embargo"][0]
    harmless.loc[embargo_row, "dup_group"] = harmless.loc[train_row, "dup_group"]
    check_leakage(harmless)


def test_split_summary_keys_and_verdict() -> None:
    split = make_split(synthetic_manifest(), "session", seed=0)
    summary = split_summary(split, "session", 0, CLASSES, None)
    assert set(summary) == {
        "protocol",
        "seed",
        "counts",
        "blocks",
        "leakage_check",
        "leakage_message",
        "capture_gaps",
        "split",
        "split_rules",
        "split_sha256",
    }
    assert summary["leakage_check"] == "passed"
    assert set(summary["counts"]) == {"train", "val", "test", "embargo"}
    assert sum(part["total"] for part in summary["counts"].values()) == 650
    split.loc[split.index[split["split"] == "test"][0], "sha256"] = split.loc[split.index[0], "sha256"]
    split.loc[split.index[0], "split"] = "train"
    assert split_summary(split, "session", 0, CLASSES, None)["leakage_check"] == "failed"


def test_user_errors() -> None:
    with pytest.raises(UserError, match="unknown split protocol"):
        make_split(synthetic_manifest(), "bogus")
    with pytest.raises(UserError, match="too few"):
        make_split(synthetic_manifest(per_class=(2, 50, 50, 50)), "session")
    with pytest.raises(UserError, match="out of range"):
        make_split(synthetic_manifest(), "kfold", folds=3, fold=3)
    rejected = synthetic_manifest().assign(rejected=True)
    with pytest.raises(UserError, match="no accepted images"):
        make_split(rejected, "session")
    for protocol in PROTOCOLS:  # a fraction of 0 once divided by zero; 0.5 or more leaves no training part
        for fraction in (0, 0.5, -0.2):
            with pytest.raises(UserError, match=rf"validation fraction \(--val-fraction, data.val_fraction\) must be more "
                               rf"than 0 and less than 0.5, got {fraction}"):  # fmt: skip
                make_split(synthetic_manifest(), protocol, val_fraction=fraction)
        with pytest.raises(UserError, match="test fraction"):
            make_split(synthetic_manifest(), protocol, test_fraction=0)
    with pytest.raises(UserError, match=r"seed \(--seed, data.split_seed\) must be 0 or more"):
        make_split(synthetic_manifest(), "session", seed=-1)
    with pytest.raises(UserError, match="cannot cut 40 stratified folds"):
        make_split(synthetic_manifest(per_class=(12, 12, 12, 12)), "kfold", folds=40, block_size=1)


def test_a_duplicate_group_across_parts_keeps_its_held_out_members_and_leaves_the_rest_out() -> None:
    """A member is never moved into a held-out block (it would bring a training session with it): the
    members outside the most protected part the group touches are left out instead."""
    from bloodcell.data.splits import keep_duplicate_groups_together

    split = pd.DataFrame({
        "dup_group": [0, 0, 1, 1, 2, 3],
        "split": ["train", "test", "val", "test", "train", "embargo"],
    })  # fmt: skip
    kept = keep_duplicate_groups_together(split)["split"].tolist()
    assert kept == ["embargo", "test", "embargo", "test", "train", "embargo"]


def test_a_split_table_without_the_columns_to_check_does_not_pass() -> None:
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "split": ["train", "test"]})
    with pytest.raises(LeakageError, match="lacks the column\\(s\\) sha256, dup_group"):
        check_leakage(table)


def test_a_part_emptied_for_a_class_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """Every validation image of a class duplicating a test image of another class (within a class, the
    draw holds joined blocks out together): the group stays in test, and the class has no validation image
    left, which is said (its recall there would be undefined)."""
    manifest = synthetic_manifest((40, 40))
    first = make_split(manifest, seed=0, block_size=4, embargo=0)
    a, b = first[first["label"] == 0], first[first["label"] == 1]
    for val_row, test_row in zip(a.index[a["split"] == "val"], b.index[b["split"] == "test"], strict=True):
        manifest.loc[[val_row, test_row], "dup_group"] = 1000 + val_row
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        split = make_split(manifest, seed=0, block_size=4, embargo=0)
    assert not ((split["label"] == 0) & (split["split"] == "val")).any()
    assert any("the val part holds no image of " + CLASSES[0] in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        make_split(synthetic_manifest((40, 40)), seed=0, block_size=4, embargo=0)
    assert not caplog.records


def test_a_class_of_two_images_is_told_apart_from_blocks_too_large() -> None:
    """No block size splits 2 images three ways: the message must not send the user to --block-size."""
    with pytest.raises(UserError, match=r"class 'Pro-B' has only 2 image\(s\).*3 at the least") as raised:
        make_split(synthetic_manifest(per_class=(120, 200, 180, 2)), "session", seed=0)
    assert "block" not in str(raised.value)


def test_a_class_that_is_one_duplicate_group_is_named_as_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    """Near-identical images (a blank field) make one group, which stays in one part: the warning says that,
    not "too few images"."""
    manifest = synthetic_manifest((60, 60, 60, 60))
    manifest.loc[manifest["class"] == CLASSES[1], "dup_group"] = 999
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        make_split(manifest, seed=0)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"no image of {CLASSES[1]}: 60 of its 60 images are one duplicate group" in message


def test_a_warning_its_logger_dropped_is_given_when_it_is_heard(caplog: pytest.LogCaptureFixture) -> None:
    """warn_once counts a warning as given only when its logger lets it through."""
    import logging

    from bloodcell.notices import warn_once

    quiet = logging.getLogger("bloodcell.test.quiet")
    quiet.setLevel(logging.ERROR)
    warn_once(quiet, "said once %d", 1)
    quiet.setLevel(logging.NOTSET)
    with caplog.at_level("WARNING", logger="bloodcell.test.quiet"):
        warn_once(quiet, "said once %d", 1)
    assert "said once 1" in caplog.text


def test_series_numbered_from_1_each_are_kept_in_their_own_stretch_not_interleaved() -> None:
    """Files named per patient or slide (P01_001, P02_001, ...) restart their numbers: sorted by number alone,
    P01_005 and P02_005 would sit side by side and every block would mix patients, with each held-out
    image's next capture in training."""
    from bloodcell.data.index import capture_series

    assert capture_series("Benign/WBC-Benign-011.jpg") == "Benign/WBC-Benign-"
    assert capture_series("Pro-B/P02_011 (1).png") == "Pro-B/P02_"
    assert capture_series("Pro-B/pA/011.png") == "Pro-B/pA/"
    rows = []
    for label in (0, 1):
        for series in range(20):
            for capture in range(1, 21):
                rows.append({"path": f"{CLASSES[label]}/P{series:02d}_{capture:03d}.png", "class": CLASSES[label],
                             "label": label, "sha256": f"{len(rows):064d}", "phash": f"{len(rows):016x}",
                             "capture": capture, "copy": 0, "rejected": False, "reason": ""})  # fmt: skip
    manifest = pd.DataFrame(rows).assign(exact_group=lambda t: np.arange(len(t)), dup_group=lambda t: np.arange(len(t)))
    split = make_split(manifest, "session", seed=0)
    series_of = split["path"].str.extract(r"/(P\d\d)_")[0]
    held_out = split["split"].isin(["val", "test"])
    # Every series lies in one part (blocks of 40 are two whole series of 20), so no held-out image has a
    # capture of its own series in training.
    for key, rows_of_series in split.groupby([split["label"], series_of]):
        used = set(rows_of_series["split"]) - {"embargo"}
        assert len(used) == 1, (key, used)
    assert held_out.any()


def test_the_summary_gives_the_capture_order_gap_the_leakage_check_does_not_see() -> None:
    """Blocks of one image cap the embargo at 0: a session split then is a random one, with held-out images
    next to training images, and only this gap says so (duplicates are what the leakage check sees)."""
    from bloodcell.data.splits import split_summary

    def gaps(**kwargs) -> dict:
        split = make_split(synthetic_manifest(), seed=0, **kwargs)
        return split_summary(split, kwargs["protocol"], 0, CLASSES, None)["capture_gaps"]

    assert min(gaps(protocol="session").values()) > 1 and min(gaps(protocol="kfold").values()) > 1
    assert set(gaps(protocol="session", block_size=1).values()) == {1}
    assert set(gaps(protocol="random").values()) == {1}


def test_a_random_split_that_cannot_give_the_fractions_asked_says_what_it_gives(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        make_split(synthetic_manifest(), "random", seed=0, test_fraction=0.15, val_fraction=0.15)
    assert "the random split holds out whole folds" not in caplog.text
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        make_split(synthetic_manifest(), "random", seed=0, test_fraction=0.4, val_fraction=0.3)
    assert "the random split holds out whole folds (a share of 1/k), so it gives test 0.50 for 0.4" in caplog.text


def test_a_split_of_other_settings_is_saved_under_another_name() -> None:
    """A model's metrics.json names its split file: another split must never replace it under that name."""
    from bloodcell.data.splits import split_file_name

    default = split_file_name("session", 0, val_fraction=0.15, test_fraction=0.15, block_size=40, embargo=12)
    assert default == f"session-seed0-rules{SPLIT_RULES}.csv"
    others = {split_file_name("session", 0, block_size=1), split_file_name("session", 0, embargo=0),
              split_file_name("session", 0, class_names=["a", "b"]), split_file_name("session", 0, val_fraction=0.2)}  # fmt: skip
    assert len(others) == 4 and default not in others
    assert split_file_name("kfold", 1, 2, folds=3) != split_file_name("kfold", 1, 2, folds=5) == f"kfold-seed1-fold2-rules{SPLIT_RULES}.csv"


def test_a_split_cut_by_newer_rules_is_saved_under_another_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Newer rules may cut other parts from the same settings: the older file, which an older model's
    metrics.json names, must stay as it was."""
    import bloodcell.data.splits as splits

    now = splits.split_file_name("session", 0)
    monkeypatch.setattr(splits, "SPLIT_RULES", SPLIT_RULES + 1)
    assert splits.split_file_name("session", 0) != now


def test_the_split_summary_records_the_rules_and_a_hash_of_the_saved_table(tmp_path: Path) -> None:
    split = make_split(synthetic_manifest(), "session", seed=0)
    path = save_split(split, tmp_path / "split.csv")
    summary = split_summary(split, "session", 0, CLASSES, path)
    assert summary["split_rules"] == SPLIT_RULES
    assert summary["split_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    split.loc[split.index[0], "split"] = "embargo"
    assert split_summary(split, "session", 0, CLASSES, path)["split_sha256"] != summary["split_sha256"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_split_does_not_depend_on_the_manifest_s_row_order(protocol: str) -> None:
    manifest = synthetic_manifest(duplicates=[(3, 40), (200, 215)])
    shuffled = manifest.sample(frac=1.0, random_state=7).reset_index(drop=True)
    by_path = make_split(manifest, protocol, seed=1).set_index("path")["split"]
    assert make_split(shuffled, protocol, seed=1).set_index("path")["split"].loc[by_path.index].equals(by_path)


@pytest.mark.parametrize("seed", range(8))
def test_session_blocks_joined_by_a_re_capture_are_held_out_together(seed: int) -> None:
    """A field re-captured in a far-away block makes the two blocks one slide: holding out one and leaving
    only the re-captured image of the other out would keep the rest of that session in training."""
    manifest = synthetic_manifest(per_class=(400, 400, 400, 400), duplicates=[(85, 285), (1205, 1525)])
    without_embargo = make_split(manifest, "session", seed=seed, embargo=0)
    assert not (without_embargo["split"] == "embargo").any()  # no re-captured image had to be left out
    split = make_split(manifest, "session", seed=seed)
    for first, second in (("Benign:02", "Benign:07"), ("Pro-B:00", "Pro-B:08")):
        parts = {
            block: set(split.loc[(split["block"] == block) & (split["split"] != "embargo"), "split"])
            for block in (first, second)
        }
        assert parts[first] == parts[second], (first, second, parts)
    counts = split[split["split"].isin(["val", "test"])].groupby(["label", "split"])["block"].nunique()
    assert (counts == 2).all(), counts  # the parts keep their size: a joined pair that does not fit is passed over


def test_a_group_of_joined_blocks_too_large_for_any_part_is_cut_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Class 0's seven blocks of 17 images are one group: no part can take it whole, so a block is held out alone.
    chain = [5, 25, 45, 60, 75, 90, 110]
    manifest = synthetic_manifest(per_class=(120, 200, 180, 150), duplicates=list(zip(chain, chain[1:])))
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        split = make_split(manifest, "session", seed=0, embargo=0)
    benign = split[split["label"] == 0]
    assert set(benign["split"]) >= {"train", "val", "test"}
    assert benign[benign["split"] == "test"]["block"].nunique() == 1 == benign[benign["split"] == "val"]["block"].nunique()
    assert "class 'Benign'" in caplog.text and "too large to hold out whole" in caplog.text
    check_leakage(split)


def test_a_part_that_whole_groups_cannot_fill_is_topped_up_not_left_short(caplog: pytest.LogCaptureFixture) -> None:
    """Twenty blocks joined in pairs cannot give 3 held-out blocks whole: the third is cut from a pair (with
    the warning), rather than the part quietly holding 2 (10 % instead of 15 %)."""
    pairs = [(40 * k + 5, 40 * (k + 1) + 5) for k in range(0, 20, 2)]
    manifest = synthetic_manifest(per_class=(800, 200, 180, 150), duplicates=pairs)
    with caplog.at_level("WARNING", logger="bloodcell.data.splits"):
        split = make_split(manifest, "session", seed=0, embargo=0)
    benign = split[split["label"] == 0]
    assert benign[benign["split"] == "test"]["block"].nunique() == 3 == benign[benign["split"] == "val"]["block"].nunique()
    assert "too large to hold out whole" in caplog.text


def test_capture_neighbours_are_the_rows_an_embargo_would_take() -> None:
    """On other data evaluation leaves out the neighbours of images the model trained on, as the embargo
    keeps them from a held-out part: within the distance, in capture order, in the same class only."""
    from bloodcell.data.splits import capture_neighbours

    manifest = synthetic_manifest(per_class=(30, 30, 30, 30)).sample(frac=1.0, random_state=0)  # any row order
    marked = ((manifest["label"] == 0) & (manifest["capture"] == 10)).to_numpy()
    near = capture_neighbours(manifest, marked, 2)
    assert sorted(manifest.loc[near, "capture"]) == [8, 9, 11, 12] and set(manifest.loc[near, "label"]) == {0}
    assert not capture_neighbours(manifest, marked, 0).any() and not capture_neighbours(manifest, ~marked & False, 3).any()


def test_names_without_capture_order_have_no_neighbours() -> None:
    """Hash-like names sort in no capture order: a training image's "neighbours" would be arbitrary images."""
    from bloodcell.data.splits import capture_neighbours

    manifest = synthetic_manifest(per_class=(30, 30, 30, 30))
    import hashlib

    manifest["path"] = [f"{name}/{hashlib.sha1(str(k).encode()).hexdigest()}.jpg" for k, name in enumerate(manifest["class"])]
    marked = (manifest["label"] == 0).to_numpy() & (manifest.index % 5 == 0)
    assert not capture_neighbours(manifest, marked, 3).any()
    blocked = make_split(synthetic_manifest(per_class=(30, 30, 30, 30)), "session", 0)  # with blocks: capped
    assert capture_neighbours(blocked, (blocked["capture"] == 10).to_numpy(), 12).sum() <= 4 * 2 * 12


def test_the_bootstrap_resamples_blocks_a_re_capture_joins_as_one_unit() -> None:
    """Two blocks of one slide are not independent samples: the interval must resample them together."""
    from bloodcell.data.splits import bootstrap_blocks

    manifest = synthetic_manifest(per_class=(400, 400, 400, 400), duplicates=[(85, 285)])
    split = make_split(manifest, "session", seed=0)
    rows = np.arange(len(split))
    units = bootstrap_blocks(split, rows)
    joined = (split["block"] == "Benign:02") | (split["block"] == "Benign:07")
    assert set(units[joined.to_numpy()]) == {"Benign:02+Benign:07"}
    assert (units[~joined.to_numpy()] == split["block"].to_numpy()[~joined.to_numpy()]).all()
    # named by the blocks among the rows asked for
    only_one = np.flatnonzero((split["block"] == "Benign:07").to_numpy())
    assert set(bootstrap_blocks(split, only_one)) == {"Benign:07"}


def test_joined_blocks_that_would_leave_a_class_one_unit_stay_apart_and_classes_are_never_joined() -> None:
    """One unit would send the class to an image-level bootstrap, narrower than resampling its blocks
    apart; a duplicate shared by two classes must not merge their units (each class is its own stratum)."""
    from bloodcell.data.splits import bootstrap_blocks
    from bloodcell.evaluate.metrics import block_bootstrap_ci

    manifest = synthetic_manifest(per_class=(400, 400, 400, 400), duplicates=[(85, 285), (5, 405)])
    split = make_split(manifest, "session", seed=0)
    benign = np.flatnonzero(split["block"].isin(["Benign:02", "Benign:07"]).to_numpy())
    assert sorted(set(bootstrap_blocks(split, benign))) == ["Benign:02", "Benign:07"]  # a class of two blocks
    rows = np.arange(len(split))
    units = bootstrap_blocks(split, rows)
    assert "Benign:02+Benign:07" in set(units)  # with the class's other blocks beside them: joined
    assert not any("Benign" in u and "Early" in u for u in units)  # the cross-class duplicate joined nothing
    # The interval of two joined blocks, one read wrong: as wide as resampling the two blocks apart.
    y_true = np.zeros(len(benign), dtype=np.int64)
    y_pred = np.where(split["block"].to_numpy()[benign] == "Benign:02", 1, 0)
    low, high = block_bootstrap_ci(y_true, y_pred, bootstrap_blocks(split, benign), 2, n_resamples=400)
    assert high - low > 0.5
    # A bootstrap that pools the classes (the Grad-CAM cell-focus interval) resamples the slide whole.
    assert set(bootstrap_blocks(split, benign, stratified=False)) == {"Benign:02+Benign:07"}
    # A row without a duplicate group is a group of its own, not chained to every other such row.
    no_group = split.copy()
    no_group["dup_group"] = no_group["dup_group"].astype(float)
    no_group.loc[no_group.index[(no_group["block"] == "Benign:00").to_numpy()][:1], "dup_group"] = np.nan
    no_group.loc[no_group.index[(no_group["block"] == "Benign:05").to_numpy()][:1], "dup_group"] = np.nan
    assert not any("Benign:00+" in unit for unit in bootstrap_blocks(no_group, rows))


def test_a_class_of_one_image_is_not_said_to_be_one_duplicate_group() -> None:
    from bloodcell.data.splits import _why_a_part_is_empty

    rows = pd.DataFrame({"dup_group": [7], "block": ["a:00"], "label": [0]})
    assert "duplicate group" not in _why_a_part_is_empty(rows, "a")


def manifest_in_sub_folders(sizes: tuple[int, ...] = (30, 8, 22, 15, 5, 26, 12, 9), loose: int = 0) -> pd.DataFrame:
    """Two classes whose images lie in per-patient sub-folders (``Benign/patient03/img_7.jpg``) of uneven
    sizes, numbered from 1 in each, and ``loose`` more directly in each class folder."""
    manifest = synthetic_manifest((sum(sizes) + loose,) * 2)
    for label in (0, 1):
        rows = manifest.index[manifest["label"] == label]
        paths = [f"{CLASSES[label]}/patient{p:02d}/img_{k}.jpg" for p, n in enumerate(sizes) for k in range(1, n + 1)]
        paths += [f"{CLASSES[label]}/loose_{k:03d}.jpg" for k in range(1, loose + 1)]
        manifest.loc[rows, "path"] = paths
        manifest.loc[rows, "capture"] = [int(path.rsplit("_", 1)[1].split(".")[0]) for path in paths]
    return manifest


def parts_of_each_sub_folder(split: pd.DataFrame) -> pd.Series:
    used = split[split["split"].isin(["train", "val", "test"])]
    return used.groupby(used["path"].str.rsplit("/", n=1).str[0])["split"].nunique()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_class_folder_s_sub_folders_are_kept_whole_in_one_part(protocol: str) -> None:
    """A patient's (or slide's) sub-folder is the strongest grouping a user gives: never in two parts. Blocks
    of a fixed size had cut across them, and the leakage check passed the split."""
    manifest = manifest_in_sub_folders(loose=20)
    for seed in range(6):
        split = make_split(manifest, protocol, seed, block_size=10, embargo=2, folds=3)
        within = parts_of_each_sub_folder(split[split["path"].str.contains("patient")])
        assert (within == 1).all(), (protocol, seed, within[within > 1])
        if protocol != "random":  # and a block holds whole sub-folders (or loose files)
            nested = split[split["path"].str.contains("patient")]
            assert (nested.groupby(nested["path"].str.rsplit("/", n=1).str[0])["block"].nunique() == 1).all()
        assert set(split.loc[split["split"].isin(["train", "val", "test"]), "class"]) == {"Benign", "Early Pre-B"}


def test_a_sub_folder_in_two_parts_fails_the_leakage_check() -> None:
    split = make_split(manifest_in_sub_folders(), "session", 0, block_size=10, embargo=0)
    patient = split["path"].str.startswith("Benign/patient00/")
    held = split.loc[patient, "split"].iloc[0]
    split.loc[split.index[patient][0], "split"] = "val" if held == "train" else "train"
    with pytest.raises(LeakageError, match="sub-folder Benign/patient00/ in"):
        check_leakage(split)


def test_one_sub_folder_holding_a_whole_class_tells_no_one_apart() -> None:
    """``Benign/jpg/...``: split as if its files lay loose, not as one block."""
    flat = synthetic_manifest((60, 60))
    nested = flat.assign(path=flat["path"].str.replace("/", "/jpg/", n=1, regex=False))
    assert (make_split(flat, "session", 0, block_size=10)["split"].to_numpy()
            == make_split(nested, "session", 0, block_size=10)["split"].to_numpy()).all()  # fmt: skip


def test_too_few_sub_folders_for_the_parts_is_said_so() -> None:
    with pytest.raises(UserError, match=r"'Benign' gives only 2 session block\(s\).*lie in 2 sub-folder\(s\)"):
        make_split(manifest_in_sub_folders(sizes=(30, 30)), "session", 0, block_size=10)


def test_a_class_smaller_than_the_folds_gets_no_raw_scikit_learn_warning() -> None:
    """scikit-learn's "The least populated class in y has only 2 members ... n_splits=7" named its own source
    file and a fold count the user never set; the split's own warning names the class's empty part."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_split(synthetic_manifest((40, 2)), "random", 0)
    assert not [w for w in caught if "least populated" in str(w.message)]


def manifest_of_folders(layout: dict[str, list[tuple[str, int]]]) -> pd.DataFrame:
    """Classes of named sub-folders (``""``: loose files in the class folder) with given image counts."""
    per_class = tuple(sum(n for _, n in folders) for folders in layout.values())
    manifest = synthetic_manifest(per_class)
    for label, folders in enumerate(layout.values()):
        rows = manifest.index[manifest["label"] == label]
        paths = [f"{CLASSES[label]}/{folder + '/' if folder else ''}img_{k:03d}.jpg" for folder, n in folders
                 for k in range(1, n + 1)]  # fmt: skip
        manifest.loc[rows, "path"] = paths
        manifest.loc[rows, "capture"] = [int(path[-7:-4]) for path in paths]
    return manifest


def test_three_patients_a_class_still_leave_one_to_train_on() -> None:
    """Another patient's images beside a held-out one are no capture-order neighbours: the embargo between
    them emptied the training part (train 0, val 24, test 24)."""
    manifest = manifest_of_folders({"b": [("p1", 12), ("p2", 8), ("p3", 12)], "e": [("q1", 12), ("q2", 8), ("q3", 12)]})
    for seed in range(4):
        split = make_split(manifest, "session", seed)
        assert (split.groupby("class")["split"].apply(lambda parts: (parts == "train").sum()) > 0).all(), seed
        assert (parts_of_each_sub_folder(split) == 1).all()


def test_loose_files_beside_a_large_sub_folder_still_make_blocks_of_their_own() -> None:
    """One patient of 100 images and 40 loose files: the loose ones share the blocks left, and a held-out
    patient leaves them to train on."""
    manifest = manifest_of_folders({"b": [("p1", 100), ("", 40)], "e": [("", 140)]})
    for seed in range(5):
        split = make_split(manifest, "session", seed)
        benign = split[split["class"] == CLASSES[0]]
        assert benign["block"].nunique() == 7 and (benign["split"] == "train").sum() > 0, seed
        assert benign.loc[benign["path"].str.contains("/p1/"), "split"].nunique() == 1


def test_patients_inside_one_folder_that_holds_the_whole_class_are_kept_whole() -> None:
    """Benign/all/p1/...: the folder shared by every file tells no one apart, its sub-folders do."""
    manifest = manifest_of_folders({"b": [(f"all/p{k}", 15) for k in range(1, 6)], "e": [(f"q{k}", 15) for k in range(1, 6)]})
    for protocol in PROTOCOLS:
        split = make_split(manifest, protocol, 0, folds=3, embargo=2)
        assert (parts_of_each_sub_folder(split) == 1).all(), protocol


def test_too_few_sub_folders_for_the_folds_say_what_helps() -> None:
    manifest = manifest_of_folders({"b": [("p1", 30), ("p2", 30)], "e": [("q1", 30), ("q2", 30)]})
    with pytest.raises(UserError, match=r"sub-folders \(4, each kept whole in one block\) bound the blocks"):
        make_split(manifest, "kfold", 0, block_size=5)
    with pytest.raises(UserError, match=r"the sub-folders \(4, each kept whole\) are too few.*--test-fraction"):
        make_split(manifest, "random", 0)


def test_loose_files_before_large_sub_folders_keep_even_blocks_and_their_embargo() -> None:
    """Each block took its share of what was left, large sub-folders still to come included: the last loose
    files became blocks of one image, and the class's embargo (half its smallest block) fell to 0."""
    from bloodcell.data.splits import capture_gaps

    manifest = manifest_of_folders({"b": [("", 300), ("p1", 100), ("p2", 100), ("p3", 100)], "e": [("", 600)]})
    split = make_split(manifest, "session", 0)
    benign = split[split["class"] == CLASSES[0]]
    loose = benign[~benign["path"].str.contains("/p")]
    assert loose.groupby("block").size().between(20, 30).all()  # 300 loose files in 12 blocks of 25
    assert capture_gaps(split)[CLASSES[0]] > 12  # the embargo of 12 kept between training and held-out images


def test_capture_neighbours_are_another_patient_s_images_no_more_than_the_embargo_s() -> None:
    from bloodcell.data.splits import capture_neighbours

    manifest = manifest_of_folders({"b": [(f"p{k}", 40) for k in range(1, 5)], "e": [("", 160)]})
    marked = manifest["path"].str.startswith(f"{CLASSES[0]}/p1/").to_numpy()
    near = capture_neighbours(manifest, marked, 12)
    assert not near[manifest["path"].str.startswith(f"{CLASSES[0]}/p2/").to_numpy()].any()
    loose = manifest_of_folders({"b": [("", 160)], "e": [("", 160)]})
    first = (loose["label"] == 0).to_numpy() & (loose["capture"] <= 40).to_numpy()
    assert capture_neighbours(loose, first, 12).sum() == 12  # loose files: the 12 after the marked run


def test_a_stray_loose_file_beside_sub_folders_keeps_the_class_s_embargo() -> None:
    """One loose file sorted after the sub-folders (scan_001.png) became a block of one image, and the class's
    embargo (half its smallest loose block) fell to 0 for its 300 other loose files."""
    from bloodcell.data.splits import capture_gaps

    manifest = manifest_of_folders({"b": [("", 300), *[(f"p{k}", 40) for k in range(1, 5)]], "e": [("", 460)]})
    stray = manifest.index[manifest["label"] == 0][-1]
    manifest.loc[stray, "path"] = f"{CLASSES[0]}/scan_001.jpg"  # loose, sorted after the sub-folders
    split = make_split(manifest, "session", 0)
    assert split[split["class"] == CLASSES[0]].groupby("block").size().min() > 1
    assert capture_gaps(split)[CLASSES[0]] > 12


def test_capture_gaps_count_the_steps_the_embargo_counts() -> None:
    """Loose files on either side of the sub-folders are a whole sub-folder apart, not neighbours."""
    from bloodcell.data.splits import capture_gaps

    manifest = manifest_of_folders({"b": [("", 10), *[(f"p{k}", 40) for k in range(1, 5)], ("", 0)], "e": [("", 170)]})
    first, last = manifest.index[manifest["label"] == 0][[9, 10]]
    split = manifest.assign(split="train", block="b")
    split.loc[[first], "split"] = "train"
    split.loc[split["path"].str.startswith(f"{CLASSES[0]}/p"), "split"] = "test"
    split.loc[last, "path"] = f"{CLASSES[0]}/z_001.jpg"  # loose, after the sub-folders: 160 images on
    split.loc[last, "split"] = "val"
    assert capture_gaps(split)[CLASSES[0]] == 160


def test_no_embargo_warning_where_the_embargo_acts_on_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Every image in a patient's sub-folder: whole patients are held out, the embargo (within a sub-folder)
    leaves nothing out, and a warning that it was capped said otherwise."""
    manifest = manifest_of_folders({"b": [(f"p{k}", 15) for k in range(1, 7)], "e": [(f"q{k}", 15) for k in range(1, 7)]})
    with caplog.at_level("WARNING"):
        split = make_split(manifest, "session", 0)
    assert "embargo" not in caplog.text and (split["split"] == "embargo").sum() == 0


def split_with_a_copy(original: str, copy: str, caplog: pytest.LogCaptureFixture) -> pd.DataFrame:
    """The session split of six patients a class, with ``copy`` a duplicate of ``original`` (paths)."""
    manifest = manifest_of_folders({"b": [(f"p{k}", 15) for k in range(1, 7)], "e": [(f"q{k}", 15) for k in range(1, 7)]})
    first = manifest.index[manifest["path"] == original][0]
    manifest.loc[manifest.index[manifest["path"] == copy][0], "dup_group"] = manifest.at[first, "dup_group"]
    with caplog.at_level("WARNING"):
        return make_split(manifest, "session", 0)


def test_a_copy_filed_under_two_patients_is_said_to_join_them(caplog: pytest.LogCaptureFixture) -> None:
    split = split_with_a_copy(f"{CLASSES[0]}/p1/img_003.jpg", f"{CLASSES[0]}/p3/img_007.jpg", caplog)
    assert f"1 duplicate group(s) hold images of two sub-folders (a copy filed under two patients or slides?): " \
           f"{CLASSES[0]}/p1/ and {CLASSES[0]}/p3/" in caplog.text
    together = split[split["path"].str.startswith((f"{CLASSES[0]}/p1/", f"{CLASSES[0]}/p3/"))]
    assert together.loc[together["split"] != "embargo", "split"].nunique() == 1


@pytest.mark.parametrize(("units", "loose", "n_blocks", "starts"), [
    ([1, 200, 100, 100], [True, False, False, False], 4, [0, 201, 301]),  # a stray file first joins the next
    ([30, 30, 30, 1], [False, False, False, True], 7, [0, 30, 60]),  # ... and one last the sub-folder before it
    ([1, 60, 60, 1], [True, False, False, True], 7, [0, 61]),
    ([50, 4, 45], [False, False, False], 7, [0, 50, 54]),  # a small patient is no stray: a block of its own
])  # fmt: skip
def test_a_stray_loose_file_among_few_sub_folders_is_never_a_block_of_one_image(
    units: list[int], loose: list[bool], n_blocks: int, starts: list[int]
) -> None:
    """Once the large sub-folders were set apart, the share of what was left fell to the stray file's size,
    and it became a block (and could be a class's whole test part); a small patient's sub-folder beside
    large ones is a whole patient all the same, never joined to another."""
    from bloodcell.data.splits import _block_starts

    assert _block_starts(units, n_blocks, loose) == starts


def test_a_duplicate_across_classes_is_no_copy_filed_under_two_patients(caplog: pytest.LogCaptureFixture) -> None:
    split_with_a_copy(f"{CLASSES[0]}/p1/img_003.jpg", f"{CLASSES[1]}/q3/img_007.jpg", caplog)
    assert "two sub-folders" not in caplog.text


def test_three_patients_of_uneven_size_are_three_blocks() -> None:
    """A patient of 4 images between patients of 50 and 45 was joined to a neighbour's block as if a stray
    file, and the class refused for too few sub-folders."""
    manifest = manifest_of_folders({"b": [("p1", 50), ("p2", 4), ("p3", 45)], "e": [("", 99)]})
    split = make_split(manifest, "session", 0)
    assert split.loc[split["class"] == CLASSES[0], "block"].nunique() == 3
    assert (parts_of_each_sub_folder(split[split["class"] == CLASSES[0]]) == 1).all()


def test_held_out_parts_far_from_the_shares_asked_are_said_so(caplog: pytest.LogCaptureFixture) -> None:
    """Patients of 100 and of 5 images: whole blocks made test parts of 2 % where 15 % was asked, without a
    word (the random split already said so of its shares)."""
    manifest = manifest_of_folders({"b": [("p1", 100), ("p2", 100), *[(f"p{k}", 5) for k in range(3, 6)]],
                                    "e": [("", 215)]})  # fmt: skip
    from bloodcell import notices

    messages = []
    for seed in range(4):
        caplog.clear()
        notices.GIVEN.clear()  # a warning is said once a process: each seed's own
        with caplog.at_level("WARNING"):
            split = make_split(manifest, "session", seed, block_size=20)
        benign = split[split["class"] == CLASSES[0]]
        share = (benign["split"] == "test").mean()
        said = "whole sub-folders make held-out parts far from the shares asked for" in caplog.text
        assert said == any(not 0.075 <= (benign["split"] == part).mean() <= 0.30 for part in ("test", "val")), seed
        messages.append(said)
        assert share > 0
    assert any(messages)
