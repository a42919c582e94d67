"""The tuning report: a Markdown page with the trials table and Optuna's own plots as PNG files.

Plots come from ``optuna.visualization.matplotlib`` (no plotly needed): the optimisation history, the
parameter importances (fANOVA, Optuna's default) and the per-epoch learning curves that the pruner saw.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bloodcell.io import atomic_path, atomic_write_text, markdown_table
from bloodcell.tune.search import trial_value


def _save_plot(plot: Callable[[optuna.Study], Any], study: optuna.Study, target: Path) -> str | None:
    """Draw one Optuna plot into a PNG; returns why it could not be drawn, or None on success."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as error:  # e.g. importance with fewer than two complete trials
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


def trials_markdown(study: optuna.Study) -> str:
    """One row per trial: number, state, value, epochs reported, duration and the parameters."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    header = ["trial", "state", "val balanced accuracy", "epochs", "minutes", *names]
    rows = []
    for t in trials:
        minutes = t.duration.total_seconds() / 60 if t.duration else float("nan")
        value = t.value if t.value is not None else float("nan")
        row = [t.number, t.state.name.lower(), value, len(t.intermediate_values), minutes]
        rows.append([_format(v) for v in row + [t.params.get(name, "") for name in names]])
    return markdown_table(header, rows)


def write_report(study: optuna.Study, out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``out_dir``; returns the report's path."""
    from optuna.visualization import matplotlib as optuna_plots

    out_dir = Path(out_dir)
    plots: dict[str, tuple[str, Callable[[optuna.Study], Any]]] = {
        "history": ("Optimisation history", optuna_plots.plot_optimization_history),
        "importance": ("Parameter importance (fANOVA)", optuna_plots.plot_param_importances),
        "intermediate": (
            "Validation balanced accuracy per epoch (what the pruner saw)",
            optuna_plots.plot_intermediate_values,
        ),
    }
    sections = []
    for name, (title, plot) in plots.items():
        problem = _save_plot(plot, study, out_dir / "plots" / f"{name}.png")
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
        summary += [
            f"**Best: trial {best.number}, validation balanced accuracy {best.value:.4f}** ({params}).",
            "",
            f"Its full config is `best.yaml`: `bloodcell train --data DATA --config {out_dir.resolve() / 'best.yaml'}`.",
            "",
        ]
    text = (
        "\n".join(summary)
        + "\n## Trials\n\n"
        + trials_markdown(study)
        + "\n\n## Plots\n\n"
        + "\n".join(sections)
    )
    return atomic_write_text(out_dir / "report.md", text)
