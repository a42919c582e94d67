"""Training: ``fit(config)`` writes a run directory with history, checkpoints and a log.

See :mod:`bloodcell.train.loop` for the loop itself and docs/ARCHITECTURE.md for the run directory.
"""

from bloodcell.train.loop import TrainingData, TrainingDiverged, TrainResult, fit

__all__ = ["TrainResult", "TrainingData", "TrainingDiverged", "fit"]
