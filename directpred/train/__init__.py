"""Training: the loop, optimisers and schedules, checkpoints and logging."""

from directpred.train.loop import Trainer, TrainingError, evaluate

__all__ = ["Trainer", "TrainingError", "evaluate"]
