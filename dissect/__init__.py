"""dissect: open a trained PyTorch network layer by layer and rewrite what a layer has learned."""

from .hooks import LayerInfo, StopForward, Trace, TraceDict, get_module, key_module_name, layers

__version__ = "0.1.0"

__all__ = ["Trace", "TraceDict", "StopForward", "LayerInfo", "get_module", "key_module_name", "layers"]
