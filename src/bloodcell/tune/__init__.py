"""Learning-rate finding and hyperparameter search (Optuna), on one machine or many.

``bloodcell.tune.lr_find`` has the range test (training runs it for ``optimizer.lr=auto``);
``bloodcell.tune.search`` the Optuna study. The search is imported on first use, so that training with
``lr=auto`` does not pay for importing Optuna.
"""

from typing import Any

from bloodcell.tune.lr_find import LRFindResult, lr_find, run_lr_find

_SEARCH_NAMES = {"SearchSpace", "TuneResult", "apply_params", "load_space", "tune"}


def __getattr__(name: str) -> Any:
    if name in _SEARCH_NAMES:
        from bloodcell.tune import search

        return getattr(search, name)
    raise AttributeError(f"module 'bloodcell.tune' has no attribute {name!r}")


__all__ = [
    "LRFindResult", "SearchSpace", "TuneResult", "apply_params", "load_space", "lr_find",
    "run_lr_find", "tune",
]  # fmt: skip
