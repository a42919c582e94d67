"""One ``bloodcell train`` run: :func:`~bloodcell.train.loop.fit`, preceded by a holdout stage when the
recipe trains its final model on train + val (``data.train_on: train+val``).

Why two stages: a model trained on train + val has seen every image that could judge it on validation or
fit its temperature. So the recipe is first trained on train alone, in ``<run>/holdout/``: its validation
part gives the validation history and the temperature. Then the same recipe is trained again from scratch,
with the same seed and schedule, on train + val; that model is the run's (``<run>/checkpoints/best``), and
its card carries the holdout's temperature. The temperature is fitted on the holdout's *last* epoch, the
model trained exactly as the refit is (a fixed schedule, no checkpoint chosen on validation). The test part
is never trained on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bloodcell.config import RunConfig, load_config, save_config
from bloodcell.errors import UserError
from bloodcell.io import bloodcell_home, path_digest
from bloodcell.notices import quieted
from bloodcell.train.checkpoint import (
    checkpoint_dir,
    has_resumable_checkpoint,
    holds_a_run,
    is_complete,
    refuse_foreign_folder,
)
from bloodcell.train.loop import (
    TrainingData,
    TrainResult,
    fit,
    prepare_training_data,
    recorded_threads,
    resumed_config,
)

HOLDOUT_DIR = "holdout"


def train_run(
    config: RunConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    prepared: TrainingData | None = None,
) -> TrainResult:
    """Train ``config`` into ``run_dir`` (default ``runs/<name>``), with the holdout stage if it refits.

    ``resume`` continues whichever stage an interrupted run was in. Returns the final model's
    :class:`TrainResult`; for a refit its ``holdout`` field holds the holdout stage's result.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.name
    with training_lock(run_dir):
        return _train_run(config, run_dir, resume, progress, prepared)


#: Run folders whose lock this process holds (by the digest of their path): taken again, it is already held.
_LOCKED: set[str] = set()


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock while this process trains it (the first process of a distributed launch;
    the others are its workers): a second ``train`` or ``--resume`` into the folder meanwhile is refused at
    once. Without it the two mixed their stages' models, configs and temperature, or one deleted the other's
    checkpoint in the middle of its write. The CLI takes it before it looks at a run's checkpoints, and
    :func:`train_run` takes it again (held already: nothing to do).

    The lock file lies in ``$BLOODCELL_HOME/locks/`` (named by the folder's path), not in the run folder,
    which a start that fails before its first epoch must not leave behind: so it guards a folder against
    processes that share that ``$BLOODCELL_HOME``. The OS releases it when the process dies, so a killed run
    never leaves its folder locked.
    """
    key = path_digest(run_dir.expanduser().resolve())
    if not is_first_process() or key in _LOCKED:
        yield
        return
    from filelock import FileLock, Timeout

    locks = bloodcell_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"run-{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{run_dir} is being trained by another process: wait for it to finish, or stop it "
                        "(it then says how to continue it)") from None  # fmt: skip
    _LOCKED.add(key)
    try:
        yield
    finally:
        _LOCKED.discard(key)
        lock.release()


def _train_run(config: RunConfig, run_dir: Path, resume: bool, progress: bool,
               prepared: TrainingData | None) -> TrainResult:  # fmt: skip
    if resume and (run_dir / "config.yaml").is_file():  # before either stage trains anything
        resumed_config(run_dir, config)
    if config.data.train_on == "train":
        with _quiet_if_done(resume and is_complete(run_dir, config.train.epochs)):
            return fit(config, run_dir, resume=resume, progress=progress, prepared=prepared)

    holdout_dir = run_dir / HOLDOUT_DIR
    if not resume and is_first_process():
        _claim_run_dir(run_dir, config)
    if prepared is None:  # once for both stages and the temperature: the same data, split and cache
        # Every process prepares the data; the first says what it finds (a warning once, not once a process).
        with quieted(logging.getLogger("bloodcell"), when=not is_first_process()):
            prepared = prepare_training_data(config, progress and is_first_process())
    holdout_config = config.model_copy(update={"data": config.data.model_copy(update={"train_on": "train"})})
    # A stage a resumed run already finished trains nothing: announcing it would say otherwise.
    holdout_done = resume and is_complete(holdout_dir, config.train.epochs)
    _announce(progress and not holdout_done,
              f"stage 1 of 2: holdout, the recipe on the training part alone -> {holdout_dir}")  # fmt: skip
    with _quiet_if_done(holdout_done):
        holdout = fit(
            holdout_config, holdout_dir, resume=resume and has_resumable_checkpoint(holdout_dir),
            progress=progress, prepared=prepared,
        )  # fmt: skip
    # The refit runs what the holdout ran (an lr of "auto" was resolved there), on train + val, with the
    # holdout's thread count: chosen afresh from the idle cores it could differ as other jobs come and go,
    # and a different count changes the floating-point sums.
    threads = recorded_threads(holdout_dir, config.train.num_threads)
    resolved = load_config(
        str(holdout_dir / "config.yaml"), ["data.train_on=train+val", f"train.num_threads={threads}"]
    )
    resolved = resolved.model_copy(update={"data": resolved.data.model_copy(update={"root": config.data.root})})
    temperature = fit_holdout_temperature(holdout_dir, prepared, holdout.is_main_process, config.data.root)
    refit_done = resume and is_complete(run_dir, resolved.train.epochs)
    _announce(progress and holdout.is_main_process and not refit_done,
              f"stage 2 of 2: refit on train + val -> {run_dir}")  # fmt: skip
    with _quiet_if_done(refit_done):
        result = fit(
            resolved, run_dir, resume=resume and has_resumable_checkpoint(run_dir), progress=progress,
            prepared=prepared,
        )  # fmt: skip
    if result.is_main_process:
        _store_temperature(run_dir, temperature)
    return dataclasses.replace(result, holdout=holdout)


def fit_holdout_temperature(
    holdout_dir: Path, prepared: TrainingData | None, is_main_process: bool, data_root: str | None = None
) -> float:
    """Fit the temperature of the holdout run's last model on its validation images (rank 0 only; 1.0 elsewhere).

    ``data_root``: where the data are now (``--resume RUN --data MOVED``), else the holdout's config says.
    """
    if not is_main_process:
        return 1.0
    from bloodcell.evaluate.calibration import fit_temperature, save_temperature
    from bloodcell.evaluate.runner import predict_logits
    from bloodcell.models import load_model

    last = checkpoint_dir(holdout_dir, "last")
    model, _ = load_model(last)
    data = prepared if prepared is not None else _prepare(load_config(str(holdout_dir / "config.yaml")), data_root)
    val = np.asarray(data.indices("val"))
    temperature = fit_temperature(predict_logits(model, data.images[val]), np.asarray(data.labels)[val])
    save_temperature(last, temperature)
    return temperature


def _store_temperature(run_dir: Path, temperature: float) -> None:
    """Give both of the refit's checkpoints the holdout's temperature and say where it came from."""
    from bloodcell.models.card import load_card, save_card

    source = f"fitted on the validation part by the holdout run ({HOLDOUT_DIR}/, trained on train only)"
    for which in ("best", "last"):
        card, directory = load_card(checkpoint_dir(run_dir, which))
        save_card(card.model_copy(update={"temperature": float(temperature), "temperature_source": source}), directory)


def _claim_run_dir(run_dir: Path, config: RunConfig) -> None:
    """Refuse a folder that holds another run; write ``config.yaml`` first so ``--resume`` works in either stage.

    A run counts once either stage has finished an epoch (:func:`holds_a_run`): a start that failed before
    that (a mistyped ``--data``, a bad value) leaves nothing the corrected command could lose, so it may
    reuse the folder.
    """
    if any(holds_a_run(stage) for stage in (run_dir, run_dir / HOLDOUT_DIR)):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    refuse_foreign_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")


def _quiet_if_done(done: bool) -> contextlib.AbstractContextManager[None]:
    """Quieten Lightning for a stage that trains nothing: its set-up line ("Using bfloat16 Automatic Mixed
    Precision") would say otherwise."""
    return quieted(logging.getLogger("lightning_fabric"), when=done)


def _announce(enabled: bool, message: str) -> None:
    """One line on stderr above a stage's progress bars, so the two sets of epochs are told apart."""
    if enabled and is_first_process():
        from rich.console import Console
        from rich.markup import escape

        # soft_wrap: without a terminal rich wraps at 80 columns, which split the run folder's path.
        Console(stderr=True).print(f"[bold]{escape(message)}[/bold]", soft_wrap=True)  # a folder's name is no markup


def is_first_process() -> bool:
    """False in the other processes of a distributed launch (torchrun, SLURM, Fabric's own launcher).

    Read from the launchers' environment because no process group exists yet at this point; every
    process runs this module, and only one may create the run folder.
    """
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _prepare(config: RunConfig, root: str | None = None) -> TrainingData:
    from bloodcell.data.prepare import prepare_data

    return prepare_data(config.data, root, progress=False)
