"""The tuning report: a Markdown page with the trials table and Optuna's own plots as PNG files.

Plots come from ``optuna.visualization.matplotlib`` (no plotly needed): the optimisation history, the
parameter importances (fANOVA, asked for by name: Optuna 5 defaults to PED-ANOVA) and the per-epoch learning
curves that the pruner saw.

Whether a plot can be drawn is decided from the study's trials before drawing it (:func:`why_not_drawn`),
because Optuna does not fail on too few trials: it logs a warning and returns empty axes, which would be
linked as a blank picture. The rule: the history needs a complete trial; the importances need two complete
trials and a parameter that takes more than one value; the per-epoch curves need a trial that reported an
epoch (complete, pruned or running). A plot that cannot be drawn is "_Not drawn: <reason>_" in the report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bloodcell.io import atomic_path, atomic_write_text, markdown_table
from bloodcell.notices import quieted
from bloodcell.tune.search import run_folder, trial_value

#: Trials whose reported epochs the per-epoch plot draws (as Optuna's ``plot_intermediate_values`` does).
CURVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def why_not_drawn(name: str, study: optuna.Study) -> str | None:
    """Why plot ``name`` (history, importance, intermediate) would be empty for this study; None if it can be drawn."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if name == "history":
        return None if complete else "no trial has completed yet"
    if name == "importance":
        if len(complete) < 2:
            return f"needs two complete trials; the study has {len(complete)}"
        varied = {n for t in complete for n, d in t.distributions.items() if not d.single()}
        return None if varied else "no searched parameter takes more than one value"
    if name == "intermediate":
        curves = study.get_trials(deepcopy=False, states=CURVE_STATES)
        return None if any(t.intermediate_values for t in curves) else "no trial has reported an epoch yet"
    raise ValueError(f"unknown plot {name!r}")


@contextlib.contextmanager
def _quiet_optuna_plots() -> Iterator[None]:
    """Keep Optuna's plotting and importance warnings (a study too small, experimental features) off the
    console: the report says in words what was not drawn."""
    with (warnings.catch_warnings(), quieted(logging.getLogger("optuna.visualization")),
          quieted(logging.getLogger("optuna.importance"))):  # fmt: skip
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        yield


def _save_plot(plot: Callable[[optuna.Study], Any], study: optuna.Study, target: Path) -> str | None:
    """Draw one Optuna plot into a PNG; returns why it could not be drawn, or None on success."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    with _quiet_optuna_plots():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as error:  # a study why_not_drawn did not foresee: said, not raised
            return str(error)
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    with atomic_path(target) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def shown_run_folder(trial: FrozenTrial, out_dir: Path) -> str:
    """The trial's run folder as the report shows it: relative to the tuning folder when inside it (the
    report's links work wherever the folder is moved), else as recorded (another worker's machine)."""
    folder = run_folder(trial)
    if folder is None:
        return ""
    try:
        return folder.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(folder)


def trials_markdown(study: optuna.Study, out_dir: str | Path = ".") -> str:
    """One row per trial: number, state, value, epochs reported, duration, run folder and the parameters.

    The run folder is named apart from the trial number because a retried trial trains in the folder of the
    trial it retries."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    header = ["trial", "state", "val balanced accuracy", "epochs", "minutes", "run folder", *names]
    rows = []
    for t in trials:
        minutes = t.duration.total_seconds() / 60 if t.duration else float("nan")
        value = t.value if t.value is not None else float("nan")
        row = [t.number, t.state.name.lower(), value, len(t.intermediate_values), minutes,
               shown_run_folder(t, Path(out_dir))]  # fmt: skip
        rows.append([_format(v) for v in row + [t.params.get(name, "") for name in names]])
    return markdown_table(header, rows)


def write_report(study: optuna.Study, out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``out_dir``; returns the report's path."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as optuna_plots

    out_dir = Path(out_dir)

    def fanova_importances(study: optuna.Study) -> Any:
        return optuna_plots.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))

    plots: dict[str, tuple[str, Callable[[optuna.Study], Any]]] = {
        "history": ("Optimisation history", optuna_plots.plot_optimization_history),
        "importance": ("Parameter importance (fANOVA)", fanova_importances),
        "intermediate": (
            "Validation balanced accuracy per epoch (what the pruner saw)",
            optuna_plots.plot_intermediate_values,
        ),
    }
    sections = []
    for name, (title, plot) in plots.items():
        problem = why_not_drawn(name, study) or _save_plot(plot, study, out_dir / "plots" / f"{name}.png")
        body = f"![{title}](plots/{name}.png)" if problem is None else f"_Not drawn: {problem}_"
        sections.append(f"### {title}\n\n{body}\n")

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {
        s: len(study.get_trials(deepcopy=False, states=(s,)))
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    objective = (
        f"mean over {study.user_attrs['cv']} kfold folds"
        if study.user_attrs.get("cv")
        else f"{study.user_attrs.get('base_config', {}).get('data', {}).get('protocol', 'configured')} split"
    )
    summary = [
        f"# Tuning report: study `{study.study_name}`",
        "",
        (
            f"Trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed. Objective: validation balanced accuracy ({objective}); "
            + ("the folds cover every image, the session split's test part included, so a test score of the "
               "tuned recipe is no longer untouched." if study.user_attrs.get("cv") else
               "the test part of the split is never used.")
        ),
        "",
    ]
    if complete:
        best = max(complete, key=trial_value)
        params = ", ".join(f"`{k}` = {_format(v)}" for k, v in best.params.items())
        folder = shown_run_folder(best, out_dir)
        summary += [
            f"**Best: trial {best.number}, validation balanced accuracy {best.value:.4f}** ({params})"
            + (f"; its run folder is `{folder}`." if folder else "."),
            "",
            f"Its full config is `best.yaml`: `bloodcell train --data DATA --config {out_dir.resolve() / 'best.yaml'}`.",
            "",
        ]
    text = (
        "\n".join(summary)
        + "\n## Trials\n\n"
        + trials_markdown(study, out_dir)
        + "\n\n## Plots\n\n"
        + "\n".join(sections)
    )
    return atomic_write_text(out_dir / "report.md", text)
