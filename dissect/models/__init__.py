"""The embedded default world, generator and segmenter, and loaders for users' own models."""

from .loaders import LatentSampler, available_models, load, load_entry_point

__all__ = ["LatentSampler", "available_models", "load", "load_entry_point"]
