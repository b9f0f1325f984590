from .registry import UnknownModelError, build_model, get_spec, list_models
from .repvit import RepViT, RepViTFeatures
from .specs import FACTS, SPECS, RepViTSpec

__all__ = ["RepViT", "RepViTFeatures", "RepViTSpec", "SPECS", "FACTS", "build_model", "get_spec",
           "list_models", "UnknownModelError"]
