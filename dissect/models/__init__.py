"""The embedded default world, generator and segmenter, and loaders for users' own models."""

from .loaders import LatentSampler, available_models, load, load_entry_point
from .segmenter import load_segmenter

__all__ = ["LatentSampler", "available_models", "load", "load_entry_point", "load_segmenter"]
