"""EfficientFormer tile classifiers with configurable MHSA stages, pretrained loading and inference form."""
from pathology.models.checkpoint import LoadReport, filter_state_dict, load_pretrained, transfer_attention_biases
from pathology.models.mhsa import MhsaBlocks
from pathology.models.efficientformer import MODEL_CONFIGS, EfficientFormer, create_model, list_models
from pathology.models.optimize import fuse_for_inference
from pathology.models.runtime import InferenceRunner, optimize_for_inference
from pathology.models.tta import dihedral_views, tta_probabilities

__all__ = [
    "MODEL_CONFIGS",
    "EfficientFormer",
    "InferenceRunner",
    "LoadReport",
    "MhsaBlocks",
    "create_model",
    "dihedral_views",
    "filter_state_dict",
    "fuse_for_inference",
    "list_models",
    "load_pretrained",
    "optimize_for_inference",
    "transfer_attention_biases",
    "tta_probabilities",
]
