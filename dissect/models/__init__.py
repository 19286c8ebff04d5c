"""The embedded default world, generator and segmenter, and loaders for users' own models."""
