"""One way to run a trained model: the `Bundle` every checkpoint carries, the loader of every checkpoint
kind, and the `Predictor` that every command, the app and the tasks' `predict_step` answer through.

Below the tasks (which write bundles and call the Predictor), above models, data and evaluation.
"""

from m3d_lit.inference.bundle import Bundle
from m3d_lit.inference.checkpoints import read_checkpoint, resolve_checkpoint
from m3d_lit.inference.loading import Loaded, load_model
from m3d_lit.inference.predictor import Prediction, Predictor, Request

__all__ = [
    "Bundle",
    "Loaded",
    "Prediction",
    "Predictor",
    "Request",
    "load_model",
    "read_checkpoint",
    "resolve_checkpoint",
]
