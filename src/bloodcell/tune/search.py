"""Hyperparameter search with Optuna: one study, any number of workers, interruptible and resumable.

The objective is the validation balanced accuracy of a training run under the config's split protocol
(``session`` by default), or its mean over ``cv`` folds of the ``kfold`` protocol. The test part of the
``session`` split is never looked at, except through ``cv``: the kfold folds cover every image, those of
the session test part included. Every validation epoch is reported to Optuna, so a pruner (median or Hyperband)
stops unpromising trials early.

Search space (:class:`SearchSpace`; each entry can be narrowed or switched off with ``None``):

=================  ==============================  ====================================================
name               config key                      distribution
=================  ==============================  ====================================================
lr                 ``optimizer.lr``                log-uniform in [3e-4, 3e-2] (the peak of the schedule)
weight_decay       ``optimizer.weight_decay``      log-uniform in [1e-5, 0.3]
label_smoothing    ``train.label_smoothing``       uniform in [0, 0.2]
augment_strength   every magnitude in ``augment``  uniform multiplier in [0, 2] on the base config's
                                                   magnitudes (0 leaves flips, quarter turns, the JPEG
                                                   round trip, crop and consistency loss, which it does
                                                   not scale; 1 = base recipe); transforms the base
                                                   config switches off stay off
image_size         ``data.image_size``             one of 96, 128, 160
width              ``model.kwargs.width``          one of 0.5, 0.75, 1.0, 1.5 (``bloodnet`` family)
=================  ==============================  ====================================================

Storage and workers: the study lives in an Optuna storage, by default the SQLite file ``study.db`` in the
tuning folder. Any database URL Optuna accepts (PostgreSQL, MySQL) lets workers on several machines share
one study; each worker runs ``bloodcell tune`` with the same ``--storage`` and ``--study``. ``--trials N``
is the size of the whole study (finished = complete + pruned trials, over all workers and all runs), so
rerunning an interrupted ``tune`` continues where it stopped. Trials that were running when a worker died
are noticed through Optuna's heartbeat and queued again with their parameters (and, when the training run
left a checkpoint, resumed from it); a trial stopped by Ctrl-C is queued again the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import shutil
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bloodcell.config import (
    RUNTIME_KEYS,
    AugmentConfig,
    RunConfig,
    config_from_dict,
    did_you_mean,
    format_validation_error,
    save_config,
)
from bloodcell.errors import UserError
from bloodcell.io import atomic_write_text

#: Trials in these states count towards ``--trials``: they ran to a verdict.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: A worker stops after this many failed trials in a row (a diverging recipe, a GPU out of memory): a
#: failed trial does not count towards ``--trials``, so without a limit it would try for ever.
MAX_FAILURES_IN_A_ROW = 3
#: The file in the tuning folder that names the study whose results it holds.
STUDY_FILE = "study.txt"
#: Seconds between a worker's heartbeats, and silence after which its running trial is declared dead.
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120
#: How often one trial is retried after its worker died or was interrupted.
MAX_RETRY = 2
#: AugmentConfig fields that are magnitudes (scaled by ``augment_strength``); booleans and loss weights are not.
AUGMENT_MAGNITUDES = (
    "affine_degrees", "affine_scale", "affine_translate", "brightness", "contrast", "saturation",
    "hue", "gamma", "stain", "stain_vectors", "stain_clip", "blur", "noise",
)  # fmt: skip

PrunerName = Literal["median", "hyperband", "none"]
#: Search-space entries that are a [low, high] range; the others are lists of values to choose from.
RANGE_KEYS = ("lr", "weight_decay", "label_smoothing", "augment_strength")


class SearchSpace(BaseModel):
    """The settings a study searches; ``None`` keeps the base config's value. See the module docstring."""

    model_config = ConfigDict(extra="forbid")

    lr: tuple[float, float] | None = (3e-4, 3e-2)
    weight_decay: tuple[float, float] | None = (1e-5, 0.3)
    label_smoothing: tuple[float, float] | None = (0.0, 0.2)
    augment_strength: tuple[float, float] | None = (0.0, 2.0)
    image_size: list[int] | None = Field(default_factory=lambda: [96, 128, 160])
    width: list[float] | None = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.5])

    @model_validator(mode="after")
    def _check_ranges(self) -> SearchSpace:
        for name in RANGE_KEYS:
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ValueError(f"{name}: low {bounds[0]} is above high {bounds[1]}")
        for name in ("lr", "weight_decay"):
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] <= 0:
                raise ValueError(f"{name} is searched on a log scale; its low end must be > 0")
        for name in ("image_size", "width"):
            if getattr(self, name) == []:
                raise ValueError(
                    f"{name}: give at least one value, or null to keep the config's"
                )
        return self


@dataclass(frozen=True)
class TuneResult:
    """What a tuning run leaves behind."""

    study_name: str
    storage: str
    out_dir: Path
    n_complete: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    #: The best trial's run folder: a retried trial trains in the folder of the trial it retries.
    best_run_dir: Path | None
    best_config_path: Path | None
    trials_path: Path
    report_path: Path | None


# ------------------------------------------------------------------------------------------ the space


def load_space(path: str | Path | None) -> SearchSpace:
    """Read a search space from a YAML file (keys of :class:`SearchSpace`), or the default space."""
    import yaml

    if path is None:
        return SearchSpace()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"search space file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"search space {path}: {error}") from None
    keys = ", ".join(SearchSpace.model_fields)
    if not isinstance(raw, dict):
        raise UserError(f"search space {path}: expected a mapping of some of {keys}, got {raw!r}")
    for name in raw:
        if name not in SearchSpace.model_fields:  # named with all the keys there are: a few, unlike a config's
            raise UserError(f"search space {path}: unknown key {name!r}{did_you_mean((str(name),), SearchSpace)}; "
                            f"the keys are {keys}")  # fmt: skip
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"search space {path}: {_space_problem(error)}") from None


def _space_problem(error: ValidationError) -> str:
    """The config's wording of a validation error, for the space's keys, with the shape a wrong entry takes."""
    # a search-space key is no config key (lr is not optimizer.lr)
    text = format_validation_error(error, SearchSpace, noun="key")
    misshapen = {str(problem["loc"][0]) for problem in error.errors() if problem["loc"] and problem["type"] != "value_error"}
    for name in SearchSpace.model_fields:
        if name in misshapen:
            shape = "a [low, high] list" if name in RANGE_KEYS else "a list of values"
            text += f"; {name} takes {shape}, or null to keep the base config's value"
    return text


def _field_upper_bound(model: type[BaseModel], name: str) -> float:
    """The largest value a config field accepts, read from its pydantic constraints (``le``/``lt``)."""
    bound = math.inf
    for constraint in model.model_fields[name].metadata:
        if getattr(constraint, "le", None) is not None:
            bound = min(bound, float(constraint.le))
        if getattr(constraint, "lt", None) is not None:
            bound = min(bound, math.nextafter(float(constraint.lt), -math.inf))
    return bound


def scale_augmentation(augment: AugmentConfig, strength: float) -> dict[str, Any]:
    """The augment section with every magnitude multiplied by ``strength``, clipped to what the config allows."""
    values = augment.model_dump()
    for name in AUGMENT_MAGNITUDES:
        values[name] = min(values[name] * strength, _field_upper_bound(AugmentConfig, name))
    return values


def suggest_params(trial: Trial, space: SearchSpace) -> dict[str, Any]:
    """Ask the trial for a value of every searched setting (Optuna records them as the trial's params)."""
    params: dict[str, Any] = {}
    if space.lr:
        params["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    if space.weight_decay:
        params["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay, log=True)
    if space.label_smoothing:
        params["label_smoothing"] = trial.suggest_float("label_smoothing", *space.label_smoothing)
    if space.augment_strength:
        params["augment_strength"] = trial.suggest_float("augment_strength", *space.augment_strength)
    if space.image_size:
        params["image_size"] = trial.suggest_categorical("image_size", space.image_size)
    if space.width:
        params["width"] = trial.suggest_categorical("width", space.width)
    return params


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The base config with a trial's parameters written into their config keys (validated)."""
    raw = base.model_dump(mode="json")
    if "lr" in params:
        raw["optimizer"]["lr"] = params["lr"]
    if "weight_decay" in params:
        raw["optimizer"]["weight_decay"] = params["weight_decay"]
    if "label_smoothing" in params:
        raw["train"]["label_smoothing"] = params["label_smoothing"]
    if "augment_strength" in params:
        raw["augment"] = scale_augmentation(base.augment, params["augment_strength"])
    if "image_size" in params:
        raw["data"]["image_size"] = params["image_size"]
    if "width" in params:
        raw["model"]["kwargs"] = {**raw["model"]["kwargs"], "width": params["width"]}
    return config_from_dict(raw)


#: The config key each searched parameter overwrites (see apply_params). ``augment_strength`` is not here:
#: it scales the base config's augment magnitudes (a --set of one included) rather than replacing them.
SEARCHED_KEYS = {"lr": "optimizer.lr", "weight_decay": "optimizer.weight_decay",
                 "label_smoothing": "train.label_smoothing", "image_size": "data.image_size",
                 "width": "model.kwargs.width"}  # fmt: skip


def overrides_the_search_replaces(overrides: list[str], space: SearchSpace) -> list[tuple[str, str]]:
    """``(override, parameter)`` for each ``--set key=value`` that a searched parameter rewrites in every
    trial, so the value given would never be used."""
    replaced = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for name, target in SEARCHED_KEYS.items():
            if getattr(space, name) is not None and key == target:
                replaced.append((item, name))
    return replaced


def _check_space_fits_model(base: RunConfig, space: SearchSpace) -> None:
    """Fail before the first trial when a searched value cannot work with the base config.

    A range whose ends the config refuses (a label smoothing of 1.5), a searched image size below the
    base's training crop, or a ``width`` for an architecture without one.
    """
    too_small = [size for size in space.image_size or [] if size < base.augment.crop]
    if too_small:
        raise UserError(
            f"searched image sizes {too_small} are smaller than augment.crop ({base.augment.crop}); drop them "
            "from the search space (--space) or lower the crop"
        )
    for name in ("lr", "weight_decay", "label_smoothing", "augment_strength", "image_size", "width"):
        for value in getattr(space, name) or []:  # a range's two ends (the config's bounds are intervals)
            try:
                apply_params(base, {name: value})
            except ValueError as error:
                raise UserError(f"search space (--space) {name}: {value} gives an invalid config: {error}") from None
    if not space.width:
        return
    from bloodcell.models import create_model

    try:
        create_model(base.model.name, num_classes=2, **{**base.model.kwargs, "width": space.width[0]})
    except TypeError:
        raise UserError(
            f"model {base.model.name!r} has no 'width' argument; search a bloodnet model or set width: null "
            "in the search space (--space)"
        ) from None


# ---------------------------------------------------------------------------------------- the study


def default_storage(out_dir: Path) -> str:
    """SQLite file ``study.db`` in the tuning folder, as a URL: a ``?``, ``#`` or ``%`` in the folder's name
    is escaped (written into the URL as they are, they would move the database elsewhere)."""
    from sqlalchemy.engine import URL

    url = URL.create("sqlite", database=str((out_dir / "study.db").resolve()))
    return url.render_as_string(hide_password=False)


def open_storage(url: str, attempts: int = 5) -> RDBStorage:
    """An Optuna RDB storage with heartbeats, so trials of a dead worker are noticed and queued again.

    Workers started together race to create the database's tables and stamp its schema version; the
    loser sees "table already exists" or a duplicate version row, and simply tries again a moment later,
    when the schema is there.
    """
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local workers write to one file: wait for SQLite's lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    for attempt in range(attempts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY, inherit_intermediate_values=True
                    ),
                )
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as error:
                if attempt + 1 == attempts:
                    raise UserError(f"cannot connect to Optuna storage {shown_storage(url)!r}: "
                                    f"{_without_url(str(error.orig), url)}") from None  # fmt: skip
                time.sleep(0.5 * (attempt + 1))
            except (ImportError, ValueError, sqlalchemy.exc.ArgumentError) as error:
                hint = ""
                if url.startswith("postgresql") and "Failed to import DB access module" in str(error):
                    hint = ("; for PostgreSQL install the driver (pip install -e '.[postgres]') and write the URL "
                            "as postgresql+psycopg://user:pw@host/db")  # fmt: skip
                raise UserError(f"cannot open Optuna storage {shown_storage(url)!r}: "
                                f"{_without_url(str(error), url)}{hint}") from None  # fmt: skip
    raise AssertionError("unreachable")


def shown_storage(url: str) -> str:
    """A storage URL as it may be printed: its passwords hidden, the one before the host and a ``password``
    query parameter, which libpq reads too (``postgresql://user:***@host/db?password=***``).

    Read as text, not parsed: a password may hold an unencoded ``@``, ``/`` or ``?``, which a URL parser
    splits wrongly (SQLAlchemy reads ``p@ss@host`` as the password ``p`` on the host ``ss@host``), and a URL
    that no parser accepts (a port that is no number) must be hidden all the same. Text that is no URL (a
    plain file path) is shown as given.
    """
    shown, end = [], 0
    for start, stop in _password_spans(url):
        shown += [url[end:start], "***"]
        end = stop
    return "".join(shown) + url[end:]


def _password_spans(url: str) -> list[tuple[int, int]]:
    """Where a storage URL's passwords lie: (start, end) spans, in order, overlapping ones merged.

    The user part ends at the *last* ``@``, since a password may hold ``@`` and a host never does; an ``@``
    in the path or query then hides more than the password, never less.
    """
    scheme = re.match(r"[A-Za-z][\w+.-]*://", url)
    if scheme is None:  # no URL: a plain file path
        return []
    # libpq's password and the passphrase of its key, in the query (also of a URL with no host, a socket's)
    spans = [match.span(1) for match in re.finditer(r"[?&](?:ssl)?password=([^&#]*)", url, flags=re.IGNORECASE)]
    if not url.startswith("/", scheme.end()):  # a user part (sqlite:////path has none)
        at = url.rfind("@", scheme.end())
        colon = url.find(":", scheme.end(), max(at, 0))  # a user name holds no ":"; the password follows it
        if colon >= 0:
            spans.append((colon + 1, at))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _without_url(message: str, url: str) -> str:
    """A driver's error message with the storage URL, if it quotes it, shown as :func:`shown_storage` does,
    and a password it quotes alone (as typed, or percent-decoded) hidden too."""
    from urllib.parse import unquote

    pieces = message.split(url)  # the URL itself is shown masked; a lone password is looked for around it
    secrets = {secret for start, end in _password_spans(url) for secret in (url[start:end], unquote(url[start:end]))}
    for secret in secrets:
        if len(secret) >= 4:  # a shorter one would hide letters of ordinary words, not a quoted password
            # only as a whole word: the password "postgres" must not take the user, database and scheme with it
            lone = re.compile(rf"(?<![\w]){re.escape(secret)}(?![\w])")
            pieces = [lone.sub("***", piece) for piece in pieces]
    return shown_storage(url).join(pieces)


class FoldMedianPruner(optuna.pruners.BasePruner):
    """Optuna's median rule, judged within each fold: prune a trial whose best epoch so far *in the fold
    it is training* is below the median of the finished trials' scores at the same step, from epoch
    ``warmup`` of each fold on and after ``startup_trials`` finished trials.

    Under ``--cv`` a trial reports its folds' epochs one after another (steps 1 to ``epochs * folds``),
    and every fold starts a new one-cycle schedule, whose first half ranks trials no better than chance.
    Written by hand because Optuna's ``MedianPruner`` sees one run: its warm-up counts steps from the start
    of the trial (sheltering the first folds whole and none of the later ones), and it takes the trial's
    best over all steps, so an easy first fold kept a trial at chance on the second from ever being pruned
    (a review's case). With one fold this is Optuna's rule, step for step.
    """

    def __init__(self, epochs: int, warmup: int, startup_trials: int = 3) -> None:
        self.epochs, self.warmup, self.startup_trials = epochs, warmup, startup_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or (step - 1) % self.epochs + 1 < self.warmup:  # steps are 1-based epochs
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(finished) < self.startup_trials:
            return False
        fold_start = step - (step - 1) % self.epochs
        mine = [v for s, v in trial.intermediate_values.items() if fold_start <= s <= step and not math.isnan(v)]
        if not mine:
            return True  # as Optuna: only NaN scores so far is no score
        others = [t.intermediate_values[step] for t in finished if step in t.intermediate_values]
        others = [v for v in others if not math.isnan(v)]
        return bool(others) and max(mine) < statistics.median(others)


def make_pruner(name: PrunerName, epochs: int, folds: int = 1) -> optuna.pruners.BasePruner:
    """Median (default: compares each epoch with the other trials' median there) or Hyperband pruning.

    The median pruner waits for 3 finished trials and ignores the first half of each run's epochs (of each
    fold's, with ``folds`` > 1): while the one-cycle schedule is near its peak learning rate, validation
    scores jump by +-0.3 from epoch to epoch and rank trials no better than chance (docs/TUNING.md shows
    it on the real data); each fold is judged on its own epochs (:class:`FoldMedianPruner`). Hyperband
    treats epochs as the resource, to the whole trial; for the same reason its first cut comes where the
    median pruner's first comes, once the first half of a run is past, and under ``--cv`` at the end of
    the first fold, so that every cut (a multiple of it) falls at the end of a fold, never at the start of
    one's schedule.
    """
    warmup = epochs // 2 + 1
    if name == "median":
        return FoldMedianPruner(epochs, warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, warmup if folds == 1 else epochs), max_resource=max(epochs * folds, 1), reduction_factor=3
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {name!r}; choose median, hyperband or none")


def _comparable(config: RunConfig) -> dict[str, Any]:
    """The config without its runtime keys: what every worker of one study must agree on."""
    raw = config.model_dump(mode="json")
    for dotted in RUNTIME_KEYS:
        section, key = dotted.split(".")
        raw[section].pop(key, None)
    return raw


def open_study(
    study_name: str,
    storage: str,
    base: RunConfig,
    space: SearchSpace,
    cv: int | None,
    pruner: optuna.pruners.BasePruner,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create the study, or load it when it exists (so a rerun continues it) after checking it is the same search."""
    study = optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage),
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    setup = {"base_config": _comparable(base), "space": space.model_dump(mode="json"), "cv": cv}
    stored = {key: study.user_attrs.get(key) for key in setup}
    if stored["base_config"] is None:
        for key, value in setup.items():
            study.set_user_attr(key, value)
    elif stored != setup:
        differing = ", ".join(key for key in setup if stored[key] != setup[key])
        raise UserError(
            f"study {study_name!r} in {shown_storage(storage)} was started with a different {differing}; rerun with the "
            "same --config/--set/--space/--cv to continue it, or start a new study (a new --study name and "
            "another --out)"
        )
    return study


def count_trials(study: optuna.Study) -> dict[str, int]:
    """Trials by state name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ``WAITING``)."""
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


# ------------------------------------------------------------------------------------ the objective


class PreparedCache:
    """Prepared data per data config, shared by the trials of one worker (decoding is done once per size)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._prepared: dict[str, Any] = {}

    def get(self, config: RunConfig) -> Any:
        """``prepare_data`` for this config's data section, memoised on that section."""
        from bloodcell.data.prepare import prepare_data

        key = config.data.model_dump_json()
        if key not in self._prepared:
            self._prepared[key] = prepare_data(config.data, self.root, progress=False)
        return self._prepared[key]


def fold_configs(config: RunConfig, cv: int | None) -> list[RunConfig]:
    """The runs one trial trains: the config itself, or one per fold of the ``kfold`` protocol."""
    if not cv:
        return [config]
    return [
        config.model_copy(
            update={"data": config.data.model_copy(update={"protocol": "kfold", "folds": cv, "fold": k})}
        )
        for k in range(cv)
    ]


def retried_trial_number(trial: Trial) -> int | None:
    """The number of the trial this one retries (after a dead worker or Ctrl-C), else None."""
    for frozen in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return None


def trial_dir(out_dir: Path, number: int) -> Path:
    """The run folder of trial ``number`` (a retried trial reuses the folder of the trial it retries)."""
    return out_dir / "trials" / f"trial-{number:04d}"


def _run_fold(
    trial: Trial, config: RunConfig, run_dir: Path, prepared: Any, step_offset: int, is_retry: bool
) -> float:
    """Train one run, reporting each validation to Optuna; raises ``TrialPruned`` when the pruner says so."""
    from bloodcell.train import fit
    from bloodcell.train.checkpoint import has_resumable_checkpoint

    def report(epoch: int, row: dict[str, Any]) -> None:
        value = float(row["val_balanced_accuracy"])
        trial.report(value, step_offset + epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with val balanced accuracy {value:.4f}")

    # A trial is judged on validation, so it trains on train alone even if the base recipe refits on
    # train + val; best.yaml keeps the base's choice, so `bloodcell train` on it ships a refit model.
    config = config.model_copy(update={"data": config.data.model_copy(update={"train_on": "train"})})
    resume = is_retry and has_resumable_checkpoint(run_dir)
    if is_retry and not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # the earlier attempt died before its first checkpoint: start this run afresh
    if resume:
        _report_saved_epochs(trial, run_dir, step_offset)
    result = fit(config, run_dir, prepared=prepared, epoch_callback=report, resume=resume, progress=False)
    last = step_offset + config.train.epochs
    if result.stopped == "early_stopping" and last not in _reported_steps(trial):
        # The fold ended early: its result stands at the fold's last step too, where the pruners judge it
        # (Hyperband would otherwise take the next fold's first, noisy, epoch for this fold's end).
        trial.report(float(result.best_val_balanced_accuracy), last)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after early stopping, at val balanced accuracy {result.best_val_balanced_accuracy:.4f}")
    return float(result.best_val_balanced_accuracy)


def _reported_steps(trial: Trial) -> dict[int, float]:
    """The steps ``trial`` has reported so far (a retry's inherited ones included)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number).intermediate_values


def _report_saved_epochs(trial: Trial, run_dir: Path, step_offset: int) -> None:
    """Report the validated epochs the run's ``last`` checkpoint holds and the trial lacks.

    A retry inherits the interrupted trial's reported epochs, but an epoch is reported after its checkpoint
    is written, so a kill between the two left that epoch trained and saved, and never reported: the pruner
    and the per-epoch plot would miss it.
    """
    from bloodcell.train.checkpoint import saved_history

    reported = _reported_steps(trial)
    missing = [row for row in saved_history(run_dir)
               if "val_balanced_accuracy" in row and step_offset + int(row["epoch"]) not in reported]  # fmt: skip
    for row in missing:
        trial.report(float(row["val_balanced_accuracy"]), step_offset + int(row["epoch"]))
    if missing and trial.should_prune():  # as the uninterrupted run would have been, right after that epoch
        raise optuna.TrialPruned(f"pruned at epoch {missing[-1]['epoch']} (reported on resuming)")


def make_objective(
    base: RunConfig, space: SearchSpace, cv: int | None, out_dir: Path, data: PreparedCache
) -> Callable[[Trial], float]:
    """The function Optuna maximises: mean best validation balanced accuracy over the trial's run(s)."""

    def objective(trial: Trial) -> float:
        config = apply_params(base, suggest_params(trial, space))
        original = retried_trial_number(trial)
        is_retry = original is not None
        # A retry trains in the folder (and under the name) of the trial it retries, so it can resume there.
        run_root = trial_dir(out_dir, original if original is not None else trial.number)
        config = config.model_copy(update={"name": run_root.name})
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("run_dir", str(run_root.resolve()))  # workers of one study may start elsewhere
        scores = []
        for k, fold_config in enumerate(fold_configs(config, cv)):
            run_dir = run_root / f"fold-{k}" if cv else run_root
            offset = k * fold_config.train.epochs
            try:
                score = _run_fold(trial, fold_config, run_dir, data.get(fold_config), offset, is_retry)
            except _trial_errors() as error:  # the trial fails (Optuna catches it): trials.csv says why
                trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
                raise
            scores.append(score)
            if cv:
                trial.set_user_attr(f"fold_{k}_val_balanced_accuracy", score)
        return sum(scores) / len(scores)

    return objective


# ------------------------------------------------------------------------------------------- results


def trial_value(trial: FrozenTrial) -> float:
    """A complete trial's objective value (Optuna gives every complete trial of a one-objective study one)."""
    if trial.value is None:
        raise ValueError(f"trial {trial.number} ({trial.state.name}) has no objective value")
    return trial.value


def run_folder(trial: FrozenTrial) -> Path | None:
    """Where ``trial`` trained (its ``run_dir``); a retried trial trains in the folder of the trial it retries,
    so the folder's number is that trial's, not this one's. None for a trial that never started training."""
    run_dir = trial.user_attrs.get("run_dir")
    return Path(run_dir) if run_dir else None


def best_config(study: optuna.Study, base: RunConfig) -> tuple[RunConfig, FrozenTrial] | None:
    """The base config with the best complete trial's parameters, named after the study; None before any."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = max(complete, key=trial_value)
    config = apply_params(base, best.params)
    description = (
        f"tuned by Optuna study {study.study_name!r}: trial {best.number}, validation balanced accuracy "
        f"{best.value:.4f} ("
        + (f"mean over {study.user_attrs['cv']} kfold folds" if study.user_attrs.get("cv") else f"{base.data.protocol} split")
        + ")"
    )
    return config.model_copy(update={"name": f"{study.study_name}-best", "description": description}), best


def write_results(study: optuna.Study, base: RunConfig, out_dir: Path) -> tuple[Path | None, Path]:
    """Write ``best.yaml`` (a config ``train --config`` takes) and ``trials.csv``; both atomic."""
    trials_path = out_dir / "trials.csv"
    frame = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params", "user_attrs"))
    atomic_write_text(trials_path, frame.to_csv(index=False, lineterminator="\n"))
    found = best_config(study, base)
    if found is None:
        return None, trials_path
    config, _ = found
    return save_config(config, out_dir / "best.yaml"), trials_path


def _retry_interrupted(study: optuna.Study, number: int | None) -> None:
    """Queue a trial stopped by Ctrl-C or SIGTERM again (Optuna marked it FAIL), as a dead worker's trial is,
    but however often it was stopped: a job preempted again and again must not lose its trial."""
    if number is not None:
        _retry(study, number, limit=None)


def _retry(study: optuna.Study, number: int, limit: int | None) -> None:
    """Queue failed trial ``number`` again with its parameters (a retry resumes in its folder), unless it was
    retried ``limit`` times already (None: always). Optuna counts every earlier retry, interrupts' too, so
    a trial interrupted twice is not retried again after its worker dies (MAX_RETRY)."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is not None and trial.state == TrialState.FAIL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=limit, inherit_intermediate_values=True)(study, trial)


def _trial_errors() -> tuple[type[Exception], ...]:
    """Failures that end one trial, not the study: a diverged loss and running out of (GPU) memory."""
    import torch

    from bloodcell.train import TrainingDiverged

    return (TrainingDiverged, FloatingPointError, torch.OutOfMemoryError)


def _default_sampler(n_trials: int, seed: int | None) -> optuna.samplers.BaseSampler:
    """TPE; ``constant_liar`` keeps parallel workers from proposing the same point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=max(3, min(10, n_trials // 3)), multivariate=True, constant_liar=True, seed=seed
        )


def _refuse_data_parallel_trials(config: RunConfig) -> None:
    """One process per trial: a data-parallel launch would run this whole function on every rank, and each
    rank would ask the study for a trial of its own while training rank 0's (its results filed under the
    wrong parameters). Several machines share a study as separate workers instead (docs/TUNING.md)."""
    from bloodcell.train.setup import launch_topology

    devices, nodes = launch_topology(config.train)
    if devices not in (1, "1") or nodes != 1:
        raise UserError(
            "tune trains each trial in one process: use train.devices=1 and no torchrun or srun launch; run "
            "several tune workers on one study to use more devices (docs/TUNING.md)"
        )


def tune(
    config: RunConfig,
    data_root: str | Path,
    n_trials: int,
    *,
    out_dir: str | Path | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    cv: int | None = None,
    space: SearchSpace | None = None,
    pruner: PrunerName | optuna.pruners.BasePruner = "median",
    sampler: optuna.samplers.BaseSampler | None = None,
    seed: int | None = None,
    report: bool = True,
) -> TuneResult:
    """Run (or continue) an Optuna study over ``space`` around the base ``config``.

    Parameters
    ----------
    config: the base config; each trial changes only the searched keys.
    data_root: the dataset folder (``--data``).
    n_trials: size of the whole study: this worker stops when complete + pruned trials (all workers, all
        runs) reach it, or (counting trials still running elsewhere) are about to.
    out_dir: tuning folder (trial runs, ``study.db``, ``best.yaml``, ``trials.csv``, ``report.md``);
        default ``runs/tune-<study>``.
    storage: Optuna storage URL; default the SQLite file ``<out_dir>/study.db``.
    study_name: default ``config.name``.
    timeout: seconds after which this worker starts no new trial (a running one finishes).
    cv: with K >= 2, the objective is the mean over the K folds of the ``kfold`` protocol.
    space: what to search (default :class:`SearchSpace`).
    pruner: ``median``, ``hyperband``, ``none`` or any Optuna pruner.
    sampler: default TPE (multivariate, constant liar); ``seed`` seeds it (offset by the number of trials
        already in the study, so a rerun does not repeat the first proposals).
    report: write ``report.md`` with Optuna's plots at the end (and on Ctrl-C).

    Returns a :class:`TuneResult`. Ctrl-C queues the running trial again, writes the results so far (the
    report too) and re-raises ``KeyboardInterrupt``.
    """
    if n_trials < 1:
        raise UserError("--trials must be at least 1")
    if cv is not None and cv < 2:
        raise UserError("--cv needs at least 2 folds")
    _refuse_data_parallel_trials(config)
    space = space or SearchSpace()
    study_name = study_name or config.name
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"tune-{study_name}"
    storage = storage or default_storage(out_dir)
    # Absolute, as train records it, so best.yaml works from any folder on this machine.
    root = str(Path(data_root).expanduser().resolve())
    base = config.model_copy(update={"data": config.data.model_copy(update={"root": root})})
    _check_space_fits_model(base, space)
    if isinstance(pruner, str):
        pruner = make_pruner(pruner, base.train.epochs, cv or 1)
    _refuse_another_study(out_dir, study_name)
    with _no_empty_folder_left(out_dir):  # the default SQLite file needs the folder; a failed start leaves none
        study = open_study(study_name, storage, base, space, cv, pruner, sampler)
    _claim_out_dir(out_dir, study_name)  # once the study opened: a start that failed claims nothing
    if sampler is None:
        # Offset the seed by the trials already run, so that a rerun continues the random sequence
        # instead of proposing the first trials' parameters again.
        existing = len(study.get_trials(deepcopy=False))
        study.sampler = _default_sampler(n_trials, None if seed is None else seed + existing)

    current: dict[str, int | None] = {"trial": None, "last": None}  # running now; run last by this worker
    objective = make_objective(base, space, cv, out_dir, PreparedCache(root))

    def tracked(trial: Trial) -> float:
        current["trial"] = current["last"] = trial.number
        return objective(trial)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        current["trial"] = None
        write_results(study, base, out_dir)

    deadline = None if timeout is None else time.monotonic() + timeout
    failures_in_a_row, timed_out = 0, False
    # One trial at a time, so that a failed one is replaced (it does not count towards N) and the budget is
    # counted afresh before each: finished trials, and those running elsewhere, keep several workers from
    # overshooting N by more than a race.
    while _trials_towards(study) < n_trials and failures_in_a_row < MAX_FAILURES_IN_A_ROW:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            timed_out = True
            break
        current["last"] = None
        try:
            with _no_log_of_trials_the_user_hears_of():
                study.optimize(tracked, n_trials=1, timeout=left, callbacks=[after_trial], catch=_trial_errors(),
                               gc_after_trial=True)  # fmt: skip
        except KeyboardInterrupt:
            _retry_interrupted(study, current["trial"])
            write_results(study, base, out_dir)
            if report:
                _write_report(study, out_dir)
            raise
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number == current["last"]]
        failures_in_a_row = failures_in_a_row + 1 if failed else 0
    _say_why_short(study, n_trials, failures_in_a_row, timed_out)
    return _finish(study, base, out_dir, storage, report)


class _DropTrialsTheUserHearsOf(logging.Filter):
    """Drop Optuna's records of a trial that failed on a :class:`UserError` or was interrupted (Ctrl-C,
    SIGTERM: ``bloodcell.cli.Interrupted`` is a ``KeyboardInterrupt``): the first carries a traceback, the
    second ("Trial N failed with value None.") follows it, and the user hears of both anyway, in one line
    (the error, or "interrupted; run the same command again")."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[str] = set()  # "Trial N" of each trial whose first record was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        trial = record.getMessage().split(" failed with ", 1)[0]
        if isinstance(error, (UserError, KeyboardInterrupt)):
            self.dropped.add(trial)
            return False
        return trial not in self.dropped


@contextlib.contextmanager
def _no_log_of_trials_the_user_hears_of() -> Iterator[None]:
    logger, dropper = logging.getLogger("optuna.study._optimize"), _DropTrialsTheUserHearsOf()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


@contextlib.contextmanager
def _no_empty_folder_left(out_dir: Path) -> Iterator[None]:
    """Make the tuning folder; if what runs inside fails, remove again every folder this made, from the
    deepest up, while each is empty (a bad ``--storage`` must leave no empty ``--out``, nor its parents)."""
    made = list(itertools.takewhile(lambda folder: not folder.exists(), (out_dir, *out_dir.parents)))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:
            try:  # rmdir refuses a folder another worker has just written into: it is kept
                folder.rmdir()
            except OSError:  # not empty, or already removed by another worker that failed alike
                break
        raise


def _refuse_another_study(out_dir: Path, study_name: str) -> None:
    """Refuse a tuning folder that holds another study's results: its trial folders, ``best.yaml``,
    ``trials.csv`` and ``report.md`` are named by trial number, not by study."""
    marker = out_dir / STUDY_FILE
    owner = marker.read_text(encoding="utf-8").strip() if marker.is_file() else study_name
    if owner != study_name:
        raise UserError(f"{out_dir} holds the results of study {owner!r}; give study {study_name!r} another "
                        f"--out (or continue that study with --study {owner})")  # fmt: skip


def _claim_out_dir(out_dir: Path, study_name: str) -> None:
    """Mark the tuning folder as this study's (see :func:`_refuse_another_study`)."""
    if not (out_dir / STUDY_FILE).is_file():
        atomic_write_text(out_dir / STUDY_FILE, study_name + "\n")


def _trials_towards(study: optuna.Study) -> int:
    """Finished trials and those still running elsewhere: what a new trial would add to.

    Running trials whose worker's heartbeat went silent (a dead worker) are failed and queued again first,
    as Optuna does when a trial starts: otherwise a study whose last trials died with their worker would
    count them as running for ever.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    counts = count_trials(study)
    return sum(counts[state.name] for state in FINISHED) + counts["RUNNING"]


def _say_why_short(study: optuna.Study, n_trials: int, failures_in_a_row: int, timed_out: bool) -> None:
    """One line on stderr when this worker stops before the study has ``n_trials`` finished trials."""
    import sys

    counts = count_trials(study)
    finished = sum(counts[state.name] for state in FINISHED)
    if finished >= n_trials:
        return
    if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
        why = f"{failures_in_a_row} trials in a row failed (see the errors above; trials.csv has them)"
    elif timed_out:
        why = "the --timeout was reached"
    else:
        why = (f"{counts['RUNNING']} trial(s) running elsewhere would complete it (a dead worker's trial is "
               f"queued again once its heartbeat has been silent for {GRACE_PERIOD_S} s)")  # fmt: skip
    print(f"the study has {finished} of {n_trials} finished trials: {why}; run the same command again to "
          "continue it", file=sys.stderr)  # fmt: skip


def _write_report(study: optuna.Study, out_dir: Path) -> Path:
    from bloodcell.tune.report import write_report

    return write_report(study, out_dir)


def _finish(study: optuna.Study, base: RunConfig, out_dir: Path, storage: str, report: bool) -> TuneResult:
    """Write results (and the report) and summarise the study."""
    best_path, trials_path = write_results(study, base, out_dir)
    report_path = _write_report(study, out_dir) if report else None
    counts = count_trials(study)
    found = best_config(study, base)
    best = found[1] if found else None
    return TuneResult(
        study_name=study.study_name,
        storage=storage,
        out_dir=out_dir,
        n_complete=counts["COMPLETE"],
        n_pruned=counts["PRUNED"],
        n_failed=counts["FAIL"],
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_trial=best.number if best else None,
        best_run_dir=run_folder(best) if best else None,
        best_config_path=best_path,
        trials_path=trials_path,
        report_path=report_path,
    )
