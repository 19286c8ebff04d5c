"""Style controls over a StyleGAN-style generator: truncation ψ, style mixing by layer group, noise per layer,
interpolation between two seeds in z or in w, and shifts of z, w or a layer's activations (attribute vectors).

Everything here drives :class:`dissect.models.stylegan.Generator` (or any model with the same ``mapping``,
``synthesis.block_names`` and ``num_ws``) through its public forward, so it works on an edited model exactly as
on the original: a rewrite changes a layer's weight, and the controls only choose what goes in.

The generator has one w per styled layer (``num_ws`` rows), in the order of :func:`ws_layers`: for each block
``b4, b8, …`` its ``conv0`` (not in ``b4``), ``conv1`` and ``torgb``. Style mixing takes whole resolution groups
from a second seed, as in StyleGAN (Karras et al., 2019, section 3.1), by the block's resolution:

* ``coarse``: 4 and 8 (pose, layout: where the building, horizon and sky are);
* ``middle``: 16 up to half the output (e.g. 16 and 32 at 64 px: shapes, which buildings and trees);
* ``fine``: the output resolution, and 64 and above (colours, texture, small detail).

At 64 px that is ws 0-4 (``b4.conv1, b4.torgb, b8.*``), 5-10 (``b16.*, b32.*``) and 11-13 (``b64.*``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dissect.errors import LayerError, ModelError, NonFiniteError, RequestError
from dissect.hooks import TraceDict, get_module, model_device

__all__ = [
    "GROUPS",
    "NOISE_MODES",
    "TRUNCATION_RANGE",
    "Style",
    "Shift",
    "ws_layers",
    "layer_groups",
    "group_ws",
    "noise_layers",
    "styles",
    "noise",
    "synthesize",
    "render",
    "interpolate",
]

GROUPS = ("coarse", "middle", "fine")
NOISE_MODES = ("const", "off", "resample")  # the layer's fixed noise map / no noise / fresh noise seeded per sample
TRUNCATION_RANGE = (0.0, 1.5)  # ψ = 1 samples w as trained, 0 gives the mean w; above 1 exaggerates


def _check_generator(G: nn.Module) -> None:
    ok = all(hasattr(G, a) for a in ("mapping", "synthesis", "num_ws")) and hasattr(G.synthesis, "block_names")
    if not ok:
        raise ModelError(f"Style controls need a StyleGAN-style generator (mapping, synthesis with block_names, "
                         f"num_ws, as dissect.models.stylegan.Generator); {type(G).__name__} is not one.")


def ws_layers(G: nn.Module) -> list[str]:
    """The layer each row of ``ws (N, num_ws, w_dim)`` styles, in order (``synthesis.b4.conv1``, …)."""
    _check_generator(G)
    names = []
    for block in G.synthesis.block_names:
        convs = ("conv1", "torgb") if getattr(G.synthesis, block).conv0 is None else ("conv0", "conv1", "torgb")
        names += [f"synthesis.{block}.{c}" for c in convs]
    return names


def _group_of(resolution: int, output: int) -> str:
    if resolution <= 8:
        return "coarse"
    return "fine" if resolution >= min(64, output) else "middle"


def layer_groups(G: nn.Module) -> dict[str, list[str]]:
    """``{"coarse": [layer, …], "middle": […], "fine": […]}``: the styled layers of each group (module docstring)."""
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in ws_layers(G):
        resolution = int(name.split(".")[1][1:])  # "synthesis.b16.conv1" -> 16
        groups[_group_of(resolution, G.synthesis.resolutions[-1])].append(name)
    return groups


def group_ws(G: nn.Module) -> dict[str, list[int]]:
    """``{"coarse": [0, 1, …], …}``: the rows of ``ws`` each group covers."""
    index = {name: i for i, name in enumerate(ws_layers(G))}
    return {g: [index[n] for n in names] for g, names in layer_groups(G).items()}


def noise_layers(G: nn.Module) -> list[str]:
    """The layers that add noise (every modulated conv but the RGB outputs), in forward order."""
    return [n for n in ws_layers(G) if getattr(get_module(G, n), "noise_strength", None) is not None]


@dataclass(frozen=True)
class Style:
    """How to render: truncation, style mixing, noise.

    ``truncation``: ψ in :data:`TRUNCATION_RANGE`. ``mix_seed``: a second seed whose w the ``mix`` groups take
    (a subset of :data:`GROUPS`). ``noise``: a mode of :data:`NOISE_MODES` per group or per layer name (a layer's
    own entry wins over its group's; unnamed layers keep ``const``). ``noise_seed``: varies ``resample`` noise.
    """

    truncation: float = 1.0
    mix_seed: int | None = None
    mix: tuple[str, ...] = ()
    noise: Mapping[str, str] = field(default_factory=dict)
    noise_seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = TRUNCATION_RANGE
        if not (math.isfinite(self.truncation) and lo <= self.truncation <= hi):
            raise RequestError(f"Truncation ψ must lie in [{lo}, {hi}] (1 = no truncation, 0 = the mean image), "
                               f"got {self.truncation}.")
        unknown = [g for g in self.mix if g not in GROUPS]
        if unknown:
            raise RequestError(f"Unknown style-mixing group(s) {unknown}; choose from {GROUPS}.")
        if self.mix and self.mix_seed is None:
            raise RequestError(f"Mixing {list(self.mix)} needs a second seed: set mix_seed.")
        bad = {k: v for k, v in self.noise.items() if v not in NOISE_MODES}
        if bad:
            raise RequestError(f"Unknown noise mode(s) {bad}; each must be one of {NOISE_MODES}.")

    def noise_modes(self, G: nn.Module) -> dict[str, str]:
        """The mode of every noise layer of ``G``; refuses a key that is neither a group nor a noise layer."""
        names = noise_layers(G)
        unknown = [k for k in self.noise if k not in GROUPS and k not in names]
        if unknown:
            raise LayerError(f"No noise layer or group named {unknown}; the groups are {GROUPS}, the noise layers "
                             f"{names}.")
        groups = {n: g for g, members in layer_groups(G).items() for n in members}
        return {n: self.noise.get(n, self.noise.get(groups[n], "const")) for n in names}


@dataclass(frozen=True)
class Shift:
    """Add ``vector`` where ``space`` says: ``"z"`` (shape ``(z_dim,)``), ``"w"`` (``(w_dim,)``: the w of every
    layer, or of the ``groups`` given) or a layer name (the shape of one sample of its output, e.g.
    ``(C, H, W)``), during the forward."""

    space: str
    vector: Tensor
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise RequestError(f"Unknown style group(s) {unknown}; choose from {GROUPS}.")
        if self.groups and self.space != "w":
            raise RequestError(f"Only a shift in w can be limited to style groups, not one in {self.space!r}.")
        if not torch.isfinite(self.vector).all():  # it would turn every image it touches to NaN
            raise NonFiniteError(f"The shift in {self.space!r} contains NaN or Inf: refit its vector.")


def styles(G: nn.Module, z: Tensor, style: Style = Style(), z_mix: Tensor | None = None,
           shifts: Sequence[Shift] = ()) -> Tensor:
    """``z (N, z_dim)`` -> ``ws (N, num_ws, w_dim)``: z shifts added, mapped and truncated, the ``mix`` groups
    taken from ``z_mix`` (``(1 or N, z_dim)``, unshifted; needed when ``style.mix``), then w shifts added to
    their rows (mixed ones included)."""
    _check_generator(G)
    for s in shifts:
        want = {"z": tuple(z.shape[1:]), "w": (G.w_dim,) if hasattr(G, "w_dim") else None}.get(s.space)
        if want is not None and tuple(s.vector.shape) != want:
            raise RequestError(f"A shift in {s.space} must have shape {tuple(want)} for this model, got "
                               f"{tuple(s.vector.shape)}: fit the vector on this model.")
    z = z + sum((s.vector.to(z) for s in shifts if s.space == "z"), torch.zeros_like(z[0]))

    def to_ws(latent: Tensor) -> Tensor:
        return G.mapping(latent, style.truncation).unsqueeze(1).expand(-1, G.num_ws, -1)

    ws = to_ws(z)
    if style.mix:
        if z_mix is None:
            raise RequestError("Style mixing needs the mix seed's latent (z_mix).")
        ws = ws.clone()
        rows = [i for g in style.mix for i in group_ws(G)[g]]
        ws[:, rows] = to_ws(z_mix.to(z)).expand(len(z), -1, -1)[:, rows]
    # After truncation and mixing, so that a shift moves a sample by the same amount whatever ψ or mix.
    rows_of = group_ws(G)
    for s in shifts:
        if s.space == "w":
            rows = [i for g in s.groups for i in rows_of[g]] if s.groups else list(range(G.num_ws))
            ws = ws.clone()
            ws[:, rows] += s.vector.to(ws)
    return ws


def _resampled(shape: tuple[int, ...], seeds: Sequence[int], layer_index: int, noise_seed: int) -> Tensor:
    """``(N, 1, H, W)`` standard normal noise, row i from (seeds[i], layer, noise_seed) alone."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed((int(s) * 1009 + layer_index) * 1013 + noise_seed))
        for s in seeds
    ])


@contextlib.contextmanager
def noise(G: nn.Module, modes: Mapping[str, str], seeds: Sequence[int], noise_seed: int = 0) -> Iterator[None]:
    """Within the block, each layer in ``modes`` (layer -> mode of :data:`NOISE_MODES`) draws that noise.

    ``off`` and ``resample`` temporarily replace the layer's fixed noise map (restored on exit, errors
    included): by zeros, or by noise seeded per sample from ``seeds`` (one per row of the next forward), so a
    seed renders the same image in any batch.
    """
    swapped: list[tuple[nn.Module, Tensor]] = []
    try:
        for i, name in enumerate(noise_layers(G)):
            mode = modes.get(name, "const")
            if mode == "const":
                continue
            module = get_module(G, name)
            const = module.noise_const
            if mode == "off":
                new = torch.zeros_like(const)
            else:
                new = _resampled(tuple(const.shape[1:]), seeds, i, noise_seed).to(const)
            swapped.append((module, const))
            module.noise_const = new
        yield
    finally:
        for module, const in swapped:
            module.noise_const = const


def synthesize(G: nn.Module, ws: Tensor, seeds: Sequence[int], style: Style = Style(),
               shifts: Sequence[Shift] = ()) -> Tensor:
    """``ws (N, num_ws, w_dim)`` -> images ``(N, 3, H, W)``, with ``style``'s noise per layer (``seeds``: one per
    row, for resampled noise) and the shifts of layers' activations added as the forward passes them.

    A shifted layer must run exactly once per forward (else :class:`~dissect.errors.LayerError`: a layer the
    forward never reaches, or reaches repeatedly, has no one activation to move)."""
    if len(seeds) != len(ws):
        raise RequestError(f"synthesize needs one seed per row of ws: {len(seeds)} seeds for {len(ws)} rows.")
    by_layer: dict[str, Tensor] = {}
    for s in shifts:
        if s.space not in ("z", "w"):
            by_layer[s.space] = by_layer[s.space] + s.vector if s.space in by_layer else s.vector
    calls = dict.fromkeys(by_layer, 0)

    def edit(output: Tensor, layer: str) -> Tensor:
        calls[layer] += 1
        if not isinstance(output, Tensor) or output.shape[1:] != by_layer[layer].shape:
            got = tuple(output.shape[1:]) if isinstance(output, Tensor) else type(output).__name__
            raise LayerError(f"Layer {layer!r} emits {got} per sample, but its shift has shape "
                             f"{tuple(by_layer[layer].shape)}: fit the vector on this model's layer.")
        return output + by_layer[layer].to(output)

    with noise(G, style.noise_modes(G), seeds, style.noise_seed), \
            TraceDict(G, list(by_layer), retain_output=False, edit_output=edit):
        images = G.synthesis(ws, noise_mode="const")
    wrong = {n: c for n, c in calls.items() if c != 1}
    if wrong:
        raise LayerError(f"Cannot add a vector at {list(wrong)}: the forward reaches it {list(wrong.values())} times "
                         f"where a shift needs exactly one call; choose a synthesis layer.")
    return images


@torch.no_grad()
def render(G: nn.Module, sampler, seeds: Sequence[int], style: Style = Style(), shifts: Sequence[Shift] = ()) -> Tensor:
    """Images ``(N, 3, H, W)`` in about [-1, 1] for ``seeds`` (``sampler(seeds) -> z``) under ``style`` and
    ``shifts``; with the default style and no shifts, exactly ``G(sampler(seeds))``."""
    device = model_device(G)
    z = sampler(list(seeds)).to(device)
    z_mix = sampler([style.mix_seed]).to(device) if style.mix else None
    return synthesize(G, styles(G, z, style, z_mix, shifts), list(seeds), style, shifts)


def _slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of rows ``a, b (1, D)`` at ``t (T, 1)``: keeps a Gaussian latent's typical norm."""
    cos = torch.nn.functional.cosine_similarity(a, b).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)
    if float(omega) < 1e-4:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@torch.no_grad()
def interpolate(G: nn.Module, z_a: Tensor, z_b: Tensor, steps: int, space: str = "w", truncation: float = 1.0) -> Tensor:
    """``ws (steps, num_ws, w_dim)`` from ``z_a`` to ``z_b`` (each ``(1, z_dim)``): spherical in ``"z"``, linear
    in ``"w"`` (the mapped, truncated w), the ends included."""
    if space not in ("z", "w"):
        raise RequestError(f"Interpolate in 'z' or 'w', not {space!r}.")
    if steps < 2:
        raise RequestError(f"An interpolation needs at least 2 steps (the two ends), got {steps}.")
    t = torch.linspace(0, 1, steps, device=z_a.device)[:, None]
    style = Style(truncation=truncation)
    if space == "z":
        return styles(G, _slerp(z_a, z_b, t), style)
    wa, wb = styles(G, z_a, style)[:, 0], styles(G, z_b, style)[:, 0]
    return torch.lerp(wa, wb, t.to(wa)).unsqueeze(1).expand(-1, G.num_ws, -1)
