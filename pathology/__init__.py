"""EfficientFormer tile classifiers, slide-level inference and resolution studies."""
__version__ = "0.1.0"
