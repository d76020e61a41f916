"""EfficientFormer tile classifiers with configurable MHSA stages, pretrained loading and inference form."""
from pathology.models.checkpoint import LoadReport, filter_state_dict, load_pretrained, transfer_attention_biases
from pathology.models.mhsa import MhsaBlocks
from pathology.models.efficientformer import MODEL_CONFIGS, EfficientFormer, create_model, list_models
from pathology.models.optimize import optimize_for_inference

__all__ = [
    "MODEL_CONFIGS",
    "EfficientFormer",
    "LoadReport",
    "MhsaBlocks",
    "create_model",
    "filter_state_dict",
    "list_models",
    "load_pretrained",
    "optimize_for_inference",
    "transfer_attention_biases",
]
