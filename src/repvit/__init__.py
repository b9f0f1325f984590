"""repvit: RepViT mobile CNN backbones (Wang et al., CVPR 2024) - models, exact
re-parameterisation, weights in every format, training, export and benchmarks."""

from .api import create_model, load_checkpoint, save_checkpoint
from .models import RepViT, RepViTFeatures, list_models
from .reparam import ReparameterizationError, reparameterize

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "reparameterize", "load_checkpoint", "save_checkpoint",
           "RepViT", "RepViTFeatures", "ReparameterizationError", "__version__"]
