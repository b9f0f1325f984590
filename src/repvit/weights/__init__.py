from .api import CheckpointMismatchError, create_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from .hub import WEIGHTS, WeightsEntry, download_weights, get_weights, list_weights
from .io import CheckpointFormatError, read_checkpoint

__all__ = ["create_model", "model_from_checkpoint", "load_checkpoint", "save_checkpoint", "read_checkpoint", "CheckpointFormatError",
           "CheckpointMismatchError", "WEIGHTS", "WeightsEntry", "get_weights", "list_weights", "download_weights"]
