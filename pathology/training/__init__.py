"""Fine-tuning tile classifiers with Lightning: the LightningModule, ``pathology train``, ``predict-tiles``."""
from pathology.training.budget import TimeBudget
from pathology.training.metrics import classification_metrics
from pathology.training.module import NonFiniteLossError, TileClassifier, warmup_cosine

__all__ = ["NonFiniteLossError", "TileClassifier", "TimeBudget", "classification_metrics", "warmup_cosine"]
