"""Training: the trainer and its callbacks, optimisers and schedules, checkpoints and logging."""

from directpred.train.callbacks import Callback, StepResult
from directpred.train.faults import TrainingDiverged, TrainingError, TrainingInterrupted
from directpred.train.loop import Trainer

__all__ = ["Trainer", "Callback", "StepResult", "TrainingError", "TrainingDiverged", "TrainingInterrupted"]
