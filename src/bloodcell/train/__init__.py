"""Training: ``fit(config)`` writes a run directory with history, checkpoints and a log; ``train_run`` adds
the holdout stage of a run that refits on train + val (what ``bloodcell train`` calls).

See :mod:`bloodcell.train.loop` for the loop itself and docs/ARCHITECTURE.md for the run directory.
"""

from bloodcell.train.loop import TrainingData, TrainingDiverged, TrainResult, fit
from bloodcell.train.run import train_run

__all__ = ["TrainResult", "TrainingData", "TrainingDiverged", "fit", "train_run"]
