"""Methods: BYOL and SimSiam, composed from encoder, predictor, loss and target rule."""

from directpred.methods.ema import ema_momentum, ema_update
from directpred.methods.siamese import Encoder, OnlineBranch, Siamese, StepOutput, build_method

__all__ = ["Encoder", "OnlineBranch", "Siamese", "StepOutput", "build_method", "ema_update", "ema_momentum"]
