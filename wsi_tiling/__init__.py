"""Whole-slide tiling at true physical resolution (never imports torch)."""
__version__ = "0.1.0"
