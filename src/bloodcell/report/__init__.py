"""Plots and the self-contained HTML / Markdown report of a run: ``build_report(run_dir) -> Path``."""

from bloodcell.report.html import build_report

__all__ = ["build_report"]
