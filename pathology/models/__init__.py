"""EfficientFormer tile classifiers with configurable MHSA stages, pretrained loading and inference form."""
from pathology.models.efficientformer import EfficientFormer, create_model, list_models

__all__ = ["EfficientFormer", "create_model", "list_models"]
