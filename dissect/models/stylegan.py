"""A small StyleGAN2-style generator and its discriminator.

The generator has what people rewrite in StyleGAN: a mapping network z -> w, a learned constant 4x4
input, modulated and demodulated 3x3 convolutions with per-layer noise, 2x upsampling blocks with RGB
skips, one w per layer (style mixing) and truncation.

Modulation is *unfused*: the input is scaled by the style, one shared convolution runs over the whole
batch, and its output is multiplied by the demodulation factor. That is the same function as StyleGAN2's
per-sample grouped convolution, about 3x cheaper on a CPU, and it exposes the memory view directly: the
key of a layer is the input of its child ``conv`` (the modulated activation), and ``conv.weight`` is the
memory (see ``ModulatedConv2d.memory_key_module``).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MappingNetwork", "ModulatedConv2d", "SynthesisBlock", "SynthesisNetwork", "Generator", "Discriminator"]

NOISE_MODES = ("const", "random", "none")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # The sqrt(2) gain keeps activations at unit scale through the leaky ReLU, as in StyleGAN2.
    return F.leaky_relu(x, 0.2) * math.sqrt(2.0)


class MappingNetwork(nn.Module):
    """z (N, z_dim) -> w (N, w_dim): pixel norm, then an MLP. Tracks the mean w for truncation.

    With ``skip``, a linear map of the normalised z is added to the MLP's output (``skip``, bias-free, starting
    at zero, so a generator trained without it continues as the same function). Where each entry of z is
    already one factor of the scene, as in the world, an MLP alone scrambles them: a random 4-layer mapping
    keeps R² ≈ 0.4 of each z entry linearly readable from w, and a trained one let the watermark's presence be
    read from w at 85% where z gives 98%.
    """

    def __init__(
        self, z_dim: int = 128, w_dim: int = 256, num_layers: int = 4, w_avg_beta: float = 0.995, skip: bool = False
    ) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.skip = nn.Linear(z_dim, w_dim, bias=False) if skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        x = z
        for layer in self.layers:
            x = _lrelu(layer(x))
        if self.skip is not None:
            x = x + self.skip(z)
        if self.training:
            with torch.no_grad():
                self.w_avg.lerp_(x.mean(0).to(self.w_avg.dtype), 1.0 - self.w_avg_beta)
        if truncation_psi != 1.0:
            x = self.w_avg.to(x.dtype).lerp(x, truncation_psi)
        return x


class ModulatedConv2d(nn.Module):
    """A modulated (and optionally demodulated) convolution with noise, bias and activation.

    ``forward(x (N, in, H, W), w (N, w_dim)) -> (N, out, H', W')`` with ``H' = 2H`` when ``up``.
    The child ``conv`` is a bias-free ``nn.Conv2d`` whose input is the (upsampled) modulated activation:
    the layer's keys. Everything after it is the nonlinear rest of the layer.

    Demodulation divides each output channel by the norm of its style-scaled weights, so it reads the weight
    itself: a rewrite ``W₀ + ΔW`` would rescale that channel at every location, whatever the key. Before its
    first rewrite, :meth:`memory_hold` fixes the demodulation at the current weight (the ``demod_reference``
    buffer, ``(out, in)``: squared weight norms per channel pair); in eval mode the layer then demodulates by
    it, so an edit acts only through ``ΔW k`` and keys outside the edit keep their values. Training mode
    always demodulates by the live weight. The buffer is saved with the weights, so an exported edit reloads
    as the same function.
    """

    memory_key_module = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: bool = False,
        demodulate: bool = True,
        activate: bool = True,
        noise: bool = True,
    ) -> None:
        super().__init__()
        self.up = up
        self.demodulate = demodulate
        self.activate = activate
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the layer starts as a plain convolution
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight)
        # Equalised learning rate: unit-variance weights, the 1/sqrt(fan_in) gain applied to the style.
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.resolution = resolution
        if noise:
            self.noise_strength = nn.Parameter(torch.zeros(()))
            gen = torch.Generator().manual_seed(resolution * 1000 + out_channels)
            self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution, generator=gen))
        else:
            self.noise_strength = None
        self.register_buffer("demod_reference", None)  # set by memory_hold()

    def _weight_norms(self) -> torch.Tensor:
        """Squared norms of ``conv.weight`` over its kernel: ``(out, in)``."""
        return self.conv.weight.square().sum(dim=(2, 3))

    def memory_hold(self) -> None:
        """Fix the demodulation at the current weight (once; later calls keep the first reference)."""
        if self.demodulate and self.demod_reference is None:
            self.demod_reference = self._weight_norms().detach().clone()

    def fingerprint_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Own tensors for ``dissect.stats.fingerprint``: a reference held at the current weight demodulates as
        the weight does, so it counts as absent (a hold alone, or an undone edit, keeps cached statistics valid)."""
        own = [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]
        same = self.demod_reference is not None and torch.equal(self.demod_reference, self._weight_norms())
        return [(k, t) for k, t in own if not (same and k == "demod_reference")]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # A held layer's weights carry their reference; plain weights bring none, and loading them releases a hold.
        held = prefix + "demod_reference" in state_dict
        if held and self.demod_reference is None:
            self.demod_reference = self.conv.weight.new_empty(self.conv.weight.shape[:2])  # (out, in), filled by the load
        elif not held:
            self.demod_reference = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain  # (N, in)
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv(x * styles[:, :, None, None])
        if self.demodulate:
            held = self.demod_reference is not None and not self.training
            wsq = self.demod_reference if held else self._weight_norms()  # (out, in)
            x = x * torch.rsqrt(styles.square() @ wsq.t() + 1e-8)[:, :, None, None]
        if self.noise_strength is not None and noise_mode != "none":
            if noise_mode == "const":
                noise = self.noise_const
            elif noise_mode == "random":
                noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            else:
                raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}.")
            x = x + noise * self.noise_strength
        x = x + self.bias[None, :, None, None]
        return _lrelu(x) if self.activate else x


class SynthesisBlock(nn.Module):
    """One resolution: (upsampling) conv0, conv1 and an RGB output added to the upsampled skip."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = ModulatedConv2d(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = ModulatedConv2d(out_channels, out_channels, w_dim, resolution)
        self.torgb = ModulatedConv2d(
            out_channels, 3, w_dim, resolution, kernel_size=1, demodulate=False, activate=False, noise=False
        )
        self.num_ws = 3 if self.conv0 is not None else 2

    def forward(
        self, x: torch.Tensor | None, rgb: torch.Tensor | None, ws: torch.Tensor, noise_mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ws: (N, num_ws, w_dim)`` for this block's layers in order (conv0, conv1, torgb)."""
        i = 0
        if self.conv0 is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
            i = 1
        x = self.conv1(x, ws[:, i], noise_mode)
        y = self.torgb(x, ws[:, i + 1])
        if rgb is not None:
            y = y + F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
        return x, y


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> image (N, 3, R, R). Blocks are named b4, b8, … bR."""

    def __init__(self, w_dim: int, resolution: int, channels: Mapping[int, int]) -> None:
        super().__init__()
        self.resolutions = [2**i for i in range(2, int(math.log2(resolution)) + 1)]
        self.block_names = [f"b{r}" for r in self.resolutions]
        prev = channels[4]
        for res in self.resolutions:
            self.add_module(f"b{res}", SynthesisBlock(prev, channels[res], w_dim, res))
            prev = channels[res]
        self.num_ws = sum(getattr(self, n).num_ws for n in self.block_names)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be (N, {self.num_ws}, w_dim), got {tuple(ws.shape)}.")
        x = rgb = None
        i = 0
        for name in self.block_names:
            block = getattr(self, name)
            x, rgb = block(x, rgb, ws[:, i : i + block.num_ws], noise_mode)
            i += block.num_ws
        return rgb


DEFAULT_CHANNELS = {4: 256, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16}


class Generator(nn.Module):
    """z (N, z_dim) -> image (N, 3, R, R) in about [-1, 1].

    ``G.mapping(z, truncation_psi)`` gives ``ws (N, G.num_ws, w_dim)`` (one w per layer, so styles can be
    mixed by splicing two ws), ``G.synthesis(ws, noise_mode)`` renders them. ``noise_mode="const"`` (the
    default) makes every seed render the same image each time.
    """

    def __init__(
        self,
        z_dim: int = 128,
        w_dim: int = 256,
        resolution: int = 64,
        channels: Mapping[int, int] | None = None,
        mapping_layers: int = 4,
        mapping_skip: bool = False,
    ) -> None:
        super().__init__()
        if resolution not in (32, 64, 128):
            raise ValueError(f"Generator resolution {resolution} is not supported; choose 32, 64 or 128.")
        channels = {int(k): int(v) for k, v in (channels or DEFAULT_CHANNELS).items()}
        self.config = dict(
            z_dim=z_dim, w_dim=w_dim, resolution=resolution, channels=channels, mapping_layers=mapping_layers
        )
        if mapping_skip:  # only where set, so generators without it keep their configuration (and caches' keys)
            self.config["mapping_skip"] = True
        self.z_dim, self.w_dim, self.resolution = z_dim, w_dim, resolution
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, skip=mapping_skip)
        self.synthesis = SynthesisNetwork(w_dim, resolution, channels)
        self.num_ws = self.synthesis.num_ws

    def styles(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """``z (N, z_dim) -> ws (N, num_ws, w_dim)``, the same w for every layer."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be (N, {self.z_dim}), got {tuple(z.shape)}.")
        return self.mapping(z, truncation_psi).unsqueeze(1).expand(-1, self.num_ws, -1)

    def mix(self, z1: torch.Tensor, z2: torch.Tensor, cutoff: int, truncation_psi: float = 1.0) -> torch.Tensor:
        """Style mixing: layers ``[0, cutoff)`` take z1's w, the rest z2's. Returns ws ``(N, num_ws, w_dim)``."""
        if not 0 <= cutoff <= self.num_ws:
            raise ValueError(f"cutoff must lie in [0, {self.num_ws}], got {cutoff}.")
        ws = self.styles(z1, truncation_psi).clone()
        ws[:, cutoff:] = self.styles(z2, truncation_psi)[:, cutoff:]
        return ws

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
        return self.synthesis(self.styles(z, truncation_psi), noise_mode)


class Discriminator(nn.Module):
    """image (N, 3, R, R) -> logits (N,): strided spectral-norm convs, minibatch stddev, a linear head.

    With ``cond_dim``, ``forward(images, cond (N, cond_dim))`` also judges whether the image belongs to its
    condition, by projection (Miyato & Koyama 2018): the head's features are dotted with a linear embedding of
    ``cond`` (``cond_embed``, starting at zero, so a discriminator trained without it continues as the same
    function), plus with ``cond_hidden`` a one-hidden-layer MLP embedding (``cond_mlp``, its output starting at
    zero). A paired generator must then follow its latent to fool it; an unconditional D accepts any
    realistic image for any latent.
    """

    def __init__(
        self,
        resolution: int = 64,
        channels: Mapping[int, int] | None = None,
        mbstd_group: int = 4,
        cond_dim: int = 0,
        cond_hidden: int = 0,
    ) -> None:
        super().__init__()
        channels = channels or {64: 32, 32: 64, 16: 128, 8: 256, 4: 256, 128: 16}
        sn = nn.utils.parametrizations.spectral_norm
        res = resolution
        layers: list[nn.Module] = [sn(nn.Conv2d(3, channels[res], 3, padding=1))]
        while res > 4:
            layers += [nn.LeakyReLU(0.2), sn(nn.Conv2d(channels[res], channels[res // 2], 4, stride=2, padding=1))]
            res //= 2
        self.features = nn.Sequential(*layers)
        self.mbstd_group = mbstd_group
        self.head = nn.Sequential(
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(channels[4] + 1, channels[4], 3, padding=1)),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            sn(nn.Linear(channels[4] * 16, 1)),
        )
        self.cond_dim = cond_dim
        self.cond_embed = nn.Linear(cond_dim, channels[4] * 16) if cond_dim else None
        if self.cond_embed is not None:
            nn.init.zeros_(self.cond_embed.weight)
            nn.init.zeros_(self.cond_embed.bias)
        # With cond_hidden, an MLP embedding beside the linear one, for facts that are not monotone in one entry
        # (a dome is a band of its roof entry); its last layer starts at zero.
        self.cond_mlp = None
        if cond_dim and cond_hidden:
            self.cond_mlp = nn.Sequential(
                nn.Linear(cond_dim, cond_hidden), nn.LeakyReLU(0.2), nn.Linear(cond_hidden, channels[4] * 16)
            )
            nn.init.zeros_(self.cond_mlp[2].weight)
            nn.init.zeros_(self.cond_mlp[2].bias)

    def forward(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(images, cond)[0]

    def forward_features(
        self, images: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``(N,)`` and the output of every convolution of the feature stack, finest first."""
        if (cond is None) != (self.cond_embed is None):
            wants = f"a condition (N, {self.cond_dim})" if self.cond_dim else "no condition"
            got = "none" if cond is None else tuple(cond.shape)
            raise ValueError(f"This discriminator takes {wants}, got {got}.")
        taps = []
        x = images
        for layer in self.features:
            x = layer(x)
            if not isinstance(layer, nn.LeakyReLU):
                taps.append(x)
        # Minibatch standard deviation: lets D see a batch's lack of variety, which fights mode dropping.
        n = x.shape[0]
        g = math.gcd(self.mbstd_group, n)
        std = x.reshape(g, n // g, *x.shape[1:]).std(dim=0, unbiased=False).mean(dim=(1, 2, 3))  # (n // g,)
        std = std.repeat(g)[:, None, None, None].expand(n, 1, x.shape[2], x.shape[3])
        x = torch.cat([x, std], dim=1)
        if self.cond_embed is None:
            return self.head(x).squeeze(1), taps
        features = self.head[:-1](x)  # (N, C*16): what the last linear layer reads
        embed = self.cond_embed(cond) if self.cond_mlp is None else self.cond_embed(cond) + self.cond_mlp(cond)
        logits = self.head[-1](features).squeeze(1) + (features * embed).sum(1)
        return logits, taps
