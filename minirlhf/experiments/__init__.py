"""`python -m minirlhf experiment NAME`: experiments that answer the recipe's questions with
measurements. Arms are ordinary run directories (arms.py); the experiments (definitions.py)
compose the pipeline's stages and add no training code of their own."""
from .definitions import EXPERIMENTS
from .runner import ALL_ORDER, run_experiment

__all__ = ["EXPERIMENTS", "ALL_ORDER", "run_experiment"]
