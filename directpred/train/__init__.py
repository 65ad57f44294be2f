"""Training: the loop, optimisers and schedules, checkpoints and logging."""

from directpred.eval.protocol import evaluate
from directpred.train.loop import Trainer, TrainingError

__all__ = ["Trainer", "TrainingError", "evaluate"]
