"""Fine-tuning tile classifiers with Lightning: the LightningModule, ``pathology train``, ``predict-tiles``."""
from pathology.training.metrics import classification_metrics
from pathology.training.module import NonFiniteLossError, TileClassifier, warmup_cosine

__all__ = ["NonFiniteLossError", "TileClassifier", "classification_metrics", "warmup_cosine"]
