"""dissect: open a trained PyTorch network layer by layer and rewrite what a layer has learned."""

__version__ = "0.1.0"
