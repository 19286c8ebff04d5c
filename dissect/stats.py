"""Streaming statistics of a layer's keys, and ``collect()``, which runs a model to accumulate them.

Every statistic consumes *rows* ``x: (N, C)``, one row per location and one column per channel, through
``add(x)``; :func:`rows` flattens feature maps ``(N, C, H, W)`` to ``(N*H*W, C)``. Each statistic

* keeps its state on the device of the first rows it sees and accumulates sums in float64;
* drops rows holding NaN or inf, counts them in ``.skipped`` and warns once: they never reach the result;
* treats an empty batch as a no-op and rejects a batch whose channel count differs from earlier ones;
* merges exactly (``a.merge(b)`` equals one pass over both streams, up to float64 rounding);
* round-trips through ``state_dict()`` / ``load_state_dict()`` and, checksummed, through
  :func:`save_stats` / :func:`load_stats` (also ``stat.save(path)`` / ``Kind.load(path)``);
* combines across processes with ``all_reduce()`` once ``torch.distributed`` is initialised.

Fast path of the moment statistics: ``x - shift`` (the shift is the first batch's mean, so the shifted
values are small) is multiplied in float32 over chunks of 4096 rows and each chunk's product is added
in float64. Shifting removes the cancellation that large-magnitude inputs cause, and the short chunks
bound the float32 accumulation error: tests hold covariance and moment within 1e-6 (relative, Frobenius)
of numpy float64, for inputs of mean 1e3 and std 1 and for skewed ReLU-like keys (the worst seen, about
5e-7). Products are taken in float64 instead for float64 inputs, for fewer than 16 channels (BLAS then
sums each entry in one float32 run, 1e-5 off, and float64 costs little), and whenever float32 matmuls
may lose precision (``torch.set_float32_matmul_precision`` below "highest", TF32).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import DissectError, LayerError, ModelError
from .hooks import (
    Trace,
    TraceDict,
    call_model,
    check_single_call,
    eval_mode,
    get_module,
    key_module_name,
    keys_channels_last,
    layer_input,
    model_device,
    to_device,
)

__all__ = [
    "Stat",
    "Mean",
    "SecondMoment",
    "Covariance",
    "TopK",
    "Quantile",
    "StatsFileError",
    "rows",
    "save_stats",
    "load_stats",
    "fingerprint",
    "collect",
    "DEFAULT_CACHE_DIR",
]

# Where the CLI and the dashboard keep collected statistics (so each reuses what the other collected).
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dissect" / "stats"

_FORMAT = "dissect.stats/1"
_CHUNK_ROWS = 4096  # rows per float32 product: bounds its accumulation error (see the module docstring)
_FLOAT32_MIN_CHANNELS = 16
_FLOAT64_CHUNK_VALUES = 2**22  # float64 products need no short chunks; these only bound the copy (32 MiB)
_MAP_MIN_LOCATIONS = 256  # add_map's per-sample addmm beats the transposed copy from 16x16 locations up
_SAFE_MAGNITUDE = 1e16  # rows (and shift) below this in absolute value are summed into the state in place

S = TypeVar("S", bound="Stat")


class StatsFileError(DissectError):
    """A statistics file is truncated, corrupt, or not a statistics file."""


def rows(x: Tensor, channels_last: bool = False) -> Tensor:
    """Flatten activations to rows ``(N, C)``, one row per location.

    ``x: (N, C)`` is returned as is. ``x: (N, C, *spatial)`` (conv feature maps, channels in dim 1) becomes
    ``(N * prod(spatial), C)``; with ``channels_last=True``, ``x: (*, C)`` (a Linear layer's input such as
    ``(N, T, C)``) becomes ``(prod(*), C)``.
    """
    if x.ndim < 2:
        raise ValueError(f"rows() needs at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}.")
    if x.ndim == 2:
        return x
    if channels_last:
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _float32_matmul_is_exact() -> bool:
    # TF32 / bf16 matmuls (precision "high" / "medium") are far from 1e-6: use float64 then.
    return torch.get_float32_matmul_precision() == "highest"


def _require_distributed() -> Any:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "all_reduce() needs torch.distributed: call torch.distributed.init_process_group(...) in every "
            "process first (a single process needs no all_reduce)."
        )
    return dist


def _reduce_device(dist: Any, group: Any, fallback: torch.device | None) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback is None else fallback


class Stat:
    """Base of the streaming statistics: row checks, counts, merging, saving and distributed reduction.

    Subclasses implement ``_add(x)`` (clean-rank rows, at least one), ``_merge(other)``, ``_state()`` and
    ``_load_state(state)``; ``add``, ``merge`` and ``load_state_dict`` keep ``count`` / ``skipped`` up to date.
    """

    kinds: ClassVar[dict[str, type[Stat]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Stat.kinds[cls.__name__] = cls

    def __init__(self) -> None:
        self._count = 0
        self._skipped = 0
        self._channels: int | None = None
        self._warned = False

    @property
    def count(self) -> int:
        """Rows accumulated (rows holding NaN or inf are not counted here but in ``skipped``)."""
        return self._count

    @property
    def skipped(self) -> int:
        """Rows dropped because they held NaN or inf."""
        return self._skipped

    @property
    def channels(self) -> int | None:
        """C, fixed by the first non-empty batch (``None`` before)."""
        return self._channels

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-serialisable): ``type(s)(**s.config())`` is an empty twin."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}; count={self._count}, skipped={self._skipped})"

    # -- adding rows -------------------------------------------------------------------------------------------

    def add(self, x: Tensor) -> None:
        """Accumulate rows ``x: (N, C)`` (see :func:`rows` for feature maps). Empty batches are a no-op."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}.add expects a tensor of rows (N, C), got {type(x).__name__}.")
        if x.ndim != 2:
            raise ValueError(
                f"{name}.add expects rows (N, C), got shape {tuple(x.shape)}: flatten feature maps with "
                f"dissect.stats.rows(x) -> (N*H*W, C), or reshape to (N, C)."
            )
        if not x.is_floating_point():
            raise TypeError(f"{name}.add expects floating-point rows, got {x.dtype}: convert with x.float().")
        if self._channels is not None and x.shape[1] != self._channels:
            raise ValueError(
                f"{name}.add got rows with {x.shape[1]} channels after earlier batches with {self._channels}: "
                f"every batch must come from the same layer and side (or start a new {name})."
            )
        if x.shape[0] == 0:
            return
        self._channels = x.shape[1]
        self._add(x.detach())

    def _drop_nonfinite(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``x`` without NaN / inf, and their indices in ``x``; counts the others in ``skipped``."""
        kept = torch.isfinite(x).all(dim=1).nonzero().squeeze(1)
        dropped = x.shape[0] - kept.numel()
        if dropped:
            self._skipped += dropped
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{type(self).__name__}: dropped {dropped} rows holding NaN or inf; such rows are counted "
                    f"in .skipped and never reach the statistics (later drops are counted without a warning).",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return x[kept], kept

    def _add(self, x: Tensor) -> None:
        raise NotImplementedError

    # -- merging -----------------------------------------------------------------------------------------------

    def merge(self, other: Stat) -> None:
        """Fold ``other`` into this statistic, as if its rows had been added after this one's."""
        if type(other) is not type(self) or not self._compatible(other):
            raise TypeError(f"cannot merge {other!r} into {self!r}: kinds and arguments must match.")
        if None not in (self._channels, other._channels) and self._channels != other._channels:
            raise ValueError(f"cannot merge {other._channels} channels into {self._channels}: different layers?")
        if other._count:
            self._merge(other)
            self._channels = other._channels
        self._count += other._count
        self._skipped += other._skipped

    def _compatible(self, other: Stat) -> bool:
        return other.config() == self.config()

    def _merge(self, other: Stat) -> None:
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor needed to rebuild this statistic (with ``config()``)."""
        state = {"count": torch.tensor(self._count), "skipped": torch.tensor(self._skipped)}
        if self._count:
            state.update(self._state())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace this statistic's state by ``state`` (from ``state_dict()``; tensors stay on their device)."""
        self._count = int(state["count"])
        self._skipped = int(state["skipped"])
        self._channels = None
        if self._count:
            self._load_state(state)
        else:
            self._clear()

    def _state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def _device(self) -> torch.device | None:
        """Where the state lives (``None`` before any rows)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write this statistic to a safetensors file (see :func:`save_stats`)."""
        save_stats(path, [self])

    @classmethod
    def load(cls: type[S], path: str | os.PathLike, device: torch.device | str | None = None) -> S:
        """Read a statistic written by ``save`` (see :func:`load_stats`)."""
        loaded = load_stats(path, device)
        if len(loaded) != 1 or type(loaded[0]) is not cls:
            raise StatsFileError(f"{path} holds {loaded}, not one {cls.__name__}.")
        return loaded[0]

    # -- distributed -------------------------------------------------------------------------------------------

    def all_reduce(self, group: Any = None) -> None:
        """Combine this statistic across the processes of ``group``: afterwards every process holds the
        statistic of all their rows (those of rank 0 first, then rank 1, ...).

        This default gathers every process's state and merges them in rank order; the moment statistics
        override it with a sum of their sufficient statistics (NCCL on GPUs, gloo on CPUs). With NCCL, call
        ``torch.cuda.set_device(local_rank)`` first, as ``torch.distributed`` requires.
        """
        dist = _require_distributed()
        device = self._device() or _reduce_device(dist, group, None)
        mine = {k: v.cpu() for k, v in self.state_dict().items()}
        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, mine, group=group)
        merged = type(self)(**self.config())
        for state in states:
            part = type(self)(**self.config())
            part.load_state_dict(state)
            merged.merge(part)
        self.load_state_dict({k: v.to(device) for k, v in merged.state_dict().items()})


# -- moments -------------------------------------------------------------------------------------------------------


def _shifted_sums(x: Tensor, shift: Tensor, second: bool, batched: bool | None = None,
                  out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``Σ(x - shift)`` (C,) and, if ``second``, ``Σ(x - shift)(x - shift)ᵀ`` (C, C), both float64.

    x: (N, C); shift: (C,) float64 holding float32 values, so it converts to float32 exactly.
    Each product covers one chunk of rows. ``batched`` (default: on CUDA) takes up to 64 chunks in one
    ``bmm``, so a GPU runs a few large kernels per batch rather than several small ones per chunk.
    ``out`` (C, C) float64: add the second sums into it (and return it) instead of a new buffer.
    """
    c = x.shape[1]
    exact = x.dtype == torch.float64 or c < _FLOAT32_MIN_CHANNELS or not _float32_matmul_is_exact()
    dtype = torch.float64 if exact else torch.float32
    chunk_rows = max(_CHUNK_ROWS, _FLOAT64_CHUNK_VALUES // c) if exact else _CHUNK_ROWS
    batched = x.is_cuda if batched is None else batched
    s = shift.to(dtype)
    sum1 = torch.zeros(c, dtype=torch.float64, device=x.device)
    sum2 = (out if out is not None else torch.zeros(c, c, dtype=torch.float64, device=x.device)) if second else None
    for piece in x.split(chunk_rows * (64 if batched else 1)):
        y = piece.to(dtype) - s
        full = len(y) // chunk_rows * chunk_rows
        chunks = [y[:full].view(-1, chunk_rows, c)] if full else []
        if full < len(y):
            chunks.append(y[full:].unsqueeze(0))
        for chunk in chunks:  # chunk: (chunks, rows, C)
            sum1 += chunk.sum(1).sum(0, dtype=torch.float64)
            if sum2 is not None:
                prod = torch.bmm(chunk.transpose(1, 2), chunk)
                if len(prod) > 1:
                    sum2 += prod.sum(0, dtype=torch.float64)
                else:
                    _add_in_blocks(sum2, prod[0])
    return sum1, sum2


def _map_sums(x: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """:func:`_shifted_sums` of the rows of ``x: (N, C, L)`` (row ``(n, l)`` is ``x[n, :, l]``), float32, with the
    second sums added into ``out`` (C, C) float64; returns ``Σ(x - shift)`` (C,) float64.

    Each float32 product covers at most ``_CHUNK_ROWS`` rows, as in :func:`_shifted_sums`: whole samples
    accumulate by ``addmm`` (``(C, L) @ (L, C)``, no transposed copy) until the chunk is full.
    """
    n, c, length = x.shape
    y = x - shift.to(torch.float32).view(1, c, 1)
    sum1 = y.sum(2).sum(0, dtype=torch.float64)
    step = min(length, _CHUNK_ROWS)
    per_chunk = max(1, _CHUNK_ROWS // length)
    acc = torch.empty(c, c, dtype=torch.float32, device=x.device)
    for start in range(0, length, step):
        for first in range(0, n, per_chunk):
            acc.zero_()
            for i in range(first, min(n, first + per_chunk)):
                part = y[i, :, start : start + step]
                acc.addmm_(part, part.T)
            _add_in_blocks(out, acc)
    return sum1


def _add_in_blocks(out: Tensor, prod: Tensor) -> None:
    """``out += prod`` for a float32 ``prod`` (C, C), cast in row blocks, never as a (C, C) float64 copy."""
    for start in range(0, prod.shape[0], 256):
        out[start : start + 256] += prod[start : start + 256]


def _magnitude(x: Tensor) -> float:
    """``max |x|`` (NaN if ``x`` holds one) without the copy that ``x.abs()`` makes: a fifth of a batch's add."""
    low, high = torch.aminmax(x)
    return float(torch.maximum(-low, high))


class Mean(Stat):
    """Per-channel mean of rows ``x: (N, C)``: ``mean() -> (C,)`` float64.

    State: a shift ``s`` (C,) and ``Σ(x - s)`` (C,), float64. The shift is the first batch's mean (rounded
    to float32), so float32 chunk sums stay small and exact enough.
    """

    _second = False

    def __init__(self) -> None:
        super().__init__()
        self._clear()

    def _clear(self) -> None:
        self._shift: Tensor | None = None
        self._sum: Tensor | None = None
        self._sum2: Tensor | None = None

    def _start(self, head: Tensor) -> None:
        """Set the shift from the first rows ``head`` (N, C) and allocate the sums."""
        head = head[:_CHUNK_ROWS]
        head = head[torch.isfinite(head).all(dim=1)]
        shift = head.double().mean(0).float().double() if len(head) else head.new_zeros(head.shape[1])
        self._shift = torch.nan_to_num(shift.double(), nan=0.0, posinf=0.0, neginf=0.0)
        self._sum = torch.zeros_like(self._shift)
        self._sum2 = (
            torch.zeros(len(shift), len(shift), dtype=torch.float64, device=head.device) if self._second else None
        )

    def add_map(self, x: Tensor) -> None:
        """Accumulate the rows of a feature map ``x: (N, C, *spatial)``, exactly as ``add(rows(x))`` would.

        On the CPU, second moments of float32 maps with at least 16x16 locations are read in place, one
        ``addmm`` per sample, without the transposed copy that :func:`rows` makes (a quarter of a batch's
        statistics time); everything else, checks included, goes through ``add(rows(x))`` (on a GPU the copy
        is cheap and the rows' batched products beat a kernel per sample).
        """
        if not isinstance(x, Tensor) or x.ndim < 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}.add_map expects a feature map (N, C, *spatial), got {shape}: "
                             f"use add() for rows (N, C).")
        fast = (
            self._second and x.device.type == "cpu" and x.dtype == torch.float32 and len(x) > 0
            and math.prod(x.shape[2:]) >= _MAP_MIN_LOCATIONS
            and x.shape[1] >= _FLOAT32_MIN_CHANNELS and x.shape[1] == (self._channels or x.shape[1])
            and _float32_matmul_is_exact()
        )
        if not fast:
            self.add(rows(x))
            return
        x = x.detach()
        blocks = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, L): a view of a contiguous map
        if self._shift is None:
            self._start(rows(x[: -(-_CHUNK_ROWS // blocks.shape[2])]))
        if not _magnitude(blocks) + _magnitude(self._shift) < _SAFE_MAGNITUDE:  # NaN, inf or huge: the checked path
            self.add(rows(x))
            return
        self._channels = x.shape[1]
        self._sum += _map_sums(blocks, self._shift, out=self._sum2)
        self._count += blocks.shape[0] * blocks.shape[2]

    def _add(self, x: Tensor) -> None:
        if self._shift is None:
            self._start(x)
        if self._second and _magnitude(x) + _magnitude(self._shift) < _SAFE_MAGNITUDE:
            # Finite rows this small cannot overflow a float32 chunk product (4096 · (2e16)² < 3e38): their products
            # go straight into the state, so a (C, C) statistic never holds a second (C, C) float64 buffer.
            sum1, _ = _shifted_sums(x, self._shift, True, out=self._sum2)
            self._sum += sum1
            self._count += x.shape[0]
            return
        sum1, sum2 = _shifted_sums(x, self._shift, self._second)
        total = sum1.sum() if sum2 is None else sum1.sum() + sum2.sum()
        if not torch.isfinite(total):  # NaN / inf rows, or float32 overflow: drop the rows, redo in float64
            x, _ = self._drop_nonfinite(x)
            sum1, sum2 = _shifted_sums(x.double(), self._shift, self._second)
        self._sum += sum1
        if sum2 is not None:
            self._sum2 += sum2
        self._count += x.shape[0]

    def _sums_at(self, shift: Tensor) -> tuple[Tensor, Tensor | None]:
        """This statistic's sums re-expressed around ``shift``: with ``d = s - shift``,
        ``Σ(x - shift) = S1 + n d`` and ``Σ(x - shift)(x - shift)ᵀ = S2 + d S1ᵀ + S1 dᵀ + n d dᵀ``."""
        d = self._shift - shift.to(self._shift.device)
        sum1 = self._sum + self._count * d
        sum2 = None
        if self._sum2 is not None:
            sum2 = self._sum2 + torch.outer(d, self._sum) + torch.outer(self._sum, d) + self._count * torch.outer(d, d)
        return sum1, sum2

    def _merge(self, other: Stat) -> None:
        assert isinstance(other, Mean)
        device = self._device() or other._device()
        if self._count == 0:
            self._load_state({k: v.to(device) for k, v in other._state().items()})
            return
        sum1, sum2 = other._sums_at(self._shift)
        self._sum = self._sum + sum1.to(device)
        if sum2 is not None:
            self._sum2 = self._sum2 + sum2.to(device)

    def _device(self) -> torch.device | None:
        return None if self._shift is None else self._shift.device

    def _state(self) -> dict[str, Tensor]:
        state = {"shift": self._shift, "sum": self._sum}
        if self._second:
            state["sum2"] = self._sum2
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        self._shift = state["shift"].to(torch.float64).clone()
        self._sum = state["sum"].to(torch.float64).clone()
        self._sum2 = state["sum2"].to(torch.float64).clone() if self._second else None
        self._channels = len(self._shift)
        if self._sum.shape != self._shift.shape or (self._second and self._sum2.shape != (len(self._shift),) * 2):
            raise ValueError(
                f"inconsistent {type(self).__name__} state: shapes {[tuple(t.shape) for t in state.values()]}"
            )

    def _require(self, rows_needed: int = 1) -> None:
        if self._count < rows_needed:
            raise ValueError(
                f"{type(self).__name__} has {self._count} rows, needs at least {rows_needed}: add rows first."
            )

    def mean(self) -> Tensor:
        """Per-channel mean ``(C,)``, float64, on the data's device."""
        self._require()
        return self._shift + self._sum / self._count

    def all_reduce(self, group: Any = None) -> None:
        """Sum the sufficient statistics of every process (every process ends with the same result).

        The processes' shifts differ, so each re-expresses its sums around the global mean first (one extra
        all_reduce of C numbers); the sums are then added exactly.
        """
        dist = _require_distributed()
        home = self._device()
        device = _reduce_device(dist, group, home)
        # Channel counts: max of C and max of -C over the processes that saw rows must agree.
        c = self._channels or 0
        span = torch.tensor([c, -c if c else -(2**62)], dtype=torch.int64, device=device)
        dist.all_reduce(span, op=dist.ReduceOp.MAX, group=group)
        channels, low = int(span[0]), -int(span[1])
        if channels and low != channels:
            raise ValueError(f"all_reduce: processes hold {low} and {channels} channels: different layers?")
        counts = torch.tensor([self._count, self._skipped], dtype=torch.int64, device=device)
        dist.all_reduce(counts, group=group)
        total, skipped = int(counts[0]), int(counts[1])
        if total:
            if self._count == 0:
                self._shift = torch.zeros(channels, dtype=torch.float64, device=device)
                self._sum = torch.zeros_like(self._shift)
                self._sum2 = (
                    torch.zeros(channels, channels, dtype=torch.float64, device=device) if self._second else None
                )
            shift, mine = self._shift.to(device), self._sum.to(device)
            grand = self._count * shift + mine  # Σx on this process
            dist.all_reduce(grand, group=group)
            common = (grand / total).float().double()  # float32 values, as a shift must be
            self._shift, self._sum = shift, mine
            self._sum2 = None if self._sum2 is None else self._sum2.to(device)
            sum1, sum2 = self._sums_at(common)
            flat = torch.cat([sum1, sum2.flatten()]) if sum2 is not None else sum1
            dist.all_reduce(flat, group=group)
            target = home or device
            self._shift = common.to(target)
            self._sum = flat[:channels].to(target)
            self._sum2 = flat[channels:].view(channels, channels).to(target) if sum2 is not None else None
            self._channels = channels
        self._count, self._skipped = total, skipped


class SecondMoment(Mean):
    """Uncentred second moment ``E[x xᵀ]`` of rows ``x: (N, C)``: ``moment() -> (C, C)`` float64.

    This is the paper's ``C = K Kᵀ / N`` for keys ``K``. State: shift ``s``, ``S1 = Σ(x - s)``,
    ``S2 = Σ(x - s)(x - s)ᵀ``; ``moment() = (S2 + s S1ᵀ + S1 sᵀ) / n + s sᵀ``.
    """

    _second = True

    def moment(self) -> Tensor:
        """``E[x xᵀ]``: ``(C, C)``, float64, on the data's device."""
        self._require()
        s, sum1, n = self._shift, self._sum, self._count
        # In place on one new (C, C) buffer: at d = 14336 each temporary would be 1.6 GB.
        return torch.addr(self._sum2, s, sum1).addr_(sum1, s).div_(n).addr_(s, s)


class Covariance(SecondMoment):
    """Centred covariance of rows ``x: (N, C)``: ``covariance() -> (C, C)`` float64 (divides by n - 1).

    Sums are kept around a shift ``s``: ``cov = (S2 - S1 S1ᵀ / n) / (n - 1)`` with ``S1 = Σ(x - s)``,
    ``S2 = Σ(x - s)(x - s)ᵀ``. ``merge`` re-expresses the other's sums around this shift and adds them, the
    pairwise update of Chan, Golub & LeVeque (1983) written for a fixed shift: exact, with no cancellation
    when ``s`` is near the mean. ``mean()`` and ``moment()`` come with it.
    """

    def covariance(self) -> Tensor:
        """``E[(x - μ)(x - μ)ᵀ]`` with the n - 1 correction: ``(C, C)``, float64, on the data's device."""
        self._require(2)
        return (self._sum2 - torch.outer(self._sum, self._sum) / self._count) / (self._count - 1)


# -- order statistics ----------------------------------------------------------------------------------------------


class TopK(Stat):
    """Per channel, the ``k`` largest values and the ids of their rows.

    A row's id is its position in the stream of rows added (dropped NaN / inf rows keep their place), so
    for ``collect`` a row id ``r`` is location ``r % (H*W)`` of sample ``r // (H*W)``. ``merge(other)``
    numbers other's rows after this one's.
    """

    def __init__(self, k: int = 100) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"TopK needs k >= 1, got {k!r}.")
        super().__init__()
        self.k = int(k)
        self._clear()

    def _clear(self) -> None:
        self._values: Tensor | None = None
        self._ids: Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {"k": self.k}

    def _add(self, x: Tensor) -> None:
        offset = self._count + self._skipped
        kept = None
        if not torch.isfinite(x.sum(0)).all():  # cheap screen; the exact row check only when it trips
            x, kept = self._drop_nonfinite(x)
        if len(x):
            values, index = torch.topk(x, min(self.k, len(x)), dim=0)
            ids = (index if kept is None else kept[index]) + offset
            self._combine(values.double(), ids)
        self._count += len(x)

    def _combine(self, values: Tensor, ids: Tensor) -> None:
        if self._values is not None:
            values = torch.cat([self._values, values.to(self._values.device)])
            ids = torch.cat([self._ids, ids.to(self._ids.device)])
        top, pick = torch.topk(values, min(self.k, len(values)), dim=0)
        self._values, self._ids = top, ids.gather(0, pick)

    def _merge(self, other: Stat) -> None:
        assert isinstance(other, TopK)
        self._combine(other._values, other._ids + self._count + self._skipped)

    def _device(self) -> torch.device | None:
        return None if self._values is None else self._values.device

    def _state(self) -> dict[str, Tensor]:
        return {"values": self._values, "ids": self._ids}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        self._values = state["values"].to(torch.float64).clone()
        self._ids = state["ids"].to(torch.int64).clone()
        if self._values.shape != self._ids.shape or len(self._values) > self.k:
            raise ValueError(
                f"inconsistent TopK(k={self.k}) state: values {tuple(self._values.shape)}, ids {tuple(self._ids.shape)}"
            )
        self._channels = self._values.shape[1]

    def topk(self) -> tuple[Tensor, Tensor]:
        """``(values (k, C) float64, row_ids (k, C) int64)``, largest first (``min(k, count)`` rows)."""
        if not self._count:
            raise ValueError("TopK has no rows yet: add rows first.")
        return self._values, self._ids


class Quantile(Stat):
    """Per-channel quantiles of rows ``x: (N, C)`` from a mergeable compactor sketch.

    Items of weight ``2^h`` sit at level ``h`` (rows enter at level 0). A level holding ``resolution`` or
    more items is *compacted*: sorted per channel, every other item (offset 0 or 1 by a seeded coin) moves
    up a level at twice the weight, for all channels at once. A compaction at level ``h`` moves the
    estimated rank of any value by at most ``2^h``, so the sketch tracks the exact bound
    ``E = rank_error() = Σ 2^h`` over its compactions, and for each channel the value ``v`` returned for
    quantile ``q`` of ``n`` rows satisfies::

        #{rows <= v} >= q n - E    and    #{rows < v} <= q n + E.

    Level ``h`` compacts at most ``n / (2^h resolution)`` times, so ``E / n <= (log2(n / resolution) + 1) /
    resolution`` (about 1% for 10^6 rows at resolution 1024; the random offsets make the typical error far
    smaller). Until the first compaction (fewer than ``resolution`` rows) the quantiles are exact order
    statistics. Memory: fewer than ``resolution`` items per level and channel.
    """

    def __init__(self, resolution: int = 1024, seed: int = 0) -> None:
        if int(resolution) != resolution or resolution < 2 or resolution % 2:
            raise ValueError(f"Quantile needs an even resolution >= 2, got {resolution!r}.")
        super().__init__()
        self.resolution = int(resolution)
        self.seed = int(seed)
        self._rng = torch.Generator().manual_seed(self.seed)
        self._clear()

    def _clear(self) -> None:
        self._levels: list[Tensor] = []
        self._error = 0

    def config(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "seed": self.seed}

    def rank_error(self) -> int:
        """The bound ``E`` on every quantile's rank error, in rows (0 while exact)."""
        return self._error

    def _add(self, x: Tensor) -> None:
        if not torch.isfinite(x.sum(0)).all():
            x, _ = self._drop_nonfinite(x)
        if len(x):
            self._push([x])
        self._count += len(x)

    def _push(self, levels: Sequence[Tensor]) -> None:
        """Append items per level (``levels[h]: (m, C)``), then compact every level that is full."""
        dtype = self._levels[0].dtype if self._levels else torch.promote_types(levels[0].dtype, torch.float32)
        device = self._levels[0].device if self._levels else levels[0].device
        for h, items in enumerate(levels):
            items = items.to(device, dtype)
            if h < len(self._levels):
                self._levels[h] = torch.cat([self._levels[h], items])
            else:
                self._levels.append(items)
        h = 0
        while h < len(self._levels):
            level = self._levels[h]
            if len(level) >= self.resolution:
                m = len(level) // 2 * 2
                offset = int(torch.randint(2, (1,), generator=self._rng))
                promoted = level[:m].sort(dim=0).values[offset::2]
                self._levels[h] = level[m:]
                if h + 1 < len(self._levels):
                    self._levels[h + 1] = torch.cat([self._levels[h + 1], promoted])
                else:
                    self._levels.append(promoted)
                self._error += 2**h
            h += 1

    def _compatible(self, other: Stat) -> bool:
        return isinstance(other, Quantile) and other.resolution == self.resolution  # coins may differ

    def _merge(self, other: Stat) -> None:
        assert isinstance(other, Quantile)
        self._error += other._error
        self._push(other._levels)

    def _device(self) -> torch.device | None:
        return self._levels[0].device if self._levels else None

    def _state(self) -> dict[str, Tensor]:
        return {
            "items": torch.cat(self._levels),
            "level_sizes": torch.tensor([len(level) for level in self._levels]),
            "error": torch.tensor(self._error),
        }

    def state_dict(self) -> dict[str, Tensor]:
        # The coin's state travels even before any rows, so a reloaded sketch compacts exactly as the original.
        return {**super().state_dict(), "rng": self._rng.get_state()}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        sizes = [int(s) for s in state["level_sizes"]]
        items = state["items"]
        if sum(sizes) != len(items) or sum(s << h for h, s in enumerate(sizes)) != self._count:
            raise ValueError(
                f"inconsistent Quantile state: level sizes {sizes} for {len(items)} items, {self._count} rows"
            )
        self._levels = [level.clone() for level in items.split(sizes)]
        self._error = int(state["error"])
        self._channels = items.shape[1]

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._rng.set_state(state["rng"].cpu())

    def quantiles(self, q: Sequence[float] | Tensor) -> Tensor:
        """Values at quantiles ``q`` (each in [0, 1]): ``(len(q), C)`` float64, on the data's device.

        Quantile ``q`` is the smallest sketch value whose estimated rank reaches ``q * count`` (no
        interpolation); see the class docstring for the rank guarantee.
        """
        if not self._count:
            raise ValueError("Quantile has no rows yet: add rows first.")
        items = torch.cat(self._levels)
        device = items.device
        q = torch.as_tensor(q, dtype=torch.float64, device=device).reshape(-1)
        if ((q < 0) | (q > 1) | q.isnan()).any():
            raise ValueError(f"quantiles need q in [0, 1], got {q.tolist()}.")
        weights = torch.cat(
            [
                torch.full((len(level),), 2.0**h, dtype=torch.float64, device=device)
                for h, level in enumerate(self._levels)
            ]
        )
        values, order = items.sort(dim=0)
        ranks = weights[order].cumsum(0).T.contiguous()  # (C, M): estimated rank of each sorted value
        target = (q * self._count).expand(len(ranks), -1).contiguous()  # (C, len(q))
        index = torch.searchsorted(ranks, target).clamp(max=len(items) - 1)
        return values.T.gather(1, index).T.double()


# -- files ---------------------------------------------------------------------------------------------------------


def _hash_tensors(hasher: Any, named: Iterable[tuple[str, Tensor]]) -> None:
    """Feed names, dtypes, shapes and raw bytes of ``named`` tensors into ``hasher`` (in the order given)."""
    for name, tensor in named:
        tensor = tensor.detach()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())


def _digest(tensors: dict[str, Tensor]) -> str:
    hasher = hashlib.sha256()
    _hash_tensors(hasher, sorted(tensors.items()))
    return hasher.hexdigest()


def save_stats(path: str | os.PathLike, stats: Stat | Sequence[Stat]) -> None:
    """Write one or several statistics to a safetensors file at ``path``.

    The metadata holds each statistic's kind and arguments and a SHA-256 of all tensors, so
    :func:`load_stats` detects corruption. The file is written beside ``path`` and renamed over it, so a
    reader never sees a partial file.
    """
    stats = [stats] if isinstance(stats, Stat) else list(stats)
    tensors = {
        f"{i}.{key}": value.detach().cpu().contiguous()
        for i, stat in enumerate(stats)
        for key, value in stat.state_dict().items()
    }
    metadata = {
        "format": _FORMAT,
        "stats": json.dumps([{"kind": type(s).__name__, "config": s.config()} for s in stats]),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: str | os.PathLike, device: torch.device | str | None = None) -> list[Stat]:
    """Read the statistics written by :func:`save_stats`, onto ``device`` (default CPU).

    Raises :class:`StatsFileError` for a truncated or corrupt file (checksum mismatch) and
    ``FileNotFoundError`` for a missing one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors reports truncation and bad headers with its own error types
        raise StatsFileError(f"{path} is not a readable statistics file ({e}); delete it and recompute.") from e
    if metadata.get("format") != _FORMAT:
        raise StatsFileError(f"{path} is not a {_FORMAT} file (format {metadata.get('format')!r}).")
    if metadata.get("sha256") != _digest(tensors):
        raise StatsFileError(f"{path} is corrupt: its tensors do not match their SHA-256; delete it and recompute.")
    stats = []
    try:
        for i, entry in enumerate(json.loads(metadata["stats"])):
            stat = Stat.kinds[entry["kind"]](**entry["config"])
            prefix = f"{i}."
            stat.load_state_dict(
                {
                    k[len(prefix) :]: v if device is None else v.to(device)
                    for k, v in tensors.items()
                    if k.startswith(prefix)
                }
            )
            stats.append(stat)
    except (KeyError, TypeError, ValueError) as e:
        raise StatsFileError(f"{path} holds an unusable statistics state ({e!r}); delete it and recompute.") from e
    return stats


# -- collect -------------------------------------------------------------------------------------------------------


def fingerprint(model: nn.Module, layer: str, inputs: Any, side: str = "input") -> str:
    """SHA-256 (hex) of every parameter and buffer that can change what ``layer`` receives (``side="input"``)
    or emits (``side="output"``).

    One forward of ``inputs``, stopped after ``layer``, records which modules ran to completion before it;
    their own tensors count, and so do the direct tensors of the modules enclosing ``layer`` (which read
    them around their children), with every class name. Modules after ``layer`` never run, so changing
    them keeps the fingerprint; with ``side="input"`` neither does changing ``layer`` itself (editing a
    layer leaves its keys' statistics valid). Tensors read without calling their module (weights tied
    through ``F.linear``, say) count only if that module ran or encloses ``layer``.
    """
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}.")
    get_module(model, layer)
    modules = dict(model.named_modules())
    ran: list[str] = []

    def record(output: Any, name: str) -> Any:
        ran.append(name)
        return output

    names = [name for name in modules if name]
    with (
        torch.no_grad(),
        TraceDict(model, names, retain_output=False, edit_output=record),
        Trace(model, layer, retain_output=False, stop=True),
    ):
        call_model(model, inputs)
    inside = {layer} | {n for n in modules if n.startswith(layer + ".")} if layer else set(modules)
    if side == "input":
        ran = [n for n in ran if n not in inside]
    else:
        ran += sorted(inside)
    parts = layer.split(".") if layer else []
    enclosing = [".".join(parts[:i]) for i in range(len(parts))]
    # A composite layer's own tensors are its nonlinear rest, read after its key module (the memory_key_module
    # contract), so they never change its keys: holding or editing the layer keeps its keys' statistics.
    rest = {p for p in enclosing if side == "input" and layer == f"{p}.{getattr(modules[p], 'memory_key_module', '')}"}
    hasher = hashlib.sha256()
    for name in sorted(set(ran) | set(enclosing)):
        module = modules[name]
        hasher.update(f"module {name} {type(module).__module__}.{type(module).__qualname__}\n".encode())
        if name not in rest:
            _hash_tensors(hasher, ((f"{name}.{k}", t) for k, t in _own_tensors(module)))
    return hasher.hexdigest()


def _own_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """A module's own parameters and buffers as they decide its function: ``module.fingerprint_tensors()`` when
    it defines one (a held buffer equal to what the module would compute without it then counts as absent)."""
    own = getattr(module, "fingerprint_tensors", None)
    tensors = own() if callable(own) else [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(k, t) for k, t in tensors if t is not None]


def _writable_dir(cache_dir: str | os.PathLike) -> Path:
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(
            f"cache_dir {str(path)!r} is not a writable directory ({e.strerror or e}): pass a writable cache_dir, "
            f"or cache_dir=None to collect without a cache."
        ) from e
    return path


def collect(
    model: nn.Module,
    layer: str,
    sampler: Callable[[list[int]], Any],
    n: int,
    stats: S | Sequence[Stat],
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    side: str = "input",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> S | Sequence[Stat]:
    """Accumulate ``stats`` over the keys of ``layer`` for the samples of seeds ``0 .. n-1``; returns ``stats``.

    Each batch ``sampler(seeds)`` is moved to ``device`` (default: the model's) and run through ``model``
    (a tuple is unpacked into arguments, a dict into keywords), under ``torch.no_grad`` and in eval mode
    (restored after), up to the module carrying the keys (:func:`dissect.hooks.key_module_name`: ``layer``
    itself, or its ``memory_key_module`` child): for ``side="input"`` (the keys) the forward stops *before* that
    module runs, for ``side="output"`` (what the memory writes) right after it. The keys or outputs are
    flattened by :func:`rows` (channels last for ``nn.Linear`` and other
    channels-last layer types, :func:`dissect.hooks.keys_channels_last`, else in dim 1) and added to every statistic.
    A key module that does not run exactly once per forward is refused (:class:`~dissect.errors.LayerError`,
    one forward of sample 0 checks it, once per model), since its statistics would mix different calls.

    ``stats`` is a fresh statistic or a sequence of them. With ``cache_dir``, the result is stored in a
    file keyed by the SHA-256 of: the :func:`fingerprint` of the weights the keys depend on, ``layer``,
    ``side``, ``sampler.description``, ``n`` and the statistics' kinds and arguments; a later call with the
    same key loads it instead of running the model (a changed model, sampler or ``n`` never reuses it).
    A truncated or corrupt cache file is reported with a warning and recomputed; a ``cache_dir`` that
    cannot be written raises ``OSError`` before any work.
    """
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' (the keys) or 'output', got {side!r}.")
    if int(n) != n or n < 1 or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"collect needs n >= 1 and batch_size >= 1, got n={n!r}, batch_size={batch_size!r}.")
    stat_list = [stats] if isinstance(stats, Stat) else list(stats)
    for stat in stat_list:
        if not isinstance(stat, Stat):
            raise TypeError(f"collect fills dissect.stats statistics (Mean(), SecondMoment(), ...), got {stat!r}.")
        if stat.count or stat.skipped:
            raise ValueError(f"collect needs fresh statistics, got {stat!r}: pass new ones.")
    key_name = key_module_name(model, layer)
    channels_last = keys_channels_last(get_module(model, key_name))
    device = model_device(model) if device is None else torch.device(device)
    with eval_mode(model), torch.no_grad():
        path = None
        if cache_dir is not None:
            path = _cache_path(cache_dir, model, layer, key_name, sampler, n, side, stat_list, device)
            if _load_cached(path, stat_list, device):
                return stats
        check_single_call(model, [key_name], to_device(sampler([0]), device))
        with tqdm(total=n, unit="sample", desc=f"collect {layer}", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                seeds = list(range(start, min(n, start + batch_size)))
                inputs = to_device(sampler(seeds), device)
                if side == "input":
                    keys = layer_input(model, key_name, inputs)
                else:
                    with Trace(model, key_name, stop=True) as trace:
                        call_model(model, inputs)
                    keys = trace.output
                if not isinstance(keys, Tensor):
                    raise LayerError(f"The {side} of {key_name!r} is a {type(keys).__name__}, not a tensor: collect "
                                     f"statistics of a layer that takes and returns one tensor.")
                if channels_last or keys.ndim < 3:
                    x = rows(keys, channels_last)
                    for stat in stat_list:
                        stat.add(x)
                else:  # moments take the map (second moments read it in place); others share one flattened copy
                    x = None
                    for stat in stat_list:
                        if isinstance(stat, Mean):
                            stat.add_map(keys)
                        else:
                            x = rows(keys) if x is None else x
                            stat.add(x)
                bar.update(len(seeds))
        if path is not None:
            save_stats(path, stat_list)
    return stats


def _cache_path(
    cache_dir: str | os.PathLike,
    model: nn.Module,
    layer: str,
    key_name: str,
    sampler: Any,
    n: int,
    side: str,
    stats: list[Stat],
    device: torch.device,
) -> Path:
    description = getattr(sampler, "description", None)
    if not isinstance(description, str) or not description:
        raise ModelError(
            "caching statistics needs sampler.description, a stable text naming the sampler's distribution "
            "(see the Sampler contract in docs/ARCHITECTURE.md); set it, or pass cache_dir=None."
        )
    cache_dir = _writable_dir(cache_dir)
    key = {
        "format": _FORMAT,
        "fingerprint": fingerprint(model, key_name, to_device(sampler([0]), device), side),
        "layer": layer,
        "key_module": key_name,
        "side": side,
        "sampler": description,
        "n": int(n),
        "stats": [{"kind": type(s).__name__, "config": s.config()} for s in stats],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{layer or 'model'}-{side}-n{n}-{digest[:32]}.safetensors"


def _load_cached(path: Path, stats: list[Stat], device: torch.device) -> bool:
    """Fill ``stats`` from the cache file at ``path``; ``False`` (with a warning if it was unusable) to recompute."""
    if not path.exists():
        return False
    try:
        loaded = load_stats(path, device)
        if [(type(s), s.config()) for s in loaded] != [(type(s), s.config()) for s in stats]:
            raise StatsFileError(f"{path} holds {loaded}, not the statistics asked for")
    except StatsFileError as e:
        warnings.warn(f"statistics cache unusable, recomputing: {e}", RuntimeWarning, stacklevel=3)
        return False
    for stat, cached in zip(stats, loaded, strict=True):
        stat.load_state_dict(cached.state_dict())
    return True
