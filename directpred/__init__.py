"""directpred: BYOL/SimSiam with DirectPred (Tian, Chen, Ganguli, ICML 2021).

Training, evaluation, training diagnostics and the paper's learning-dynamics theory.
"""

__version__ = "0.1.0"
