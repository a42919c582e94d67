"""Distributed data parallel on the CPU: two processes under torchrun, gloo backend, identical weights
(a plain run, and a run that refits on train + val after its holdout stage)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthetic_data import make_synthetic_data

TESTS_DIR = Path(__file__).resolve().parent

SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from safetensors.torch import save_file
from bloodcell.config import config_from_dict
from bloodcell.data.augment import BatchAugment
from bloodcell.train import train_run
from synthetic_data import make_synthetic_data

# Record the images of every training batch this rank augments, by content (uint8 NCHW views of NHWC rows).
batches = []
augment = BatchAugment.__call__

def recorded(self, images, generator=None, batch_size=None):
    batches.append([hashlib.sha256(image.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()
                    for image in images])
    return augment(self, images, generator, batch_size)

BatchAugment.__call__ = recorded

config = config_from_dict({{
    "name": "ddp",
    "data": {{"image_size": 32, "train_on": {train_on!r}}},
    "model": {{"name": "bloodnet", "kwargs": {{"width": 0.5}}}},
    "train": {{"epochs": 2, "batch_size": 4, "accelerator": "cpu", "seed": 5}},
}})
result = train_run(config, {run!r}, prepared=make_synthetic_data(per_class=16, size=32), progress=False)
state = {{k: v.detach().contiguous() for k, v in result.model.state_dict().items()}}
save_file(state, {out!r} + f"/rank{{dist.get_rank()}}.safetensors")
# One file per rank: the two processes share stdout, and their lines interleave.
with open({out!r} + f"/rank{{dist.get_rank()}}.txt", "w") as handle:
    handle.write(f"rank {{dist.get_rank()}} of {{dist.get_world_size()}} main {{result.is_main_process}}")
with open({out!r} + f"/rank{{dist.get_rank()}}-batches.json", "w") as handle:
    json.dump(batches, handle)
dist.destroy_process_group()
"""


def digests(data, part: str) -> list[str]:
    """The content hashes of a part's images, as the script records the batches'."""
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in data.images[data.indices(part)]]


@pytest.mark.parametrize("train_on", ["train", "train+val"])
def test_two_gloo_processes_end_with_identical_weights(tmp_path: Path, train_on: str) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(
        SCRIPT.format(tests=str(TESTS_DIR), run=str(tmp_path / "run"), out=str(tmp_path), train_on=train_on)
    ))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "rank 0 of 2 main True"
    assert (tmp_path / "rank1.txt").read_text() == "rank 1 of 2 main False"

    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)

    # Each rank took its own half of the 48 training images (56 with the validation images in a refit), in
    # batches of 4: 6 (or 7) steps an epoch.
    trainer = json.loads((tmp_path / "run" / "checkpoints" / "last" / "trainer.json").read_text())
    assert trainer["loop"]["step"] == 2 * (6 if train_on == "train" else 7)
    assert not (tmp_path / "run" / "checkpoints" / "rank1").exists()
    # ... and the halves differ: each epoch, the ranks' images are disjoint and together all of the stage's
    # training images (24 and 28 a rank: no ragged remainder to drop). A refit trains its holdout stage first.
    data = make_synthetic_data(per_class=16, size=32)
    train, val = set(digests(data, "train")), set(digests(data, "val"))
    stages = [(train, 6)] if train_on == "train" else [(train, 6), (train | val, 7)]
    batches = [json.loads((tmp_path / f"rank{rank}-batches.json").read_text()) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == sum(2 * steps for _, steps in stages)
    first = 0
    for images, steps in stages:
        for _ in range(2):  # epochs
            epoch = [[d for batch in ranks[first : first + steps] for d in batch] for ranks in batches]
            assert len(set(epoch[0])) == len(set(epoch[1])) == 4 * steps  # no image twice in a rank's epoch
            shared = len(set(epoch[0]) & set(epoch[1]))
            assert shared == 0, f"both ranks trained on {shared} of the same images in an epoch"
            assert set(epoch[0]) | set(epoch[1]) == images
            first += steps
    if train_on == "train+val":
        card = json.loads((tmp_path / "run" / "checkpoints" / "best" / "card.json").read_text())
        holdout = json.loads((tmp_path / "run" / "holdout" / "checkpoints" / "last" / "card.json").read_text())
        assert card["split"]["trained_on"] == ["train", "val"] and card["temperature"] == holdout["temperature"] != 1.0


def test_a_folder_rank_0_refuses_ends_every_rank_quietly(tmp_path: Path) -> None:
    """Rank 0 checks the run folder; the other rank used to wait at the next collective and die with a
    long "connection closed by peer" traceback under rank 0's one line."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(
        SCRIPT.format(tests=str(TESTS_DIR), run=str(tmp_path / "run"), out=str(tmp_path), train_on="train")
    ))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert again.returncode != 0
    assert again.stderr.count("already holds a run") >= 1
    assert "Connection closed" not in again.stderr and "connection closed" not in again.stderr.lower()


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from bloodcell.config import config_from_dict
from bloodcell.train import fit
from synthetic_data import make_synthetic_data

config = config_from_dict({{
    "name": "ddp",
    "data": {{"image_size": 32, "train_on": "train"}},
    "model": {{"name": "bloodnet", "kwargs": {{"width": 0.5}}}},
    "train": {{"epochs": 2, "batch_size": 4, "accelerator": "cpu", "seed": 5, "num_threads": 1}},
}})
fit(config, {run!r}, prepared=make_synthetic_data(per_class=16, size=32), progress=False, resume=True)
"""


def test_a_resume_in_another_number_of_processes_is_refused_once(tmp_path: Path) -> None:
    """Every rank reads the checkpoint and refuses it; only rank 0 says so (the error was printed once a rank)."""
    from bloodcell.config import config_from_dict
    from bloodcell.train import fit

    config = config_from_dict({
        "name": "ddp", "data": {"image_size": 32, "train_on": "train"},
        "model": {"name": "bloodnet", "kwargs": {"width": 0.5}},
        "train": {"epochs": 2, "batch_size": 4, "accelerator": "cpu", "seed": 5, "num_threads": 1},
    })  # fmt: skip

    def stop(epoch: int, row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "run", prepared=make_synthetic_data(per_class=16, size=32), progress=False,
            epoch_callback=stop)  # fmt: skip
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT.format(tests=str(TESTS_DIR), run=str(tmp_path / "run"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert resumed.returncode != 0
    assert resumed.stderr.count("was trained by 1 process(es)") == 1, resumed.stderr[-3000:]
