"""Distributed data parallel on the CPU: two processes under torchrun, gloo backend, identical weights
(a plain run, and a run that refits on train + val after its holdout stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parent

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from safetensors.torch import save_file
from bloodcell.config import config_from_dict
from bloodcell.train import train_run
from synthetic_data import make_synthetic_data

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
dist.destroy_process_group()
"""


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
    if train_on == "train+val":
        card = json.loads((tmp_path / "run" / "checkpoints" / "best" / "card.json").read_text())
        holdout = json.loads((tmp_path / "run" / "holdout" / "checkpoints" / "last" / "card.json").read_text())
        assert card["split"]["trained_on"] == ["train", "val"] and card["temperature"] == holdout["temperature"] != 1.0
