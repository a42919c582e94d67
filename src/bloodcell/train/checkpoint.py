"""Checkpoints of a run: ``checkpoints/best`` and ``checkpoints/last``, never pickled.

Each checkpoint is a model directory (``model.safetensors`` + ``card.json``, loadable by
:func:`bloodcell.models.load_model`). ``last`` also holds what resuming needs: ``trainer.safetensors``
(the optimizer's tensors) and ``trainer.json`` (epoch, step, best score, history, the optimizer's
hyper-parameters and the random seeds of the next epoch).

A checkpoint is written whole into a temporary sibling folder and then swapped in with renames, so a
kill at any moment leaves either the previous complete checkpoint or the new one, never a mix of the two
(for example the weights of epoch 5 beside the optimizer state of epoch 4).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bloodcell.errors import UserError
from bloodcell.io import atomic_path, atomic_write_json
from bloodcell.models import Classifier, ModelCard, save_model

TRAINER_WEIGHTS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"


def checkpoint_dir(run_dir: Path, which: str) -> Path:
    """``run_dir/checkpoints/<which>`` (``best`` or ``last``)."""
    return Path(run_dir) / "checkpoints" / which


def has_resumable_checkpoint(run_dir: Path) -> bool:
    """Whether a run left a ``last`` checkpoint that ``fit(resume=True)`` continues from (first finishing a
    swap that a kill interrupted, which leaves the previous checkpoint beside the new one's staging folder)."""
    return (recover_checkpoint(checkpoint_dir(run_dir, "last")) / TRAINER_STATE).is_file()


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that finished an epoch: one to resume, never to overwrite.

    A kill before the first epoch's checkpoints and history were complete leaves nothing worth keeping
    (at most a ``best`` or a staging folder of an unfinished epoch): such a folder may start afresh.
    """
    return has_resumable_checkpoint(run_dir) or (Path(run_dir) / "history.csv").is_file()


def _saved_loop(run_dir: Path) -> dict[str, Any] | None:
    """The ``loop`` record of the run's ``last`` checkpoint (a swap that a kill interrupted finished first,
    as resuming does), or None when there is none to read."""
    try:
        state = json.loads((recover_checkpoint(checkpoint_dir(Path(run_dir), "last")) / TRAINER_STATE).read_text(encoding="utf-8"))
        return dict(state["loop"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def completed_epochs(run_dir: Path) -> tuple[int, str | None] | None:
    """``(epochs completed, why it stopped early or None)`` of the run's final stage, from its ``last``
    checkpoint; None when there is none to read."""
    loop = _saved_loop(run_dir)
    try:
        return (int(loop["epoch"]), loop.get("stopped")) if loop is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def saved_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of the run's ``last`` checkpoint (what a resume continues from); [] when unreadable."""
    loop = _saved_loop(run_dir)
    try:
        return [dict(row) for row in loop["history"]] if loop is not None else []
    except (KeyError, TypeError, ValueError):
        return []


def is_complete(run_dir: Path, epochs: int) -> bool:
    """Whether the run in ``run_dir`` has nothing left to train: all ``epochs`` done, or stopped early."""
    done = completed_epochs(run_dir)
    return done is not None and (done[0] >= epochs or done[1] is not None)


def refuse_foreign_folder(run_dir: Path) -> None:
    """Refuse to start a run in a file, or in a folder that holds other files but no run of ours (a start
    writes ``config.yaml`` first, so a run's ``config.yaml`` that loads as a run config marks it ours): the
    run's files would land among someone else's, a dataset's class folders, or another tool's project with a
    ``config.yaml`` and ``checkpoints/`` of its own, say. Hidden files (``.DS_Store``, ``.gitkeep``) do not
    count."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"--out {run_dir}: is a file; give a folder for the run")
    if not run_dir.is_dir() or not any(not entry.name.startswith(".") for entry in run_dir.iterdir()):
        return
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--out {run_dir}: a folder with other files in it, not a run; give a new or empty folder")
    from bloodcell.config import ConfigError, load_config

    try:
        load_config(str(run_dir / "config.yaml"))
    except (ConfigError, UserError):
        raise UserError(f"--out {run_dir}: a folder with other files in it, not a run (its config.yaml is no "
                        "bloodcell run's); give a new or empty folder") from None  # fmt: skip


def remove_unfinished_checkpoints(run_dir: Path) -> None:
    """Remove what an epoch that never finished left in ``run_dir/checkpoints`` (a ``best`` without a
    ``last``, staging folders), before a run starts there afresh; a folder holding anything else there is
    refused, never deleted."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return
    ours = {"best", "last"}  # and hidden entries: the swap's staging folders, .DS_Store, NFS's .nfs files
    other = sorted(entry.name for entry in folder.iterdir() if entry.name not in ours and not entry.name.startswith("."))
    if other:
        raise UserError(f"--out {run_dir}: its checkpoints/ holds files that are not a run's ({', '.join(other[:3])}); "
                        "give a new or empty folder")  # fmt: skip
    shutil.rmtree(folder)


#: A temporary file of :func:`bloodcell.io.atomic_path` (``.config.yaml.k3j_x9ab.yaml``): mkstemp's 8 random
#: characters between the target's name and its suffix (the target's own).
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]+)$")


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files that a killed process left beside the files of ``run_dir`` and of its
    ``holdout/`` stage (each named after a file the run writes there), before the run continues: nothing
    else writes in a run's folder then, and they would otherwise stay for good."""
    for folder in (Path(run_dir), Path(run_dir) / "holdout"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = _TEMPORARY.match(entry.name)
            if (match and match["suffix"] == Path(match["target"]).suffix and entry.is_file() and not entry.is_symlink()
                    and _is_run_file(match["target"])):  # fmt: skip
                entry.unlink(missing_ok=True)


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.startswith(("report.", "metrics.", "predictions."))


#: The files a run writes at its top (and its holdout stage's), besides folders.
RUN_FILES = frozenset({"config.yaml", "history.csv", "train.log", "trained-on.sha256", "trained-on.phash"})


def save_checkpoint(
    directory: Path,
    model: Classifier,
    card: ModelCard,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint into ``directory``, replacing any previous one atomically.

    With ``optimizer`` and ``trainer_state`` it is a resumable ``last`` checkpoint.
    """
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, card, staging)
    if optimizer is not None:
        tensors, optimizer_meta = optimizer_state_to_tensors(optimizer)
        with atomic_path(staging / TRAINER_WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_json(staging / TRAINER_STATE, {**(trainer_state or {}), "optimizer": optimizer_meta})
    _swap_in(staging, directory)
    return directory


def load_trainer_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``trainer.json`` and ``trainer.safetensors`` of a ``last`` checkpoint (tensors on the CPU)."""
    directory = recover_checkpoint(Path(directory))
    state_path = directory / TRAINER_STATE
    if not state_path.is_file():
        raise FileNotFoundError(f"{directory}: no resumable checkpoint ({TRAINER_STATE} missing)")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    return state, load_file(str(directory / TRAINER_WEIGHTS), device="cpu")


def recover_checkpoint(directory: Path) -> Path:
    """Finish a swap that a kill interrupted: if only the previous checkpoint is left, put it back."""
    previous = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and previous.exists():
        os.replace(previous, directory)
    shutil.rmtree(directory.with_name(f".{directory.name}.tmp"), ignore_errors=True)
    return directory


def _swap_in(staging: Path, directory: Path) -> None:
    """Replace ``directory`` by ``staging`` with two renames (a directory cannot be renamed over another)."""
    previous = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(staging, directory)
    shutil.rmtree(previous, ignore_errors=True)


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's ``state_dict`` into safetensors-ready tensors and JSON-ready metadata."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


#: Optimizer options that choose an implementation, not the arithmetic's inputs.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state_to_tensors`: restore the optimizer exactly."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    # How the step is computed (one fused kernel on a GPU, PyTorch's default loop on the CPU) belongs to the
    # device that resumes, not to the one that wrote the checkpoint: keep the live optimizer's choice.
    implementation = [{key: group.get(key) for key in _IMPLEMENTATION_KEYS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, chosen in zip(optimizer.param_groups, implementation, strict=True):
        group.update(chosen)
    _match_parameter_layouts(optimizer)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor its parameter's memory layout (e.g. channels_last).

    The file stores tensors contiguous. Elementwise optimizers do not mind, but fused ones (one kernel
    over flat memory, as training on a GPU uses) pair the i-th element of the parameter with the i-th of
    its moments, so a channels_last weight beside a contiguous moment would be updated with the wrong
    values: measured, a resumed run then ended differently from the uninterrupted one.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
