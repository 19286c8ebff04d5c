"""Hugging Face ``transformers``: its ``Conv1D`` (GPT-2, GPT, ...) as a memory.

``Conv1D`` is a Linear layer whose weight is laid out ``(in, out)`` and applied as ``x @ W + b``: keys are the
``(N, T, in)`` hidden states (channels last), the memory axis is 0. Read the other way round the weight would be
``W.T``: for a square projection (``c_proj``, ``d -> d``) no shape check would notice, and every key, C and
edit would be silently wrong. The other layers of transformers models are ``nn.Linear`` (Llama's ``down_proj``,
BERT, ...), which need nothing here.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from dissect.memory import MemoryAdapter, register_adapter

__all__ = ["conv1d_linear"]


def conv1d_linear(module: nn.Module, keys: Tensor, weight: Tensor) -> Tensor:
    """``keys (..., in) @ weight (in, J) -> (..., J)``: ``Conv1D``'s forward without its bias, for any ``J``."""
    return keys @ weight


register_adapter(Conv1D, MemoryAdapter("weight", key_axis=0, out_axis=1, channel_dim=-1, linear=conv1d_linear))
