"""Training and evaluation: typed recipes, the DDP-ready loop, distillation, evaluation, plots."""

from .config import (
           TrainConfig,
           apply_overrides,
           config_from_dict,
           config_to_dict,
           dump_yaml,
)
from .evaluate import evaluate, evaluate_checkpoint
from .loop import NonFiniteLossError, TrainResult, train
from .recipes import list_recipes, load_recipe

__all__ = ["TrainConfig", "apply_overrides", "config_from_dict", "config_to_dict", "dump_yaml", "train",
           "TrainResult", "NonFiniteLossError", "evaluate", "evaluate_checkpoint", "list_recipes", "load_recipe"]
